//! The parts of the command line that are more than parsing: logging set-up, `serve` with its
//! signals and pid file, and `keygate reload`, which finds a running server by that pid file.
//! `src/main.rs` parses the arguments and calls these (and [`crate::actions`]).
//!
//! ```text
//!  serve ─▶ app::start ─▶ pid file beside the store ─▶ SIGHUP: reload │ SIGTERM/SIGINT: drain
//!  reload ─▶ config must load ─▶ read the pid file ─▶ SIGHUP to that pid
//! ```

pub mod args;

use std::io::Write;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::app;
use crate::config::Config;

/// Why a command failed; printed as `keygate: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] app::AppError),
    #[error(transparent)]
    Action(#[from] crate::actions::ActionError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Other(String),
}

/// Sets up logging on stderr: `KEYGATE_LOG` filters (default `info` when serving, else
/// `warn`), text or JSON lines.
pub fn init_logging(json: bool, serving: bool) {
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
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// The master key given in the environment (`KEYGATE_MASTER_KEY`), if any.
pub fn master_env() -> Option<Zeroizing<String>> {
    std::env::var("KEYGATE_MASTER_KEY").ok().map(Zeroizing::new)
}

/// `keygate serve`: runs both listeners until SIGTERM or SIGINT, then drains; SIGHUP reloads.
pub fn serve(config: Config) -> Result<(), CliError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.server.worker_threads {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let running = app::start(config, master_env()).await?;
        if let Some(ca) = &running.dev_ca {
            let shown = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
            eprintln!(
                "keygate: TLS certificate issued by the development CA; trust {} (curl --cacert {})",
                shown.display(),
                ca.display()
            );
        }
        // The key first: whoever reads the banner below finds the key already on stdout.
        if let Some(key) = &running.first_admin_key {
            eprintln!("keygate: the store was empty, so an admin key was created; it is printed once, on stdout:");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", key.expose());
            let _ = out.flush();
        }
        eprintln!("keygate: proxy listening on https://{}", running.proxy_addr);
        eprintln!("keygate: admin listening on https://{}", running.admin_addr);
        let pid_file = PidFile::write(&pid_path(&running.state.live().config));
        let waited = serve_signals(&running).await;
        eprintln!("keygate: shutting down (draining in-flight requests)");
        running.shutdown().await;
        drop(pid_file);
        waited
    })
}

/// Waits for SIGTERM or SIGINT (then returns, to shut down); SIGHUP reloads the config.
async fn serve_signals(running: &app::Running) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch =
        |kind| signal(kind).map_err(|e| CliError::Other(format!("cannot watch signals: {e}")));
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
pub fn pid_path(config: &Config) -> PathBuf {
    let dir = config
        .store
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Servers on one store (two on one SQLite file, or the instances of a fleet sharing this
    // directory) each name their pid file after their admin port, which only one of them can
    // hold: one server's pid file never names another. An admin port of 0 (the OS picks one)
    // has no stable name; that server uses `keygate.pid`.
    let shared_store = config.store.url.is_some()
        || std::env::var_os("KEYGATE_STORE_URL").is_some_and(|u| !u.is_empty());
    let port = config.listen.admin.port();
    if port != 0 || shared_store {
        dir.join(format!("keygate-{port}.pid"))
    } else {
        dir.join("keygate.pid")
    }
}

/// The pid file of a running `serve`; removed when dropped.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn write(path: &Path) -> PidFile {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
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
/// server whose pid file sits beside the store. Returns the pid signalled.
pub fn signal_reload(config: &Config) -> Result<i32, CliError> {
    let path = pid_path(config);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::Other(format!(
            "cannot read {} ({e}): is `keygate serve` running with this config?",
            path.display()
        ))
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| CliError::Other(format!("{}: not a pid", path.display())))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| {
        CliError::Other(format!(
            "cannot signal pid {pid} (from {}): {e}",
            path.display()
        ))
    })?;
    Ok(pid)
}

/// `keygate run`: starts `command` with the env vars of the scope (plus the org's), forwards
/// signals to it, and returns its exit code. The store and the runtime are dropped before
/// this returns, so the caller exits cleanly with the code.
pub fn run_command(
    config: &Config,
    scope: (crate::store::ObjectType, &str),
    org: Option<&str>,
    command: &[String],
) -> Result<i32, CliError> {
    let (_master, store) = app::open_store(config, master_env())?;
    let tenant = store.tenant()?;
    let (org_id, org_name) = match org {
        None => (tenant.org_id, tenant.org_name),
        Some(name) => match store.org_id_by_name(name)? {
            Some(id) => (id, name.to_owned()),
            None => return Err(CliError::Other(format!("--org {name}: no such org"))),
        },
    };
    let env = crate::store::scope_env(store.as_ref(), (&org_id, &org_name), scope.0, scope.1)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(format!("cannot start the runtime: {e}")))?;
    let ids: Vec<String> = env.iter().map(|(rec, _)| rec.id.clone()).collect();
    let names: Vec<&str> = env.iter().map(|(rec, _)| rec.name.as_str()).collect();
    tracing::info!(vars = ?names, "starting the command with env vars");
    rt.block_on(async {
        let signals = crate::run::SignalForwarder::install()?;
        let child = crate::run::spawn(command, &env)?;
        // Off the runtime thread: a PostgreSQL store blocks on a runtime of its own.
        let stamp = {
            let (store, org_id) = (store.clone(), org_id.clone());
            tokio::task::spawn_blocking(move || store.mark_env_vars_used(&org_id, &ids))
        };
        if let Ok(Err(e)) = stamp.await {
            eprintln!("keygate: could not stamp env var use: {e}");
        }
        signals.supervise(child).await
    })
    .map_err(CliError::Other)
}
