//! The command line's arguments (clap): what `keygate --help` shows. `src/main.rs` parses
//! them and calls the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::store::{ObjectType, Role};

/// `keygate [--config FILE] [--log-format text|json] COMMAND`.
#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "A local authenticating reverse proxy and secret injector"
)]
pub struct Cli {
    /// Config file (default: config/keygate.toml when it exists, else the built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr. The level comes from KEYGATE_LOG (e.g. "debug", "keygate=trace").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The format of log lines on stderr.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
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
    /// Read and check the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
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

/// The scope kinds of `keygate run`.
#[derive(Clone, Copy, ValueEnum)]
pub enum ObjectTypeArg {
    Organization,
    Project,
    Function,
}

impl From<ObjectTypeArg> for ObjectType {
    fn from(a: ObjectTypeArg) -> Self {
        match a {
            ObjectTypeArg::Organization => ObjectType::Organization,
            ObjectTypeArg::Project => ObjectType::Project,
            ObjectTypeArg::Function => ObjectType::Function,
        }
    }
}

/// `keygate keys ...`.
#[derive(Subcommand)]
pub enum KeysCommand {
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
    /// Delete a key by id; a running server refuses it within a second. A key used within
    /// the last hour is deleted only after a yes on a terminal, or with --force.
    Delete {
        id: String,
        /// Delete even when the key was used recently, without asking.
        #[arg(long)]
        force: bool,
    },
}

/// `keygate audit ...`.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole trail's MAC chain; names the first event that does not fit.
    Verify {
        /// A mark an earlier `verify` printed (SEQ:HEX): the trail must still have that event
        /// with that MAC, which catches a rollback to an older copy of the whole trail.
        #[arg(long, value_name = "SEQ:HEX")]
        expect: Option<crate::audit::Mark>,
    },
    /// Print the trail, newest first.
    List {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// A key's role.
#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Admin,
    Proxy,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Proxy => Role::Proxy,
        }
    }
}

/// `keygate secrets ...`.
#[derive(Subcommand)]
pub enum SecretsCommand {
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
