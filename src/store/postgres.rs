//! The fleet's shared store: PostgreSQL, reached through a pool of tokio-postgres connections.
//!
//! ```text
//!  open(): lock (pg_advisory_xact_lock) ─▶ schema version ─▶ master-key fingerprint
//!          ─▶ migrations newer than the database's ─▶ default tenant ─▶ commit
//!  every call: a pooled connection, one statement or one transaction, within `store.timeout`
//!  changes: triggers bump `revisions` and NOTIFY `keygate_changes` in the writing transaction;
//!           one LISTEN connection per instance moves `changes()`; it reconnects on its own
//! ```
//!
//! The [`Store`] trait is blocking (its callers run it on `spawn_blocking` threads, and the
//! CLI has no runtime at all), so the store owns a small runtime of its own that drives the
//! connections and the listener, and each call blocks on it. Every call has a deadline: a
//! frozen or unreachable database makes calls fail as [`StoreError::Unavailable`] (503), never
//! hang.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, GenericClient, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::common::{
    cursor_of_deleted, env_event, exposed_events, fingerprint_missing, key_event, key_uid,
    limit_columns, limit_from, metadata_from, metadata_text, name_taken, new_id, now_rfc3339,
    page_order, patched_secret, plan_secret_write, routes_from, routes_text, secret_event,
    secret_write_action, NewTenant, Planned, Sealed, Sealer,
};
use super::{
    AiSecretPatch, AiSecretRecord, AiSecretWrite, ApiKeyRecord, AuditQuery, EnvVarFilter,
    EnvVarRecord, EnvVarWrite, KeyLookup, KeyUsage, ListQuery, NewApiKey, ObjectType, Page,
    Principal, Profile, Revisions, Role, SecretRef, Store, StoreError, StoreInfo, Tenant,
    WriteMode,
};
use crate::audit::{action, head_record, Actor, Event, NewEvent};
use crate::config::LimitSpec;
use crate::crypto::{KeyDigest, MasterKey};
use crate::secret::Secret;

/// The advisory lock every instance takes to migrate and bootstrap ("keygate" and 1).
const MIGRATION_LOCK: i64 = 0x6b65_7967_6174_6501;

/// The advisory lock a transaction takes to append to the audit trail ("keygate" and 2): one
/// appender at a time in the whole fleet, so that the chain has no forks.
const AUDIT_LOCK: i64 = 0x6b65_7967_6174_6502;

/// The channel the triggers notify.
const CHANNEL: &str = "keygate_changes";

/// The schema, as numbered migrations; `keygate_migrations` records those applied.
const MIGRATIONS: &[(i32, &str)] = &[(1, SCHEMA_V1), (2, SCHEMA_V2)];

/// Version 2: key usage (flushed in batches; the update trigger does not count it as a change)
/// and the audit trail (see `crate::audit`).
const SCHEMA_V2: &str = r#"
ALTER TABLE api_keys ADD COLUMN last_used TEXT COLLATE "C";
ALTER TABLE api_keys ADD COLUMN request_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN rate_limited_count BIGINT NOT NULL DEFAULT 0;
CREATE TABLE audit_events (
  seq BIGINT PRIMARY KEY,
  id TEXT COLLATE "C" NOT NULL UNIQUE,
  created TEXT COLLATE "C" NOT NULL,
  org_id TEXT,
  actor_type TEXT NOT NULL,
  actor_id TEXT NOT NULL,
  actor_name TEXT NOT NULL,
  action TEXT NOT NULL,
  object_type TEXT NOT NULL,
  object_id TEXT NOT NULL,
  object_name TEXT NOT NULL,
  outcome TEXT NOT NULL,
  mac BYTEA NOT NULL
);
"#;

/// Ids and times are compared as bytes (`COLLATE "C"`): their text order is their time order
/// whatever the database's locale.
const SCHEMA_V1: &str = r#"
CREATE TABLE meta (k TEXT PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE revisions (name TEXT PRIMARY KEY, n BIGINT NOT NULL);
INSERT INTO revisions (name, n) VALUES ('keys', 0), ('secrets', 0), ('env_vars', 0);
CREATE TABLE orgs (
  id TEXT COLLATE "C" PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT COLLATE "C" NOT NULL
);
CREATE TABLE users (
  id TEXT COLLATE "C" PRIMARY KEY, org_id TEXT NOT NULL REFERENCES orgs(id),
  email TEXT, given_name TEXT, family_name TEXT, created TEXT COLLATE "C" NOT NULL
);
CREATE TABLE api_keys (
  id TEXT COLLATE "C" PRIMARY KEY,
  created TEXT COLLATE "C" NOT NULL,
  name TEXT NOT NULL,
  preview_name TEXT NOT NULL,
  user_id TEXT NOT NULL REFERENCES users(id),
  org_id TEXT NOT NULL REFERENCES orgs(id),
  role TEXT NOT NULL CHECK (role IN ('admin', 'proxy')),
  digest BYTEA NOT NULL UNIQUE,
  exposed TEXT,
  routes TEXT,
  rate_per_second DOUBLE PRECISION,
  burst BIGINT
);
CREATE INDEX api_keys_list ON api_keys (org_id, created DESC, id DESC);
CREATE TABLE ai_secrets (
  id TEXT COLLATE "C" PRIMARY KEY,
  created TEXT COLLATE "C" NOT NULL,
  updated_at TEXT NOT NULL,
  org_id TEXT NOT NULL REFERENCES orgs(id),
  name TEXT NOT NULL,
  type TEXT,
  metadata TEXT,
  sealed BYTEA,
  preview_secret TEXT,
  UNIQUE (org_id, name)
);
CREATE INDEX ai_secrets_list ON ai_secrets (org_id, created DESC, id DESC);
CREATE TABLE env_vars (
  id TEXT COLLATE "C" PRIMARY KEY,
  created TEXT COLLATE "C" NOT NULL,
  org_id TEXT NOT NULL REFERENCES orgs(id),
  object_type TEXT NOT NULL CHECK (object_type IN ('organization', 'project', 'function')),
  object_id TEXT NOT NULL,
  name TEXT NOT NULL,
  sealed BYTEA,
  used TEXT,
  UNIQUE (org_id, object_type, object_id, name)
);
CREATE INDEX env_vars_list ON env_vars (org_id, created DESC, id DESC);
CREATE FUNCTION keygate_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE revisions SET n = n + 1 WHERE name = TG_ARGV[0];
  PERFORM pg_notify('keygate_changes', TG_ARGV[0]);
  RETURN NULL;
END $$;
CREATE TRIGGER api_keys_ins_del AFTER INSERT OR DELETE ON api_keys
  FOR EACH STATEMENT EXECUTE FUNCTION keygate_changed('keys');
CREATE TRIGGER api_keys_upd AFTER UPDATE ON api_keys FOR EACH ROW
  WHEN ((OLD.digest, OLD.org_id, OLD.user_id, OLD.role, OLD.routes, OLD.rate_per_second,
         OLD.burst, OLD.name)
        IS DISTINCT FROM
        (NEW.digest, NEW.org_id, NEW.user_id, NEW.role, NEW.routes, NEW.rate_per_second,
         NEW.burst, NEW.name))
  EXECUTE FUNCTION keygate_changed('keys');
CREATE TRIGGER ai_secrets_changed AFTER INSERT OR UPDATE OR DELETE ON ai_secrets
  FOR EACH STATEMENT EXECUTE FUNCTION keygate_changed('secrets');
CREATE TRIGGER env_vars_ins_del AFTER INSERT OR DELETE ON env_vars
  FOR EACH STATEMENT EXECUTE FUNCTION keygate_changed('env_vars');
CREATE TRIGGER env_vars_upd AFTER UPDATE ON env_vars FOR EACH ROW
  WHEN ((OLD.sealed, OLD.name, OLD.org_id, OLD.object_type, OLD.object_id)
        IS DISTINCT FROM
        (NEW.sealed, NEW.name, NEW.org_id, NEW.object_type, NEW.object_id))
  EXECUTE FUNCTION keygate_changed('env_vars');
"#;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            // The message and code only: a DETAIL line can quote row values.
            let code = db.code();
            let msg = format!("{} ({})", db.message(), code.code());
            if *code == SqlState::UNIQUE_VIOLATION {
                return StoreError::Conflict(
                    "that name was just taken by a concurrent write; try again".into(),
                );
            }
            // 08: connection exception, 53: insufficient resources, 57: operator intervention
            // (shutdown, cannot connect now).
            return match &code.code()[..2] {
                "08" | "53" | "57" => StoreError::Unavailable(msg),
                _ => StoreError::Backend(msg),
            };
        }
        // No answer from the database: the connection failed, closed, or timed out. The
        // sources say why (refused, TLS certificate unknown); none carries the password.
        StoreError::Unavailable(crate::error::chain(&e))
    }
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// How to reach the database: the parsed URL with its password resolved, and the TLS trust.
#[derive(Clone)]
pub struct PgSettings {
    config: tokio_postgres::Config,
    ca_file: Option<PathBuf>,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Each store call's deadline.
    pub timeout: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("location", &location(&self.config))
            .finish_non_exhaustive()
    }
}

/// `host:port/database`: what the log and `/readyz` may show.
fn location(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

impl PgSettings {
    /// Settings from a `postgres://` URL. A URL without a password takes it from
    /// `PGPASSWORD`, else from the password file (`PGPASSFILE` or `~/.pgpass`), as libpq does.
    /// Errors never repeat the URL.
    pub fn from_url(
        url: &str,
        ca_file: Option<PathBuf>,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|_| {
            StoreError::Settings(
                "the store URL is not a valid postgres:// URL (the value is not shown: it may hold a password)"
                    .into(),
            )
        })?;
        if config.get_user().is_none() {
            config.user(std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()));
        }
        if config.get_password().is_none() {
            if let Some(p) = std::env::var("PGPASSWORD")
                .ok()
                .or_else(|| password_from_file(&config))
            {
                config.password(p);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        // A dead peer is noticed by the kernel within seconds instead of minutes.
        config.keepalives_idle(Duration::from_secs(5));
        #[cfg(target_os = "linux")]
        config.tcp_user_timeout(Duration::from_secs(10));
        config.application_name("keygate");
        Ok(PgSettings {
            config,
            ca_file,
            pool_size,
            timeout,
        })
    }

    /// `host:port/database`, without user or password.
    pub fn location(&self) -> String {
        location(&self.config)
    }
}

/// The password of a matching `hostname:port:database:username:password` line of the password
/// file, as libpq reads it (`*` matches anything; a file readable by others is ignored).
fn password_from_file(c: &tokio_postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(&path).ok()?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "password file ignored: it is readable by others (chmod 0600 it)");
            return None;
        }
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let loc = location(c);
    let (hostport, db) = loc.split_once('/')?;
    let (host, port) = hostport.rsplit_once(':')?;
    let user = c.get_user().unwrap_or("postgres");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let fields = split_passfile_line(line);
            let [h, p, d, u, pw] = <[String; 5]>::try_from(fields).ok()?;
            let ok = |pat: &str, v: &str| pat == "*" || pat == v;
            (ok(&h, host) && ok(&p, port) && ok(&d, db) && ok(&u, user)).then_some(pw)
        })
}

/// The `:`-separated fields of a password file line, with `\:` and `\\` unescaped.
fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => {
                if let (Some(next), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => {
                if let Some(f) = fields.last_mut() {
                    f.push(ch);
                }
            }
        }
    }
    fields
}

/// The PostgreSQL store.
pub struct PgStore {
    /// Drives the pool's connections and the listener; shut down (without blocking) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    sealer: Sealer,
    timeout: Duration,
    location: String,
    changes: watch::Receiver<u64>,
    listening: Arc<AtomicBool>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({})", self.location)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A runtime dropped inside another runtime's task would block it; this one is left to
        // stop on its own.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn tls(settings: &PgSettings) -> Result<MakeRustlsConnect, StoreError> {
    // The database's certificate is always verified (system roots plus `store.ca_file`); there
    // is no setting that skips it. `sslmode=disable` in the URL turns TLS off altogether.
    let config = crate::tls::upstream_client_config(settings.ca_file.as_deref())
        .map_err(|e| StoreError::Settings(e.to_string()))?;
    Ok(MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects, migrates under the advisory lock, checks that `master` is the key this
    /// database was created with (before anything else is read or written), and starts
    /// listening for changes.
    pub fn open(settings: &PgSettings, master: Arc<MasterKey>) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keygate-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Settings(format!("cannot start the store runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let tls = tls(settings)?;
        let manager = Manager::from_config(
            settings.config.clone(),
            tls.clone(),
            ManagerConfig {
                // Broken connections are found when they are used (and then dropped); a
                // round trip per checkout would double every call's latency.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _entered = handle.enter();
            Pool::builder(manager)
                .max_size(settings.pool_size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(settings.timeout))
                .create_timeout(Some(settings.timeout))
                .recycle_timeout(Some(settings.timeout))
                .build()
                .map_err(|e| StoreError::Settings(e.to_string()))?
        };
        let (notices, changes) = watch::channel(0u64);
        let store = PgStore {
            runtime: Some(runtime),
            handle,
            pool,
            sealer: Sealer(master),
            timeout: settings.timeout,
            location: settings.location(),
            changes,
            listening: Arc::default(),
        };
        let fingerprint = store.sealer.fingerprint();
        store.run(async {
            let mut c = store.pool.get().await?;
            migrate(&mut c, &fingerprint).await
        })?;
        store.handle.spawn(listen(
            settings.config.clone(),
            tls,
            notices,
            store.listening.clone(),
        ));
        Ok(store)
    }

    /// Runs one store call on the store's runtime, within the deadline.
    fn run<T>(&self, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let timeout = self.timeout;
        self.handle.block_on(async move {
            tokio::time::timeout(timeout, call)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "no answer from PostgreSQL within {timeout:?}"
                    )))
                })
        })
    }
}

/// Runs `$body` in one transaction on a pooled connection, `$tx` naming the transaction, and
/// commits when it returns `Ok`. A `return` in the body leaves the transaction, which is then
/// rolled back.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:block) => {
        $store.run(async {
            let mut conn = $store.pool.get().await?;
            let client: &mut Client = &mut conn;
            let owned = client.transaction().await?;
            let out = {
                let $tx = &owned;
                let body = async { $body };
                let done: Result<_, StoreError> = body.await;
                done
            }?;
            owned.commit().await?;
            Ok(out)
        })
    };
}

async fn migrate(c: &mut Client, fingerprint: &[u8; 32]) -> Result<(), StoreError> {
    let tx = c.transaction().await?;
    // "already exists, skipping" notices are expected here, not news for the log.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    // Instances starting together queue here; the first migrates, the others find it done.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS keygate_migrations (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)",
    )
    .await?;
    let version: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM keygate_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    let supported = MIGRATIONS.last().map_or(0, |m| m.0);
    if version > supported {
        return Err(StoreError::SchemaTooNew {
            found: version.into(),
            supported: supported.into(),
        });
    }
    if version > 0 {
        check_fingerprint(&tx, fingerprint).await?;
    }
    for (n, sql) in MIGRATIONS.iter().filter(|m| m.0 > version) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO keygate_migrations (version, applied) VALUES ($1, $2)",
            &[n, &now_rfc3339()],
        )
        .await?;
        tracing::info!(version = n, "store schema migrated");
    }
    check_fingerprint(&tx, fingerprint).await?;
    let orgs: i64 = tx
        .query_one("SELECT COUNT(*) FROM orgs", &[])
        .await?
        .try_get(0)?;
    if orgs == 0 {
        let t = NewTenant::generate();
        tx.execute(
            "INSERT INTO orgs (id, name, created) VALUES ($1, $2, $3)",
            &[&t.org_id, &t.org_name, &t.created],
        )
        .await?;
        tx.execute(
            "INSERT INTO users (id, org_id, created) VALUES ($1, $2, $3)",
            &[&t.user_id, &t.org_id, &t.created],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn check_fingerprint(
    tx: &tokio_postgres::Transaction<'_>,
    fp: &[u8; 32],
) -> Result<(), StoreError> {
    let stored: Option<Vec<u8>> = tx
        .query_opt("SELECT v FROM meta WHERE k = 'master_key_fingerprint'", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if fingerprint_missing(stored.as_deref(), fp)? {
        tx.execute(
            "INSERT INTO meta (k, v) VALUES ('master_key_fingerprint', $1)",
            &[&fp.as_slice()],
        )
        .await?;
    }
    Ok(())
}

/// Keeps one connection listening on [`CHANNEL`] and moves `notices` for every notification,
/// and once more after each (re)connection (what happened while it was down was not heard).
/// Reconnects on its own, backing off to 2 s; the poller reads revisions meanwhile.
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    notices: watch::Sender<u64>,
    up: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut was_up = true;
    loop {
        let err = listen_once(&config, tls.clone(), &notices, &up, &mut backoff).await;
        up.store(false, Ordering::Release);
        if was_up {
            tracing::warn!(error = %err, "PostgreSQL change notifications lost; polling revisions until they reconnect");
            was_up = false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if up.load(Ordering::Acquire) {
            was_up = true;
        }
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    notices: &watch::Sender<u64>,
    up: &AtomicBool,
    backoff: &mut Duration,
) -> StoreError {
    let connected = tokio::time::timeout(Duration::from_secs(10), config.connect(tls)).await;
    let (client, mut connection) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return e.into(),
        Err(_) => return StoreError::Unavailable("connecting timed out".into()),
    };
    let (heard, mut hear) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if heard.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        driver.abort();
        return e.into();
    }
    up.store(true, Ordering::Release);
    *backoff = Duration::from_millis(100);
    tracing::info!("listening for PostgreSQL change notifications");
    notices.send_modify(|n| *n = n.wrapping_add(1));
    while hear.recv().await.is_some() {
        notices.send_modify(|n| *n = n.wrapping_add(1));
    }
    drop(client);
    driver.abort();
    StoreError::Unavailable("the notification connection closed".into())
}

// ---------------------------------------------------------------------------------------------
// Rows.

const KEY_COLUMNS: &str =
    "id, created, name, preview_name, user_id, org_id, role, exposed, routes, \
     rate_per_second, burst, last_used, request_count, rate_limited_count";

fn key_from_row(r: &Row) -> Result<ApiKeyRecord, StoreError> {
    let role: String = r.try_get(6)?;
    Ok(ApiKeyRecord {
        id: r.try_get(0)?,
        created: r.try_get(1)?,
        name: r.try_get(2)?,
        preview_name: r.try_get(3)?,
        user_id: r.try_get(4)?,
        org_id: r.try_get(5)?,
        role: Role::parse(&role).unwrap_or(Role::Proxy),
        exposed: r.try_get(7)?,
        routes: routes_from(r.try_get(8)?),
        limit: limit_from(r.try_get(9)?, r.try_get(10)?),
        last_used: r.try_get(11)?,
        request_count: r.try_get::<_, i64>(12)?.max(0) as u64,
        rate_limited_count: r.try_get::<_, i64>(13)?.max(0) as u64,
    })
}

const EVENT_COLUMNS: &str = "seq, id, created, org_id, actor_type, actor_id, actor_name, action, \
     object_type, object_id, object_name, outcome, mac";

fn event_from_row(r: &Row) -> Result<Event, StoreError> {
    let kind: String = r.try_get(4)?;
    Ok(Event {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        created: r.try_get(2)?,
        org_id: r.try_get(3)?,
        actor: Actor::from_parts(&kind, r.try_get(5)?, r.try_get(6)?),
        action: r.try_get(7)?,
        object_type: r.try_get(8)?,
        object_id: r.try_get(9)?,
        object_name: r.try_get(10)?,
        outcome: r.try_get(11)?,
        mac: r.try_get(12)?,
    })
}

/// Appends `events` to the audit trail inside `tx`, the transaction of the change they
/// record, under the fleet-wide audit lock: chained to the last event, inserted with one
/// statement per 5,000, then the head record moved to the last.
async fn append_events(
    tx: &tokio_postgres::Transaction<'_>,
    master: &MasterKey,
    events: impl IntoIterator<Item = NewEvent>,
) -> Result<(), StoreError> {
    let mut events = events.into_iter().peekable();
    if events.peek().is_none() {
        return Ok(());
    }
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await?;
    let mut prev: Option<(i64, Vec<u8>)> = tx
        .query_opt(
            "SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| Ok::<_, StoreError>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    let mut sealed = Vec::new();
    for new in events {
        let ev = Event::seal(master, prev.as_ref().map(|(s, m)| (*s, m.as_slice())), new);
        prev = Some((ev.seq, ev.mac.clone()));
        sealed.push(ev);
    }
    for chunk in sealed.chunks(5000) {
        let col = |f: fn(&Event) -> String| chunk.iter().map(f).collect::<Vec<String>>();
        let seqs: Vec<i64> = chunk.iter().map(|e| e.seq).collect();
        let orgs: Vec<Option<String>> = chunk.iter().map(|e| e.org_id.clone()).collect();
        let macs: Vec<Vec<u8>> = chunk.iter().map(|e| e.mac.clone()).collect();
        tx.execute(
            &format!(
                "INSERT INTO audit_events ({EVENT_COLUMNS})
                 SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                                      $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[],
                                      $11::TEXT[], $12::TEXT[], $13::BYTEA[])"
            ),
            &[
                &seqs,
                &col(|e| e.id.clone()),
                &col(|e| e.created.clone()),
                &orgs,
                &col(|e| e.actor.parts().0.to_owned()),
                &col(|e| e.actor.parts().1.to_owned()),
                &col(|e| e.actor.parts().2.to_owned()),
                &col(|e| e.action.clone()),
                &col(|e| e.object_type.clone()),
                &col(|e| e.object_id.clone()),
                &col(|e| e.object_name.clone()),
                &col(|e| e.outcome.clone()),
                &macs,
            ],
        )
        .await?;
    }
    if let Some(last) = sealed.last() {
        tx.execute(
            "INSERT INTO meta (k, v) VALUES ('audit_head', $1)
             ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            &[&head_record(master, last)],
        )
        .await?;
    }
    Ok(())
}

const SECRET_COLUMNS: &str =
    "id, created, updated_at, org_id, name, type, metadata, preview_secret";

fn secret_from_row(r: &Row) -> Result<AiSecretRecord, StoreError> {
    Ok(AiSecretRecord {
        id: r.try_get(0)?,
        created: r.try_get(1)?,
        updated_at: r.try_get(2)?,
        org_id: r.try_get(3)?,
        name: r.try_get(4)?,
        secret_type: r.try_get(5)?,
        metadata: metadata_from(r.try_get(6)?),
        preview_secret: r.try_get(7)?,
    })
}

const ENV_COLUMNS: &str = "id, created, org_id, object_type, object_id, name, used";

fn env_from_row(r: &Row) -> Result<EnvVarRecord, StoreError> {
    let ot: String = r.try_get(3)?;
    Ok(EnvVarRecord {
        id: r.try_get(0)?,
        created: r.try_get(1)?,
        org_id: r.try_get(2)?,
        object_type: ObjectType::parse(&ot).unwrap_or(ObjectType::Project),
        object_id: r.try_get(4)?,
        name: r.try_get(5)?,
        used: r.try_get(6)?,
    })
}

type Param = Box<dyn ToSql + Sync + Send>;

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as _).collect()
}

async fn one<T>(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    f: fn(&Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    c.query_opt(sql, params).await?.as_ref().map(f).transpose()
}

/// A filter of a list besides the common ones.
enum Filter {
    Eq(&'static str, String),
    In(&'static str, Vec<String>),
}

/// One page of `table`, newest first, by the common filters plus `extra`.
async fn list_page<T>(
    c: &impl GenericClient,
    table: &str,
    columns: &str,
    q: &ListQuery,
    extra: Vec<Filter>,
    row: fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut params: Vec<Param> = vec![Box::new(q.org_id.clone())];
    let mut sql = format!("SELECT {columns} FROM {table} WHERE org_id = $1");
    let bind = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        format!("${}", params.len())
    };
    if !q.ids.is_empty() {
        let n = bind(&mut params, Box::new(q.ids.clone()));
        sql.push_str(&format!(" AND id = ANY({n})"));
    }
    if let Some(name) = &q.name {
        let n = bind(&mut params, Box::new(name.clone()));
        sql.push_str(&format!(" AND name = {n}"));
    }
    for f in extra {
        match f {
            Filter::Eq(col, v) => {
                let n = bind(&mut params, Box::new(v));
                sql.push_str(&format!(" AND {col} = {n}"));
            }
            Filter::In(col, vs) => {
                let n = bind(&mut params, Box::new(vs));
                sql.push_str(&format!(" AND {col} = ANY({n})"));
            }
        }
    }
    let (cmp, order, reverse) = page_order(&q.page);
    if let (Some(op), Page::After(id) | Page::Before(id)) = (cmp, &q.page) {
        let (created, id) = cursor_position(c, table, id).await?;
        let a = bind(&mut params, Box::new(created));
        let b = bind(&mut params, Box::new(id));
        sql.push_str(&format!(
            " AND (created {op} {a} OR (created = {a} AND id {op} {b}))"
        ));
    }
    let n = bind(&mut params, Box::new(i64::from(q.limit)));
    sql.push_str(&format!(" ORDER BY created {order}, id {order} LIMIT {n}"));
    let mut rows = c
        .query(&sql, &refs(&params))
        .await?
        .iter()
        .map(row)
        .collect::<Result<Vec<_>, _>>()?;
    if reverse {
        rows.reverse();
    }
    Ok(rows)
}

/// Where a cursor stands: its object's (created, id), or for a deleted object the time its
/// UUID v7 encodes.
async fn cursor_position(
    c: &impl GenericClient,
    table: &str,
    id: &str,
) -> Result<(String, String), StoreError> {
    let found = c
        .query_opt(
            &format!("SELECT created FROM {table} WHERE id = $1"),
            &[&id],
        )
        .await?;
    match found {
        Some(r) => Ok((r.try_get(0)?, id.to_owned())),
        None => cursor_of_deleted(id),
    }
}

async fn insert_key(
    tx: &tokio_postgres::Transaction<'_>,
    new: NewApiKey,
) -> Result<ApiKeyRecord, StoreError> {
    let (id, created) = new_id();
    let (per_second, burst) = limit_columns(new.limit);
    tx.execute(
        "INSERT INTO api_keys (id, created, name, preview_name, user_id, org_id, role, digest, routes,
                               rate_per_second, burst)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &id,
            &created,
            &new.name,
            &new.preview_name,
            &new.user_id,
            &new.org_id,
            &new.role.as_str(),
            &new.digest.as_slice(),
            &routes_text(&new.routes),
            &per_second,
            &burst,
        ],
    )
    .await?;
    one(
        tx,
        &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"),
        &[&id],
        key_from_row,
    )
    .await?
    .ok_or_else(|| StoreError::Corrupt("a created key vanished".into()))
}

/// Inserts keys with one statement; returns their records in the order given.
async fn insert_keys(
    tx: &tokio_postgres::Transaction<'_>,
    keys: Vec<NewApiKey>,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let n = keys.len();
    let (mut ids, mut created, mut names, mut previews) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut users, mut orgs, mut roles, mut digests) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut routes, mut rates, mut bursts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for new in keys {
        let (id, at) = new_id();
        let (per_second, burst) = limit_columns(new.limit);
        ids.push(id);
        created.push(at);
        names.push(new.name);
        previews.push(new.preview_name);
        users.push(new.user_id);
        orgs.push(new.org_id);
        roles.push(new.role.as_str());
        digests.push(new.digest.to_vec());
        routes.push(routes_text(&new.routes));
        rates.push(per_second);
        bursts.push(burst);
    }
    let rows = tx
        .query(
            &format!(
                "INSERT INTO api_keys (id, created, name, preview_name, user_id, org_id, role, digest,
                                       routes, rate_per_second, burst)
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                                      $6::TEXT[], $7::TEXT[], $8::BYTEA[], $9::TEXT[],
                                      $10::DOUBLE PRECISION[], $11::BIGINT[])
                 RETURNING {KEY_COLUMNS}"
            ),
            &[
                &ids, &created, &names, &previews, &users, &orgs, &roles, &digests, &routes,
                &rates, &bursts,
            ],
        )
        .await?;
    let mut by_id: std::collections::HashMap<String, ApiKeyRecord> = rows
        .iter()
        .map(|r| key_from_row(r).map(|k| (k.id.clone(), k)))
        .collect::<Result<_, _>>()?;
    ids.iter()
        .map(|id| {
            by_id
                .remove(id)
                .ok_or_else(|| StoreError::Corrupt("a created key vanished".into()))
        })
        .collect()
}

impl KeyLookup for PgStore {
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError> {
        // One statement, so the revision and the row are of the same snapshot.
        let row = self.run(async {
            let c = self.pool.get().await?;
            Ok(c.query_one(
                "SELECT r.n, k.id, k.org_id, k.user_id, k.role, k.digest, k.routes,
                        k.rate_per_second, k.burst
                 FROM revisions r LEFT JOIN api_keys k ON k.digest = $1
                 WHERE r.name = 'keys'",
                &[&digest.as_slice()],
            )
            .await?)
        })?;
        let rev: i64 = row.try_get(0)?;
        let Some(id) = row.try_get::<_, Option<String>>(1)? else {
            return Ok((None, rev.max(0) as u64));
        };
        let stored: Vec<u8> = row.try_get(5)?;
        let role: String = row.try_get(4)?;
        let principal = Principal {
            key_uid: key_uid(&id),
            profile: Arc::new(Profile {
                org_id: row.try_get(2)?,
                user_id: row.try_get(3)?,
                role: Role::parse(&role).unwrap_or(Role::Proxy),
                routes: routes_from(row.try_get(6)?),
                limit: limit_from(row.try_get(7)?, row.try_get(8)?),
            }),
        };
        let matches =
            KeyDigest::try_from(stored).is_ok_and(|s| crate::crypto::digests_equal(&s, digest));
        Ok((matches.then_some(principal), rev.max(0) as u64))
    }
}

impl Store for PgStore {
    fn tenant(&self) -> Result<Tenant, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            let r = c
                .query_one(
                    "SELECT o.id, o.name, u.id FROM orgs o JOIN users u ON u.org_id = o.id
                     ORDER BY o.created, o.id, u.created, u.id LIMIT 1",
                    &[],
                )
                .await?;
            Ok(Tenant {
                org_id: r.try_get(0)?,
                org_name: r.try_get(1)?,
                user_id: r.try_get(2)?,
            })
        })
    }

    fn org_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query_opt("SELECT id FROM orgs WHERE name = $1", &[&name])
                .await?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(Into::into)
        })
    }

    fn create_first_key(&self, new: NewApiKey) -> Result<Option<ApiKeyRecord>, StoreError> {
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| {
            // Instances starting together on an empty database queue here: the first mints
            // the key, the others find it.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            let n: i64 = tx
                .query_one("SELECT COUNT(*) FROM api_keys", &[])
                .await?
                .try_get(0)?;
            if n > 0 {
                return Ok(None);
            }
            let rec = insert_key(tx, new).await?;
            let ev = key_event(&Actor::Keygate, action::KEY_CREATED, &rec);
            append_events(tx, &master, [ev]).await?;
            Ok(Some(rec))
        })
    }

    fn create_api_keys(
        &self,
        keys: Vec<NewApiKey>,
        by: &Actor,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let master = self.sealer.0.clone();
        // Thousands of keys (`keys create --count`) in a few statements, not two round trips
        // each: one INSERT ... SELECT FROM UNNEST per chunk, all in one transaction.
        in_tx!(self, |tx| {
            let mut out = Vec::with_capacity(keys.len());
            let mut keys = keys.into_iter().peekable();
            while keys.peek().is_some() {
                let chunk: Vec<NewApiKey> = keys.by_ref().take(5000).collect();
                out.extend(insert_keys(tx, chunk).await?);
            }
            let events = out.iter().map(|k| key_event(by, action::KEY_CREATED, k));
            append_events(tx, &master, events).await?;
            Ok(out)
        })
    }

    fn list_api_keys(&self, q: &ListQuery) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            list_page(&**c, "api_keys", KEY_COLUMNS, q, Vec::new(), key_from_row).await
        })
    }

    fn get_api_key(&self, org_id: &str, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            one(
                &**c,
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2"),
                &[&org_id, &id],
                key_from_row,
            )
            .await
        })
    }

    fn set_api_key_limit(
        &self,
        org_id: &str,
        id: &str,
        limit: Option<LimitSpec>,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let (per_second, burst) = limit_columns(limit);
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| {
            let n = tx
                .execute(
                    "UPDATE api_keys SET rate_per_second = $3, burst = $4 WHERE org_id = $1 AND id = $2",
                    &[&org_id, &id, &per_second, &burst],
                )
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let rec = one(
                tx,
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"),
                &[&id],
                key_from_row,
            )
            .await?;
            if let Some(k) = &rec {
                append_events(tx, &master, [key_event(by, action::KEY_CHANGED, k)]).await?;
            }
            Ok(rec)
        })
    }

    fn delete_api_key(
        &self,
        org_id: Option<&str>,
        id: &str,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| {
            let rec = one(
                tx,
                &format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND ($2::TEXT IS NULL OR org_id = $2)"
                ),
                &[&id, &org_id],
                key_from_row,
            )
            .await?;
            if let Some(k) = &rec {
                tx.execute("DELETE FROM api_keys WHERE id = $1", &[&id])
                    .await?;
                append_events(tx, &master, [key_event(by, action::KEY_DELETED, k)]).await?;
            }
            Ok(rec)
        })
    }

    fn count_api_keys(&self) -> Result<u64, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM api_keys", &[])
                .await?
                .try_get(0)?;
            Ok(n.max(0) as u64)
        })
    }

    fn flag_exposed(&self, key_id: &str, revoke: bool) -> Result<(), StoreError> {
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| {
            let n = tx
                .execute(
                    "UPDATE api_keys SET exposed = $2 WHERE id = $1 AND exposed IS NULL",
                    &[&key_id, &now_rfc3339()],
                )
                .await?;
            let rec = one(
                tx,
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"),
                &[&key_id],
                key_from_row,
            )
            .await?;
            if let Some(k) = &rec {
                let events = exposed_events(k, n > 0, revoke);
                if revoke {
                    tx.execute("DELETE FROM api_keys WHERE id = $1", &[&key_id])
                        .await?;
                }
                append_events(tx, &master, events).await?;
            }
            Ok(())
        })
    }

    fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = usage.iter().map(|u| u.key_id.clone()).collect();
        let times: Vec<String> = usage
            .iter()
            .map(|u| crate::usage::format_ms(u.last_used_ms))
            .collect();
        let requests: Vec<i64> = usage
            .iter()
            .map(|u| i64::try_from(u.requests).unwrap_or(i64::MAX))
            .collect();
        let limited: Vec<i64> = usage
            .iter()
            .map(|u| i64::try_from(u.rate_limited).unwrap_or(i64::MAX))
            .collect();
        // One statement for the whole flush; GREATEST ignores NULL, so a first use sets it.
        self.run(async {
            let c = self.pool.get().await?;
            c.execute(
                "UPDATE api_keys AS k SET
                   last_used = GREATEST(k.last_used, u.t COLLATE \"C\"),
                   request_count = k.request_count + u.n,
                   rate_limited_count = k.rate_limited_count + u.l
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS u(id, t, n, l)
                 WHERE k.id = u.id",
                &[&ids, &times, &requests, &limited],
            )
            .await?;
            Ok(())
        })
    }

    fn list_ai_secrets(
        &self,
        q: &ListQuery,
        types: &[String],
    ) -> Result<Vec<AiSecretRecord>, StoreError> {
        let mut extra = Vec::new();
        if !types.is_empty() {
            extra.push(Filter::In("type", types.to_vec()));
        }
        self.run(async {
            let c = self.pool.get().await?;
            list_page(
                &**c,
                "ai_secrets",
                SECRET_COLUMNS,
                q,
                extra,
                secret_from_row,
            )
            .await
        })
    }

    fn get_ai_secret(&self, org_id: &str, id: &str) -> Result<Option<AiSecretRecord>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            one(
                &**c,
                &format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = $1 AND id = $2"),
                &[&org_id, &id],
                secret_from_row,
            )
            .await
        })
    }

    fn write_ai_secret(
        &self,
        org_id: &str,
        w: AiSecretWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<AiSecretRecord, StoreError> {
        let sealer = self.sealer.clone();
        in_tx!(self, |tx| {
            let by_name =
                format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = $1 AND name = $2 FOR UPDATE");
            let existing = one(tx, &by_name, &[&org_id, &w.name], secret_from_row).await?;
            let done = match plan_secret_write(existing, &w, mode) {
                Planned::Existing(rec) => return Ok(rec),
                Planned::Update {
                    id,
                    secret_type,
                    metadata,
                } => {
                    tx.execute(
                        "UPDATE ai_secrets SET updated_at = $2, type = $3, metadata = $4 WHERE id = $1",
                        &[&id, &now_rfc3339(), &secret_type, &metadata],
                    )
                    .await?;
                    if let Some(secret) = &w.secret {
                        let sealed = sealer.seal(Sealed::AiSecret, &id, secret)?;
                        tx.execute(
                            "UPDATE ai_secrets SET sealed = $2, preview_secret = $3 WHERE id = $1",
                            &[&id, &sealed, &secret.preview("")],
                        )
                        .await?;
                    }
                    secret_write_action(mode)
                }
                Planned::Insert => {
                    let (id, created) = new_id();
                    let sealed = w
                        .secret
                        .as_ref()
                        .map(|s| sealer.seal(Sealed::AiSecret, &id, s))
                        .transpose()?;
                    tx.execute(
                        "INSERT INTO ai_secrets (id, created, updated_at, org_id, name, type, metadata, sealed, preview_secret)
                         VALUES ($1, $2, $2, $3, $4, $5, $6, $7, $8)",
                        &[
                            &id,
                            &created,
                            &org_id,
                            &w.name,
                            &w.secret_type,
                            &metadata_text(&w.metadata),
                            &sealed,
                            &w.secret.as_ref().map(|s| s.preview("")),
                        ],
                    )
                    .await?;
                    action::SECRET_CREATED
                }
            };
            let rec = one(tx, &by_name, &[&org_id, &w.name], secret_from_row)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt("ai_secret vanished inside its transaction".into())
                })?;
            append_events(tx, &sealer.0, [secret_event(by, done, &rec)]).await?;
            Ok(rec)
        })
    }

    fn patch_ai_secret(
        &self,
        org_id: &str,
        id: &str,
        p: AiSecretPatch,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError> {
        let sealer = self.sealer.clone();
        in_tx!(self, |tx| {
            let by_id = format!(
                "SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = $1 AND id = $2 FOR UPDATE"
            );
            let Some(rec) = one(tx, &by_id, &[&org_id, &id], secret_from_row).await? else {
                return Ok(None);
            };
            if let Some(name) = p.name.as_ref().filter(|n| **n != rec.name) {
                let taken = tx
                    .query_opt(
                        "SELECT id FROM ai_secrets WHERE org_id = $1 AND name = $2",
                        &[&org_id, name],
                    )
                    .await?;
                if taken.is_some() {
                    return Err(name_taken("ai_secret", name));
                }
            }
            let (name, secret_type, metadata) = patched_secret(&rec, &p);
            tx.execute(
                "UPDATE ai_secrets SET updated_at = $2, name = $3, type = $4, metadata = $5 WHERE id = $1",
                &[&id, &now_rfc3339(), &name, &secret_type, &metadata],
            )
            .await?;
            if let Some(secret) = &p.secret {
                let sealed = sealer.seal(Sealed::AiSecret, id, secret)?;
                tx.execute(
                    "UPDATE ai_secrets SET sealed = $2, preview_secret = $3 WHERE id = $1",
                    &[&id, &sealed, &secret.preview("")],
                )
                .await?;
            }
            let out = one(tx, &by_id, &[&org_id, &id], secret_from_row).await?;
            if let Some(rec) = &out {
                let ev = secret_event(by, action::SECRET_CHANGED, rec);
                append_events(tx, &sealer.0, [ev]).await?;
            }
            Ok(out)
        })
    }

    fn delete_ai_secret(
        &self,
        org_id: &str,
        r: SecretRef<'_>,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError> {
        let master = self.sealer.0.clone();
        let (col, val) = match r {
            SecretRef::Id(id) => ("id", id),
            SecretRef::Name(name) => ("name", name),
        };
        in_tx!(self, |tx| {
            let rec = one(
                tx,
                &format!(
                    "SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = $1 AND {col} = $2 FOR UPDATE"
                ),
                &[&org_id, &val],
                secret_from_row,
            )
            .await?;
            if let Some(r) = &rec {
                tx.execute("DELETE FROM ai_secrets WHERE id = $1", &[&r.id])
                    .await?;
                append_events(tx, &master, [secret_event(by, action::SECRET_DELETED, r)]).await?;
            }
            Ok(rec)
        })
    }

    fn ai_secret_value(
        &self,
        org_id: &str,
        name: &str,
    ) -> Result<Option<(AiSecretRecord, Secret)>, StoreError> {
        let row = self.run(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                &format!(
                    "SELECT {SECRET_COLUMNS}, sealed FROM ai_secrets WHERE org_id = $1 AND name = $2"
                ),
                &[&org_id, &name],
            )
            .await?)
        })?;
        let Some(row) = row else { return Ok(None) };
        let rec = secret_from_row(&row)?;
        let Some(sealed) = row.try_get::<_, Option<Vec<u8>>>(8)? else {
            return Ok(None);
        };
        let value = self.sealer.open(Sealed::AiSecret, &rec.id, &sealed)?;
        Ok(Some((rec, value)))
    }

    fn list_env_vars(
        &self,
        q: &ListQuery,
        f: &EnvVarFilter,
    ) -> Result<Vec<EnvVarRecord>, StoreError> {
        let mut extra = Vec::new();
        if let Some(t) = f.object_type {
            extra.push(Filter::Eq("object_type", t.as_str().to_owned()));
        }
        if let Some(id) = &f.object_id {
            extra.push(Filter::Eq("object_id", id.clone()));
        }
        self.run(async {
            let c = self.pool.get().await?;
            list_page(&**c, "env_vars", ENV_COLUMNS, q, extra, env_from_row).await
        })
    }

    fn get_env_var(&self, org_id: &str, id: &str) -> Result<Option<EnvVarRecord>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            one(
                &**c,
                &format!("SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = $1 AND id = $2"),
                &[&org_id, &id],
                env_from_row,
            )
            .await
        })
    }

    fn write_env_var(
        &self,
        org_id: &str,
        w: EnvVarWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<EnvVarRecord, StoreError> {
        let sealer = self.sealer.clone();
        in_tx!(self, |tx| {
            let by_name = format!(
                "SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = $1 AND object_type = $2 AND object_id = $3 AND name = $4 FOR UPDATE"
            );
            let ot = w.object_type.as_str();
            let key: [&(dyn ToSql + Sync); 4] = [&org_id, &ot, &w.object_id, &w.name];
            let done = match (one(tx, &by_name, &key, env_from_row).await?, mode) {
                (Some(rec), WriteMode::CreateOrGet) => return Ok(rec),
                (Some(rec), WriteMode::Replace | WriteMode::SetValue) => {
                    if let Some(v) = &w.value {
                        let sealed = sealer.seal(Sealed::EnvVar, &rec.id, v)?;
                        tx.execute(
                            "UPDATE env_vars SET sealed = $2 WHERE id = $1",
                            &[&rec.id, &sealed],
                        )
                        .await?;
                    }
                    action::ENV_VAR_REPLACED
                }
                (None, _) => {
                    let (id, created) = new_id();
                    let sealed = w
                        .value
                        .as_ref()
                        .map(|v| sealer.seal(Sealed::EnvVar, &id, v))
                        .transpose()?;
                    tx.execute(
                        "INSERT INTO env_vars (id, created, org_id, object_type, object_id, name, sealed)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        &[&id, &created, &org_id, &ot, &w.object_id, &w.name, &sealed],
                    )
                    .await?;
                    action::ENV_VAR_CREATED
                }
            };
            let rec = one(tx, &by_name, &key, env_from_row)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt("env_var vanished inside its transaction".into())
                })?;
            append_events(tx, &sealer.0, [env_event(by, done, &rec)]).await?;
            Ok(rec)
        })
    }

    fn patch_env_var(
        &self,
        org_id: &str,
        id: &str,
        name: &str,
        value: Option<Secret>,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError> {
        let sealer = self.sealer.clone();
        in_tx!(self, |tx| {
            let by_id = format!(
                "SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = $1 AND id = $2 FOR UPDATE"
            );
            let Some(rec) = one(tx, &by_id, &[&org_id, &id], env_from_row).await? else {
                return Ok(None);
            };
            if name != rec.name {
                let taken = tx
                    .query_opt(
                        "SELECT id FROM env_vars WHERE org_id = $1 AND object_type = $2 AND object_id = $3 AND name = $4",
                        &[&org_id, &rec.object_type.as_str(), &rec.object_id, &name],
                    )
                    .await?;
                if taken.is_some() {
                    return Err(name_taken("env_var", name));
                }
                tx.execute("UPDATE env_vars SET name = $2 WHERE id = $1", &[&id, &name])
                    .await?;
            }
            if let Some(v) = &value {
                let sealed = sealer.seal(Sealed::EnvVar, id, v)?;
                tx.execute(
                    "UPDATE env_vars SET sealed = $2 WHERE id = $1",
                    &[&id, &sealed],
                )
                .await?;
            }
            let out = one(tx, &by_id, &[&org_id, &id], env_from_row).await?;
            if let Some(rec) = &out {
                let ev = env_event(by, action::ENV_VAR_CHANGED, rec);
                append_events(tx, &sealer.0, [ev]).await?;
            }
            Ok(out)
        })
    }

    fn delete_env_var(
        &self,
        org_id: &str,
        id: &str,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError> {
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| {
            let rec = one(
                tx,
                &format!(
                    "SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = $1 AND id = $2 FOR UPDATE"
                ),
                &[&org_id, &id],
                env_from_row,
            )
            .await?;
            if let Some(r) = &rec {
                tx.execute("DELETE FROM env_vars WHERE id = $1", &[&id])
                    .await?;
                append_events(tx, &master, [env_event(by, action::ENV_VAR_DELETED, r)]).await?;
            }
            Ok(rec)
        })
    }

    fn env_var_values(
        &self,
        org_id: &str,
        scopes: &[(ObjectType, String)],
    ) -> Result<Vec<(EnvVarRecord, Secret)>, StoreError> {
        let rows = self.run(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare(&format!(
                    "SELECT {ENV_COLUMNS}, sealed FROM env_vars
                     WHERE org_id = $1 AND object_type = $2 AND object_id = $3 AND sealed IS NOT NULL
                     ORDER BY created, id"
                ))
                .await?;
            let mut rows = Vec::new();
            for (ot, oid) in scopes {
                rows.extend(c.query(&stmt, &[&org_id, &ot.as_str(), oid]).await?);
            }
            Ok(rows)
        })?;
        rows.iter()
            .map(|r| {
                let rec = env_from_row(r)?;
                let sealed: Vec<u8> = r.try_get(7)?;
                let value = self.sealer.open(Sealed::EnvVar, &rec.id, &sealed)?;
                Ok((rec, value))
            })
            .collect()
    }

    fn mark_env_vars_used(&self, org_id: &str, ids: &[String]) -> Result<(), StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            c.execute(
                "UPDATE env_vars SET used = $3 WHERE org_id = $1 AND id = ANY($2)",
                &[&org_id, &ids, &now_rfc3339()],
            )
            .await?;
            Ok(())
        })
    }

    fn revisions(&self) -> Result<Revisions, StoreError> {
        let rows = self.run(async {
            let c = self.pool.get().await?;
            Ok(c.query("SELECT name, n FROM revisions", &[]).await?)
        })?;
        let mut rev = Revisions::default();
        for r in rows {
            let name: String = r.try_get(0)?;
            let n = r.try_get::<_, i64>(1)?.max(0) as u64;
            match name.as_str() {
                "keys" => rev.keys = n,
                "secrets" => rev.secrets = n,
                "env_vars" => rev.env_vars = n,
                _ => {}
            }
        }
        Ok(rev)
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }

    fn record_event(&self, ev: NewEvent) -> Result<(), StoreError> {
        let master = self.sealer.0.clone();
        in_tx!(self, |tx| { append_events(tx, &master, [ev]).await })
    }

    fn audit_events(&self, q: &AuditQuery) -> Result<Vec<Event>, StoreError> {
        let (cmp, order, reverse) = page_order(&q.page);
        self.run(async {
            let c = self.pool.get().await?;
            let cursor: Option<i64> = match &q.page {
                Page::First => None,
                Page::After(id) | Page::Before(id) => Some(
                    c.query_opt("SELECT seq FROM audit_events WHERE id = $1", &[id])
                        .await?
                        .ok_or_else(|| StoreError::UnknownCursor(id.clone()))?
                        .try_get(0)?,
                ),
            };
            let rows = c
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM audit_events
                         WHERE (org_id = $1 OR org_id IS NULL) AND ($2::BIGINT IS NULL OR seq {} $2)
                         ORDER BY seq {order} LIMIT $3",
                        cmp.unwrap_or("<")
                    ),
                    &[&q.org_id, &cursor, &i64::from(q.limit)],
                )
                .await?;
            let mut out = rows
                .iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            if reverse {
                out.reverse();
            }
            Ok(out)
        })
    }

    fn audit_trail(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
                    ),
                    &[&after_seq, &i64::from(limit)],
                )
                .await?;
            rows.iter().map(event_from_row).collect()
        })
    }

    fn audit_head(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query_opt("SELECT v FROM meta WHERE k = 'audit_head'", &[])
                .await?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(Into::into)
        })
    }

    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "postgres",
            location: self.location.clone(),
            notifications: Some(self.listening.load(Ordering::Acquire)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_split_with_escapes() {
        assert_eq!(
            split_passfile_line(r"db\:host:5432:*:u:p\:w:x"),
            vec!["db:host", "5432", "*", "u", "p:w:x"]
        );
    }

    #[test]
    fn settings_never_show_the_password() {
        let s = PgSettings::from_url(
            "postgres://alice:Sup3rSecretPw@db.internal:6543/kg",
            None,
            4,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(s.location(), "db.internal:6543/kg");
        assert!(!format!("{s:?}").contains("Sup3rSecretPw"));
        let err = PgSettings::from_url(
            "postgres://a:Sup3rSecretPw@h:notaport/x",
            None,
            4,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("Sup3rSecretPw"), "{err}");
    }
}
