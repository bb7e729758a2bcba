//! The `keygate` command line: parse the arguments, load the config, call the library
//! ([`keygate::cli`] for serving and signals, [`keygate::actions`] for keys and secrets).
//!
//! Everything meant for a person goes to stderr; stdout carries only what a script captures
//! (a new key, alone on its line).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

// jemalloc, for memory per connection: see its entry in Cargo.toml.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use keygate::actions::{self, NewKeys};
use keygate::cli::args::{Cli, Command, KeysCommand, LogFormat, SecretsCommand};
use keygate::cli::{self, master_env, CliError};
use keygate::config::Config;
use keygate::store::ListQuery;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(
        matches!(cli.log_format, LogFormat::Json),
        matches!(cli.command, Command::Serve),
    );
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let path = match &cli.command {
        Command::CheckConfig { file: Some(f) } => Some(f.as_path()),
        _ => cli.config.as_deref(),
    };
    let config = Config::load(path)?;
    match cli.command {
        Command::CheckConfig { .. } => {
            for r in &config.routes {
                eprintln!(
                    "route {:>12} -> https://{}{}",
                    r.prefix, r.upstream.authority, r.upstream.base_path
                );
            }
            eprintln!("config OK ({} routes)", config.routes.len());
        }
        Command::Serve => cli::serve(config)?,
        Command::Reload => {
            let pid = cli::signal_reload(&config)?;
            eprintln!("keygate: config OK ({} routes); asked pid {pid} to reload it. The outcome is in its log and at GET /-/reload on the admin listener.", config.routes.len());
        }
        Command::Keys(cmd) => keys(&config, cmd)?,
        Command::Secrets(cmd) => secrets(&config, cmd)?,
        Command::Run {
            object_type,
            object_id,
            org,
            command,
        } => {
            let code = cli::run_command(
                &config,
                (object_type.into(), &object_id),
                org.as_deref(),
                &command,
            )?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn keys(config: &Config, cmd: KeysCommand) -> Result<(), CliError> {
    let (master, store) = keygate::app::open_store(config, master_env())?;
    let t = store.tenant()?;
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
                (Some(r), Some(b)) => Some(actions::limit_spec("--rate/--burst", r, b)?),
                _ => None,
            };
            let routes = (!routes.is_empty()).then_some(routes);
            let new = NewKeys {
                name: name.trim().to_owned(),
                role: role.into(),
                routes,
                limit,
                count: count as usize,
            };
            let made = actions::create_keys(
                store.as_ref(),
                &master,
                (&t.org_id, &t.user_id),
                &config.routes,
                new,
            )?;
            match made.as_slice() {
                [(_, rec)] => eprintln!(
                    "created key {} ({}, role {}); it is shown once, below:",
                    rec.id,
                    rec.name,
                    rec.role.as_str()
                ),
                _ => eprintln!(
                    "created {} keys named {}; they are shown once, below:",
                    made.len(),
                    name.trim()
                ),
            }
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (key, _) in &made {
                writeln!(out, "{}", key.expose()).map_err(|e| CliError::Other(e.to_string()))?;
            }
            out.flush().map_err(|e| CliError::Other(e.to_string()))?;
        }
        KeysCommand::List => {
            let keys = store.list_api_keys(&ListQuery::all(&t.org_id, u32::MAX))?;
            print!("{}", actions::keys_table(&keys));
        }
        KeysCommand::Delete { id } => {
            let rec = actions::delete_key(store.as_ref(), None, &id)?;
            eprintln!("deleted key {} ({})", rec.id, rec.name);
        }
    }
    Ok(())
}

fn secrets(config: &Config, cmd: SecretsCommand) -> Result<(), CliError> {
    let (_master, store) = keygate::app::open_store(config, master_env())?;
    let org = store.tenant()?.org_id;
    match cmd {
        SecretsCommand::Put { name, secret_type } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("reading the secret from stdin; type it and end with Ctrl-D (it is not echoed back anywhere)");
            }
            let value = actions::read_secret(std::io::stdin().lock())?;
            let rec = actions::put_secret(store.as_ref(), &org, name.trim(), secret_type, value)?;
            let ty = rec.secret_type.as_deref().unwrap_or("no type");
            eprintln!(
                "stored secret {} ({ty}), preview {}",
                rec.name,
                rec.preview_secret.as_deref().unwrap_or("-")
            );
        }
        SecretsCommand::List => {
            let list = store.list_ai_secrets(&ListQuery::all(&org, u32::MAX), &[])?;
            print!("{}", actions::secrets_table(&list));
        }
        SecretsCommand::Delete { name } => {
            let rec = actions::delete_secret(store.as_ref(), &org, &name)?;
            eprintln!("deleted secret {}", rec.name);
        }
    }
    Ok(())
}
