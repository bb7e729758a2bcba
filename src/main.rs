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
use keygate::audit::Actor;
use keygate::cli::args::{AuditCommand, Cli, Command, KeysCommand, LogFormat, SecretsCommand};
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
        Command::Audit(cmd) => return audit(&config, cmd),
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
                &Actor::cli(),
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
        KeysCommand::Delete { id, force } => {
            if !force {
                confirm_key_delete(store.as_ref(), &t.org_id, &id)?;
            }
            let rec = actions::delete_key(store.as_ref(), None, &id, &Actor::cli())?;
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
            let rec = actions::put_secret(
                store.as_ref(),
                &org,
                name.trim(),
                secret_type,
                value,
                &Actor::cli(),
            )?;
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
            let rec = actions::delete_secret(store.as_ref(), &org, &name, &Actor::cli())?;
            eprintln!("deleted secret {}", rec.name);
        }
    }
    Ok(())
}

/// Before deleting a key used within the last hour: ask on a terminal, refuse otherwise (the
/// operator passes --force). Usage is as of the servers' last flush (`keys.usage_flush_interval`).
fn confirm_key_delete(
    store: &dyn keygate::store::Store,
    org: &str,
    id: &str,
) -> Result<(), CliError> {
    let Some(rec) = store.get_api_key(org, id)? else {
        return Ok(()); // delete_key says there is no such key
    };
    let Some(ago) = actions::used_recently(&rec, time::OffsetDateTime::now_utc()) else {
        return Ok(());
    };
    let warning = format!("this key was used {ago}; integrations using it will stop working");
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin())
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !interactive {
        return Err(CliError::Other(format!(
            "not deleting key {id}: {warning}. Pass --force to delete it anyway"
        )));
    }
    eprint!("{warning}. Delete key {id} ({})? [y/N] ", rec.name);
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CliError::Other(e.to_string()))?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CliError::Other(format!("not deleting key {id}")))
    }
}

fn audit(config: &Config, cmd: AuditCommand) -> Result<ExitCode, CliError> {
    let (master, store) = keygate::app::open_store(config, master_env())?;
    match cmd {
        AuditCommand::Verify { expect } => {
            match actions::verify_audit(store.as_ref(), &master, expect.as_ref())? {
                Ok((_, None)) => eprintln!("audit trail OK: no events yet"),
                Ok((n, Some(mark))) => {
                    let noted =
                        expect.map_or_else(String::new, |m| format!(", #{} as noted ({m})", m.seq));
                    let events = if n == 1 { "event" } else { "events" };
                    eprintln!(
                        "audit trail OK: {n} {events}, each chained to the one before{noted}; \
                         the last is #{n}, mark {mark}\n(keep the mark elsewhere and check with \
                         `keygate audit verify --expect {mark}` later: that catches a rollback \
                         to an older copy of the trail)"
                    );
                }
                Err(broken) => {
                    eprintln!("keygate: audit trail BROKEN: {broken}");
                    return Ok(ExitCode::from(2));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::List { json, limit } => {
            let t = store.tenant()?;
            let events = store.audit_events(&keygate::store::AuditQuery {
                org_id: t.org_id,
                page: keygate::store::Page::First,
                limit,
            })?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if json {
                for e in &events {
                    writeln!(out, "{}", e.to_json()).map_err(|e| CliError::Other(e.to_string()))?;
                }
            } else {
                write!(out, "{}", actions::audit_table(&events))
                    .map_err(|e| CliError::Other(e.to_string()))?;
            }
            out.flush().map_err(|e| CliError::Other(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
