//! The `keygate` command line: parse arguments, load the config, set up logging, run.
//!
//! Everything meant for a person goes to stderr; stdout carries only what a script captures
//! (a new key, alone on its line).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

// jemalloc, for memory per connection: see its entry in Cargo.toml.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use keygate::app;
use keygate::config::Config;
use keygate::secret::Secret;
use keygate::store::{
    issue_keys, AiSecretWrite, KeyOptions, ListQuery, Role, SecretRef, Store, WriteMode,
};

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "A local authenticating reverse proxy and secret injector"
)]
struct Cli {
    /// Config file (default: config/keygate.toml when it exists, else the built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr. The level comes from KEYGATE_LOG (e.g. "debug", "keygate=trace").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and admin listeners.
    Serve,
    /// Check the config file and ask the running `keygate serve` (on the same store) to
    /// reload it, as SIGHUP does.
    Reload,
    /// Validate a config file and name the bad field.
    CheckConfig {
        /// The file to check (default: as --config).
        file: Option<PathBuf>,
    },
    /// Manage keygate's own API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage upstream secrets (ai_secrets).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Run a command with the env vars of a scope (plus the org's) in its environment.
    Run {
        #[arg(long, value_enum)]
        object_type: ObjectTypeArg,
        /// The project or function id (for organization: the org's id or name).
        #[arg(long)]
        object_id: String,
        /// The org by name (default: the store's org).
        #[arg(long)]
        org: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectTypeArg {
    Organization,
    Project,
    Function,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it once, alone on one line of stdout.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = RoleArg::Proxy)]
        role: RoleArg,
        /// Limit the key to this route (by name; repeat for several). Default: every route.
        #[arg(long = "route", value_name = "NAME")]
        routes: Vec<String>,
        /// The key's own sustained rate (requests per second); needs --burst.
        #[arg(long, requires = "burst")]
        rate: Option<f64>,
        /// The key's own burst; needs --rate.
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Create this many keys (one per line on stdout), in one transaction.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
    /// List keys (never the keys themselves).
    List,
    /// Delete a key by id; a running server refuses it within a second.
    Delete { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Admin,
    Proxy,
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Store a secret read from stdin (one trailing newline is dropped), encrypted at rest.
    Put {
        name: String,
        #[arg(long = "type", value_name = "TYPE")]
        secret_type: Option<String>,
    },
    /// List secrets with previews only.
    List,
    /// Delete a secret by name.
    Delete { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(cli.command, Command::Serve));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("keygate: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, serving: bool) {
    // rustls warns about what peers do (an IP address as SNI, as wrk and Python send; a
    // warning alert): one line per connection from ordinary clients is log flooding, so its
    // lines show only when a filter names rustls (KEYGATE_LOG=debug,rustls=debug).
    let default = if serving { "info" } else { "warn" };
    let directives = std::env::var("KEYGATE_LOG").unwrap_or_else(|_| default.to_owned());
    let directives = if directives.contains("rustls") {
        directives
    } else {
        format!("{directives},rustls=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},rustls=error")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn master_env() -> Option<Zeroizing<String>> {
    std::env::var("KEYGATE_MASTER_KEY").ok().map(Zeroizing::new)
}

fn run(cli: Cli) -> Result<(), String> {
    if let Command::CheckConfig { file } = &cli.command {
        let path = file.as_ref().or(cli.config.as_ref());
        let config = Config::load(path.map(|p| p.as_path())).map_err(|e| e.to_string())?;
        for r in &config.routes {
            eprintln!(
                "route {:>12} -> https://{}{}",
                r.prefix, r.upstream.authority, r.upstream.base_path
            );
        }
        eprintln!("config OK ({} routes)", config.routes.len());
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    match cli.command {
        Command::CheckConfig { .. } => Ok(()),
        Command::Serve => serve(config),
        Command::Reload => reload(&config),
        Command::Keys(cmd) => keys(config, cmd),
        Command::Secrets(cmd) => secrets(config, cmd),
        Command::Run {
            object_type,
            object_id,
            org,
            command,
        } => run_command(config, object_type, &object_id, org.as_deref(), &command),
    }
}

fn serve(config: Config) -> Result<(), String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.server.worker_threads {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let running = app::start(config, master_env())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(ca) = &running.dev_ca {
            let shown = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
            eprintln!(
                "keygate: TLS certificate issued by the development CA; trust {} (curl --cacert {})",
                shown.display(),
                ca.display()
            );
        }
        eprintln!("keygate: proxy listening on https://{}", running.proxy_addr);
        eprintln!("keygate: admin listening on https://{}", running.admin_addr);
        if let Some(key) = &running.first_admin_key {
            eprintln!("keygate: the store was empty, so an admin key was created; it is printed once, on stdout:");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", key.expose());
            let _ = out.flush();
        }
        let pid_file = PidFile::write(&pid_path(&running.state.live().config));
        serve_signals(&running).await?;
        eprintln!("keygate: shutting down (draining in-flight requests)");
        running.shutdown().await;
        drop(pid_file);
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT (then returns, to shut down); SIGHUP reloads the config.
async fn serve_signals(running: &app::Running) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind| signal(kind).map_err(|e| format!("cannot watch signals: {e}"));
    let mut term = watch(SignalKind::terminate())?;
    let mut int = watch(SignalKind::interrupt())?;
    let mut hup = watch(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match running.state.reload().await {
                Ok(generation) => eprintln!("keygate: config reloaded (generation {generation})"),
                Err(e) => eprintln!("keygate: config reload refused, the running config stays: {e}"),
            },
        }
    }
}

/// Where `serve` writes its pid: beside the store, so that `keygate reload` with the same
/// config finds the server of that store.
fn pid_path(config: &Config) -> PathBuf {
    let dir = config
        .store
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    dir.join("keygate.pid")
}

/// The pid file of a running `serve`; removed when dropped.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn write(path: &std::path::Path) -> PidFile {
        match std::fs::write(path, format!("{}\n", std::process::id())) {
            Ok(()) => PidFile(Some(path.to_path_buf())),
            Err(e) => {
                eprintln!(
                    "keygate: cannot write {} ({e}); `keygate reload` will not find this server (SIGHUP still works)",
                    path.display()
                );
                PidFile(None)
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `keygate reload`: the config must load (else nothing is signalled), then SIGHUP to the
/// server whose pid file sits beside the store.
fn reload(config: &Config) -> Result<(), String> {
    let path = pid_path(config);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {} ({e}): is `keygate serve` running with this config?",
            path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a pid", path.display()))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| format!("cannot signal pid {pid} (from {}): {e}", path.display()))?;
    eprintln!(
        "keygate: config OK ({} routes); asked pid {pid} to reload it. The outcome is in its log and at GET /-/reload on the admin listener.",
        config.routes.len()
    );
    Ok(())
}

fn keys(config: Config, cmd: KeysCommand) -> Result<(), String> {
    let (master, store) = app::open_store(&config, master_env()).map_err(|e| e.to_string())?;
    match cmd {
        KeysCommand::Create {
            name,
            role,
            routes,
            rate,
            burst,
            count,
        } => {
            let limit = match (rate, burst) {
                (Some(r), Some(b)) => Some(keygate::config::LimitSpec::new(r, b).ok_or(
                    "--rate must be between 0.001 and 1000000 and --burst between 1 and 1000000",
                )?),
                _ => None,
            };
            for r in &routes {
                if !config.routes.iter().any(|c| *c.name == **r) {
                    return Err(format!("--route {r}: no route of the config is named so"));
                }
            }
            let routes = (!routes.is_empty()).then_some(routes);
            let name = name.trim();
            if name.is_empty() {
                return Err("--name must not be empty".into());
            }
            let role = match role {
                RoleArg::Admin => Role::Admin,
                RoleArg::Proxy => Role::Proxy,
            };
            let t = store.tenant().map_err(|e| e.to_string())?;
            let opts = KeyOptions {
                role,
                routes,
                limit,
            };
            let owner = (t.org_id.as_str(), t.user_id.as_str());
            let made = issue_keys(store.as_ref(), &master, owner, name, opts, count as usize)
                .map_err(|e| e.to_string())?;
            if let [(_, rec)] = made.as_slice() {
                eprintln!(
                    "created key {} ({}, role {}); it is shown once, below:",
                    rec.id,
                    rec.name,
                    rec.role.as_str()
                );
            } else {
                eprintln!(
                    "created {} keys named {name}; they are shown once, below:",
                    made.len()
                );
            }
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (key, _) in &made {
                writeln!(out, "{}", key.expose()).map_err(|e| e.to_string())?;
            }
            out.flush().map_err(|e| e.to_string())?;
            Ok(())
        }
        KeysCommand::List => {
            let t = store.tenant().map_err(|e| e.to_string())?;
            let keys = store
                .list_api_keys(&ListQuery::all(&t.org_id, u32::MAX))
                .map_err(|e| e.to_string())?;
            println!(
                "{:<36}  {:<24}  {:<5}  {:<11}  {:<24}  EXPOSED",
                "ID", "CREATED", "ROLE", "PREVIEW", "NAME"
            );
            for k in keys {
                println!(
                    "{:<36}  {:<24}  {:<5}  {:<11}  {:<24}  {}",
                    k.id,
                    k.created,
                    k.role.as_str(),
                    k.preview_name,
                    k.name,
                    k.exposed
                        .as_deref()
                        .map(|t| format!("yes, at {t}"))
                        .unwrap_or_else(|| "no".into())
                );
            }
            Ok(())
        }
        KeysCommand::Delete { id } => {
            match store.delete_api_key(None, &id).map_err(|e| e.to_string())? {
                Some(rec) => {
                    eprintln!("deleted key {} ({})", rec.id, rec.name);
                    Ok(())
                }
                None => Err(format!("no key with id {id}")),
            }
        }
    }
}

fn run_command(
    config: Config,
    object_type: ObjectTypeArg,
    object_id: &str,
    org: Option<&str>,
    command: &[String],
) -> Result<(), String> {
    use keygate::store::ObjectType;
    let (_master, store) = app::open_store(&config, master_env()).map_err(|e| e.to_string())?;
    let tenant = store.tenant().map_err(|e| e.to_string())?;
    let (org_id, org_name) = match org {
        None => (tenant.org_id, tenant.org_name),
        Some(name) => match store.org_id_by_name(name).map_err(|e| e.to_string())? {
            Some(id) => (id, name.to_owned()),
            None => return Err(format!("--org {name}: no such org")),
        },
    };
    let object_type = match object_type {
        ObjectTypeArg::Organization => ObjectType::Organization,
        ObjectTypeArg::Project => ObjectType::Project,
        ObjectTypeArg::Function => ObjectType::Function,
    };
    let env = keygate::run::scope_env(store.as_ref(), (&org_id, &org_name), object_type, object_id)
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let ids: Vec<String> = env.iter().map(|(rec, _)| rec.id.clone()).collect();
    let names: Vec<&str> = env.iter().map(|(rec, _)| rec.name.as_str()).collect();
    tracing::info!(vars = ?names, "starting the command with env vars");
    let code = rt.block_on(async {
        let signals = keygate::run::SignalForwarder::install()?;
        let child = keygate::run::spawn(command, &env)?;
        if let Err(e) = store.mark_env_vars_used(&org_id, &ids) {
            eprintln!("keygate: could not stamp env var use: {e}");
        }
        signals.supervise(child).await
    })?;
    drop(env);
    std::process::exit(code);
}

fn secrets(config: Config, cmd: SecretsCommand) -> Result<(), String> {
    let (_master, store) = app::open_store(&config, master_env()).map_err(|e| e.to_string())?;
    let org = store.tenant().map_err(|e| e.to_string())?.org_id;
    match cmd {
        SecretsCommand::Put { name, secret_type } => {
            let name = name.trim().to_owned();
            if name.is_empty() {
                return Err("the secret name must not be empty".into());
            }
            let value = read_secret_from_stdin()?;
            let write = AiSecretWrite {
                name,
                secret_type,
                metadata: None,
                secret: Some(value),
            };
            let rec = store
                .write_ai_secret(&org, write, WriteMode::SetValue)
                .map_err(|e| e.to_string())?;
            eprintln!(
                "stored secret {} ({}), preview {}",
                rec.name,
                rec.secret_type.as_deref().unwrap_or("no type"),
                rec.preview_secret.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        SecretsCommand::List => {
            let list = store
                .list_ai_secrets(&ListQuery::all(&org, u32::MAX), &[])
                .map_err(|e| e.to_string())?;
            println!(
                "{:<36}  {:<24}  {:<10}  {:<9}  {:<24}",
                "ID", "UPDATED", "TYPE", "PREVIEW", "NAME"
            );
            for s in list {
                println!(
                    "{:<36}  {:<24}  {:<10}  {:<9}  {:<24}",
                    s.id,
                    s.updated_at,
                    s.secret_type.as_deref().unwrap_or("-"),
                    s.preview_secret.as_deref().unwrap_or("-"),
                    s.name
                );
            }
            Ok(())
        }
        SecretsCommand::Delete { name } => {
            match store
                .delete_ai_secret(&org, SecretRef::Name(&name))
                .map_err(|e| e.to_string())?
            {
                Some(rec) => {
                    eprintln!("deleted secret {}", rec.name);
                    Ok(())
                }
                None => Err(format!("no secret named {name}")),
            }
        }
    }
}

/// Reads the whole of stdin as the secret value, dropping one trailing newline (`\n` or
/// `\r\n`). Refuses an empty value and one with other control characters.
fn read_secret_from_stdin() -> Result<Secret, String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("reading the secret from stdin; type it and end with Ctrl-D (it is not echoed back anywhere)");
    }
    let mut buf = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the secret from stdin: {e}"))?;
    if buf.ends_with(b"\r\n") {
        let n = buf.len() - 2;
        buf.truncate(n);
    } else if buf.ends_with(b"\n") {
        let n = buf.len() - 1;
        buf.truncate(n);
    }
    let text =
        std::str::from_utf8(&buf).map_err(|_| "the secret must be UTF-8 text".to_string())?;
    if text.is_empty() {
        return Err("the secret read from stdin is empty".into());
    }
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err("the secret holds control characters (a second line?); it cannot be sent in an HTTP header".into());
    }
    Ok(Secret::new(text.to_owned()))
}
