//! The embedded store: one SQLite file in WAL mode, shared safely by a running server and the
//! CLI (each opens its own connection; SQLite serialises writers, `busy_timeout` waits).
//!
//! `synchronous = FULL` because writes are rare (key and secret management) and a committed key
//! or secret must survive a power cut as well as a `kill -9`. Every write is one transaction.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{
    params, params_from_iter, Connection, OptionalExtension, Row, Transaction, TransactionBehavior,
};

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

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // Busy or locked past `busy_timeout`: another writer holds the file; try again later.
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

/// The schema, as numbered migrations applied in order (`PRAGMA user_version` records the
/// last one applied). Version 1 is the schema as first released.
const MIGRATIONS: &[(i64, &str)] = &[(1, SCHEMA_V1), (2, SCHEMA_V2), (3, SCHEMA_V3)];

/// Version 3: key usage (flushed in batches, never by the hot path; no trigger counts it as a
/// change) and the audit trail (see `crate::audit`).
const SCHEMA_V3: &str = r#"
ALTER TABLE api_keys ADD COLUMN last_used TEXT;
ALTER TABLE api_keys ADD COLUMN request_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN rate_limited_count INTEGER NOT NULL DEFAULT 0;
CREATE TABLE audit_events (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  org_id TEXT,
  actor_type TEXT NOT NULL,
  actor_id TEXT NOT NULL,
  actor_name TEXT NOT NULL,
  action TEXT NOT NULL,
  object_type TEXT NOT NULL,
  object_id TEXT NOT NULL,
  object_name TEXT NOT NULL,
  outcome TEXT NOT NULL,
  mac BLOB NOT NULL
);
"#;

/// Version 2: stamping `exposed` on a key or `used` on an env var no longer counts as a change
/// (it changes nothing the data plane uses), so it does not flush every key cache.
const SCHEMA_V2: &str = r#"
DROP TRIGGER IF EXISTS api_keys_upd;
CREATE TRIGGER api_keys_upd AFTER UPDATE ON api_keys
  WHEN OLD.digest IS NOT NEW.digest OR OLD.org_id IS NOT NEW.org_id
    OR OLD.user_id IS NOT NEW.user_id OR OLD.role IS NOT NEW.role
    OR OLD.routes IS NOT NEW.routes OR OLD.rate_per_second IS NOT NEW.rate_per_second
    OR OLD.burst IS NOT NEW.burst OR OLD.name IS NOT NEW.name
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'keys'; END;
DROP TRIGGER IF EXISTS env_vars_upd;
CREATE TRIGGER env_vars_upd AFTER UPDATE ON env_vars
  WHEN OLD.sealed IS NOT NEW.sealed OR OLD.name IS NOT NEW.name
    OR OLD.org_id IS NOT NEW.org_id OR OLD.object_type IS NOT NEW.object_type
    OR OLD.object_id IS NOT NEW.object_id
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'env_vars'; END;
"#;

const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO revisions (name, n) VALUES ('keys', 0), ('secrets', 0), ('env_vars', 0);
CREATE TABLE IF NOT EXISTS orgs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
  id TEXT PRIMARY KEY, org_id TEXT NOT NULL REFERENCES orgs(id),
  email TEXT, given_name TEXT, family_name TEXT, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  name TEXT NOT NULL,
  preview_name TEXT NOT NULL,
  user_id TEXT NOT NULL REFERENCES users(id),
  org_id TEXT NOT NULL REFERENCES orgs(id),
  role TEXT NOT NULL CHECK (role IN ('admin', 'proxy')),
  digest BLOB NOT NULL UNIQUE,
  exposed TEXT,
  routes TEXT,
  rate_per_second REAL,
  burst INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_list ON api_keys (org_id, created DESC, id DESC);
CREATE TABLE IF NOT EXISTS ai_secrets (
  id TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  org_id TEXT NOT NULL REFERENCES orgs(id),
  name TEXT NOT NULL,
  type TEXT,
  metadata TEXT,
  sealed BLOB,
  preview_secret TEXT,
  UNIQUE (org_id, name)
);
CREATE INDEX IF NOT EXISTS ai_secrets_list ON ai_secrets (org_id, created DESC, id DESC);
CREATE TABLE IF NOT EXISTS env_vars (
  id TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  org_id TEXT NOT NULL REFERENCES orgs(id),
  object_type TEXT NOT NULL CHECK (object_type IN ('organization', 'project', 'function')),
  object_id TEXT NOT NULL,
  name TEXT NOT NULL,
  sealed BLOB,
  used TEXT,
  UNIQUE (org_id, object_type, object_id, name)
);
CREATE INDEX IF NOT EXISTS env_vars_list ON env_vars (org_id, created DESC, id DESC);
CREATE TRIGGER IF NOT EXISTS api_keys_ins AFTER INSERT ON api_keys
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'keys'; END;
CREATE TRIGGER IF NOT EXISTS api_keys_upd AFTER UPDATE ON api_keys
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'keys'; END;
CREATE TRIGGER IF NOT EXISTS api_keys_del AFTER DELETE ON api_keys
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'keys'; END;
CREATE TRIGGER IF NOT EXISTS ai_secrets_ins AFTER INSERT ON ai_secrets
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'secrets'; END;
CREATE TRIGGER IF NOT EXISTS ai_secrets_upd AFTER UPDATE ON ai_secrets
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'secrets'; END;
CREATE TRIGGER IF NOT EXISTS ai_secrets_del AFTER DELETE ON ai_secrets
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'secrets'; END;
CREATE TRIGGER IF NOT EXISTS env_vars_ins AFTER INSERT ON env_vars
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'env_vars'; END;
CREATE TRIGGER IF NOT EXISTS env_vars_upd AFTER UPDATE ON env_vars
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'env_vars'; END;
CREATE TRIGGER IF NOT EXISTS env_vars_del AFTER DELETE ON env_vars
  BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'env_vars'; END;
"#;

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    sealer: Sealer,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// Makes the database file (created empty here when missing) and its `-wal` and `-shm`
/// companions readable by their owner only: they hold sealed secrets and key digests. SQLite
/// creates the companions with the database file's mode, so a new store is 0600 throughout;
/// an existing one with wider modes is narrowed.
fn owner_only(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |source| StoreError::Dir {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            let Ok(meta) = std::fs::metadata(file) else {
                continue;
            };
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
                tracing::warn!(file = %file.display(), "store file was readable by others; narrowed to 0600");
            }
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating when missing) the store at `path`, and checks that `master` is the key
    /// this store was created with.
    pub fn open(path: &Path, master: Arc<MasterKey>) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                // The store holds sealed secrets and key digests: keep it to its owner.
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        owner_only(path)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let sealer = Sealer(master);
        let tx = immediate(&mut conn)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = MIGRATIONS.last().map_or(0, |m| m.0);
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        // The master key is checked before anything is migrated or written.
        if version > 0 {
            check_or_set_fingerprint(&tx, &sealer.fingerprint())?;
        }
        for (n, sql) in MIGRATIONS.iter().filter(|m| m.0 > version) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", n)?;
        }
        check_or_set_fingerprint(&tx, &sealer.fingerprint())?;
        ensure_tenant(&tx)?;
        tx.commit()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            sealer,
            path: path.to_path_buf(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written transaction (rusqlite rolls
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_or_set_fingerprint(tx: &Transaction<'_>, fp: &[u8; 32]) -> Result<(), StoreError> {
    let stored: Option<Vec<u8>> = tx
        .query_row(
            "SELECT v FROM meta WHERE k = 'master_key_fingerprint'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if fingerprint_missing(stored.as_deref(), fp)? {
        tx.execute(
            "INSERT INTO meta (k, v) VALUES ('master_key_fingerprint', ?1)",
            params![fp.as_slice()],
        )?;
    }
    Ok(())
}

fn ensure_tenant(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM orgs", [], |r| r.get(0))?;
    if n == 0 {
        let t = NewTenant::generate();
        tx.execute(
            "INSERT INTO orgs (id, name, created) VALUES (?1, ?2, ?3)",
            params![t.org_id, t.org_name, t.created],
        )?;
        tx.execute(
            "INSERT INTO users (id, org_id, created) VALUES (?1, ?2, ?3)",
            params![t.user_id, t.org_id, t.created],
        )?;
    }
    Ok(())
}

fn tenant_in(conn: &Connection) -> Result<Tenant, StoreError> {
    Ok(conn.query_row(
        "SELECT o.id, o.name, u.id FROM orgs o JOIN users u ON u.org_id = o.id
         ORDER BY o.created, o.id, u.created, u.id LIMIT 1",
        [],
        |r| {
            Ok(Tenant {
                org_id: r.get(0)?,
                org_name: r.get(1)?,
                user_id: r.get(2)?,
            })
        },
    )?)
}

// ---------------------------------------------------------------------------------------------
// Rows.

const KEY_COLUMNS: &str =
    "id, created, name, preview_name, user_id, org_id, role, exposed, routes, \
     rate_per_second, burst, last_used, request_count, rate_limited_count";

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    let role: String = r.get(6)?;
    Ok(ApiKeyRecord {
        id: r.get(0)?,
        created: r.get(1)?,
        name: r.get(2)?,
        preview_name: r.get(3)?,
        user_id: r.get(4)?,
        org_id: r.get(5)?,
        // The CHECK constraint keeps other values out; map defensively to the weaker role.
        role: Role::parse(&role).unwrap_or(Role::Proxy),
        exposed: r.get(7)?,
        routes: routes_from(r.get(8)?),
        limit: limit_from(r.get(9)?, r.get(10)?),
        last_used: r.get(11)?,
        request_count: r.get::<_, i64>(12)?.max(0) as u64,
        rate_limited_count: r.get::<_, i64>(13)?.max(0) as u64,
    })
}

const EVENT_COLUMNS: &str = "seq, id, created, org_id, actor_type, actor_id, actor_name, action, \
     object_type, object_id, object_name, outcome, mac";

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    let kind: String = r.get(4)?;
    Ok(Event {
        seq: r.get(0)?,
        id: r.get(1)?,
        created: r.get(2)?,
        org_id: r.get(3)?,
        actor: Actor::from_parts(&kind, r.get(5)?, r.get(6)?),
        action: r.get(7)?,
        object_type: r.get(8)?,
        object_id: r.get(9)?,
        object_name: r.get(10)?,
        outcome: r.get(11)?,
        mac: r.get(12)?,
    })
}

/// Appends `events` to the audit trail inside `tx`, the transaction of the change they
/// record: each chained to the one before, then the head record moved to the last.
fn append_events(
    tx: &Transaction<'_>,
    master: &MasterKey,
    events: impl IntoIterator<Item = NewEvent>,
) -> Result<(), StoreError> {
    let mut prev: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let mut last = None;
    for new in events {
        let ev = Event::seal(master, prev.as_ref().map(|(s, m)| (*s, m.as_slice())), new);
        let (kind, actor_id, actor_name) = ev.actor.parts();
        tx.prepare_cached(&format!(
            "INSERT INTO audit_events ({EVENT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ))?
        .execute(params![
            ev.seq,
            ev.id,
            ev.created,
            ev.org_id,
            kind,
            actor_id,
            actor_name,
            ev.action,
            ev.object_type,
            ev.object_id,
            ev.object_name,
            ev.outcome,
            ev.mac
        ])?;
        prev = Some((ev.seq, ev.mac.clone()));
        last = Some(ev);
    }
    if let Some(ev) = last {
        tx.prepare_cached(
            "INSERT INTO meta (k, v) VALUES ('audit_head', ?1)
             ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )?
        .execute([head_record(master, &ev)])?;
    }
    Ok(())
}

const SECRET_COLUMNS: &str =
    "id, created, updated_at, org_id, name, type, metadata, preview_secret";

fn secret_from_row(r: &Row<'_>) -> rusqlite::Result<AiSecretRecord> {
    let metadata: Option<String> = r.get(6)?;
    Ok(AiSecretRecord {
        id: r.get(0)?,
        created: r.get(1)?,
        updated_at: r.get(2)?,
        org_id: r.get(3)?,
        name: r.get(4)?,
        secret_type: r.get(5)?,
        metadata: metadata_from(metadata),
        preview_secret: r.get(7)?,
    })
}

const ENV_COLUMNS: &str = "id, created, org_id, object_type, object_id, name, used";

fn env_from_row(r: &Row<'_>) -> rusqlite::Result<EnvVarRecord> {
    let ot: String = r.get(3)?;
    Ok(EnvVarRecord {
        id: r.get(0)?,
        created: r.get(1)?,
        org_id: r.get(2)?,
        object_type: ObjectType::parse(&ot).unwrap_or(ObjectType::Project),
        object_id: r.get(4)?,
        name: r.get(5)?,
        used: r.get(6)?,
    })
}

fn one<T>(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    Ok(conn.query_row(sql, p, f).optional()?)
}

fn revision(conn: &Connection, name: &str) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row("SELECT n FROM revisions WHERE name = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok(n.max(0) as u64)
}

/// One page of `table`, newest first, by the common filters plus `extra` (SQL, values).
fn list_page<T>(
    conn: &Connection,
    table: &str,
    columns: &str,
    q: &ListQuery,
    extra: Vec<(String, Vec<Value>)>,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut sql = format!("SELECT {columns} FROM {table} WHERE org_id = ?");
    let mut values: Vec<Value> = vec![Value::Text(q.org_id.clone())];
    if !q.ids.is_empty() {
        sql.push_str(&format!(
            " AND id IN ({})",
            vec!["?"; q.ids.len()].join(", ")
        ));
        values.extend(q.ids.iter().cloned().map(Value::Text));
    }
    if let Some(name) = &q.name {
        sql.push_str(" AND name = ?");
        values.push(Value::Text(name.clone()));
    }
    for (clause, vals) in extra {
        sql.push_str(" AND ");
        sql.push_str(&clause);
        values.extend(vals);
    }
    let (cmp, order, reverse) = page_order(&q.page);
    if let (Some(op), Page::After(id) | Page::Before(id)) = (cmp, &q.page) {
        let (created, id) = cursor_position(conn, table, id)?;
        sql.push_str(&format!(
            " AND (created {op} ? OR (created = ? AND id {op} ?))"
        ));
        values.extend([
            Value::Text(created.clone()),
            Value::Text(created),
            Value::Text(id),
        ]);
    }
    sql.push_str(&format!(" ORDER BY created {order}, id {order} LIMIT ?"));
    values.push(Value::Integer(q.limit as i64));
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt
        .query_map(params_from_iter(values), row)?
        .collect::<Result<Vec<_>, _>>()?;
    if reverse {
        rows.reverse();
    }
    Ok(rows)
}

/// Where a cursor stands: its object's (created, id), or for a deleted object the time its
/// UUID v7 encodes.
fn cursor_position(
    conn: &Connection,
    table: &str,
    id: &str,
) -> Result<(String, String), StoreError> {
    let found: Option<String> = conn
        .query_row(
            &format!("SELECT created FROM {table} WHERE id = ?1"),
            [id],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(created) = found {
        return Ok((created, id.to_owned()));
    }
    cursor_of_deleted(id)
}

/// Inserts a key (statements cached per connection: a batch of a million keys prepares once).
fn insert_key(tx: &Transaction<'_>, new: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
    let (id, created) = new_id();
    let (per_second, burst) = limit_columns(new.limit);
    tx.prepare_cached(
        "INSERT INTO api_keys (id, created, name, preview_name, user_id, org_id, role, digest, routes,
                               rate_per_second, burst)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        id,
        created,
        new.name,
        new.preview_name,
        new.user_id,
        new.org_id,
        new.role.as_str(),
        new.digest.as_slice(),
        routes_text(&new.routes),
        per_second,
        burst
    ])?;
    Ok(tx
        .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))?
        .query_row([&id], key_from_row)?)
}

impl KeyLookup for SqliteStore {
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError> {
        let mut conn = self.conn();
        // One read transaction, so the revision and the row are of the same moment.
        let tx = conn.transaction()?;
        let rev = revision(&tx, "keys")?;
        let found = tx
            .query_row(
                "SELECT id, org_id, user_id, role, digest, routes, rate_per_second, burst
                 FROM api_keys WHERE digest = ?1",
                [digest.as_slice()],
                |r| {
                    let role: String = r.get(3)?;
                    let stored: Vec<u8> = r.get(4)?;
                    Ok((
                        Principal {
                            key_uid: key_uid(&r.get::<_, String>(0)?),
                            profile: Arc::new(Profile {
                                org_id: r.get(1)?,
                                user_id: r.get(2)?,
                                role: Role::parse(&role).unwrap_or(Role::Proxy),
                                routes: routes_from(r.get(5)?),
                                limit: limit_from(r.get(6)?, r.get(7)?),
                            }),
                        },
                        stored,
                    ))
                },
            )
            .optional()?;
        tx.commit()?;
        let principal = found.and_then(|(p, stored)| {
            let stored: KeyDigest = stored.try_into().ok()?;
            crate::crypto::digests_equal(&stored, digest).then_some(p)
        });
        Ok((principal, rev))
    }
}

impl Store for SqliteStore {
    fn tenant(&self) -> Result<Tenant, StoreError> {
        tenant_in(&self.conn())
    }

    fn org_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT id FROM orgs WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    fn create_api_keys(
        &self,
        keys: Vec<NewApiKey>,
        by: &Actor,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let out = keys
            .into_iter()
            .map(|new| insert_key(&tx, new))
            .collect::<Result<Vec<_>, _>>()?;
        append_events(
            &tx,
            &self.sealer.0,
            out.iter().map(|k| key_event(by, action::KEY_CREATED, k)),
        )?;
        tx.commit()?;
        Ok(out)
    }

    fn create_first_key(&self, new: NewApiKey) -> Result<Option<ApiKeyRecord>, StoreError> {
        // One IMMEDIATE transaction: a second process starting on the same file waits for the
        // first one's commit, then sees its key.
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let n: i64 = tx.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
        if n > 0 {
            return Ok(None);
        }
        let rec = insert_key(&tx, new)?;
        append_events(
            &tx,
            &self.sealer.0,
            [key_event(&Actor::Keygate, action::KEY_CREATED, &rec)],
        )?;
        tx.commit()?;
        Ok(Some(rec))
    }

    fn list_api_keys(&self, q: &ListQuery) -> Result<Vec<ApiKeyRecord>, StoreError> {
        list_page(
            &self.conn(),
            "api_keys",
            KEY_COLUMNS,
            q,
            Vec::new(),
            key_from_row,
        )
    }

    fn get_api_key(&self, org_id: &str, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        one(
            &self.conn(),
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = ?1 AND id = ?2"),
            [org_id, id],
            key_from_row,
        )
    }

    fn set_api_key_limit(
        &self,
        org_id: &str,
        id: &str,
        limit: Option<LimitSpec>,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let (per_second, burst) = limit_columns(limit);
        let n = tx.execute(
            "UPDATE api_keys SET rate_per_second = ?3, burst = ?4 WHERE org_id = ?1 AND id = ?2",
            params![org_id, id, per_second, burst],
        )?;
        let rec = if n == 0 {
            None
        } else {
            one(
                &tx,
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_from_row,
            )?
        };
        if let Some(k) = &rec {
            append_events(&tx, &self.sealer.0, [key_event(by, action::KEY_CHANGED, k)])?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn delete_api_key(
        &self,
        org_id: Option<&str>,
        id: &str,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let rec = one(
            &tx,
            &format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)"
            ),
            params![id, org_id],
            key_from_row,
        )?;
        if let Some(k) = &rec {
            tx.execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
            append_events(&tx, &self.sealer.0, [key_event(by, action::KEY_DELETED, k)])?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn count_api_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    fn flag_exposed(&self, key_id: &str, revoke: bool) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let n = tx.execute(
            "UPDATE api_keys SET exposed = ?2 WHERE id = ?1 AND exposed IS NULL",
            params![key_id, now_rfc3339()],
        )?;
        let rec = one(
            &tx,
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
            [key_id],
            key_from_row,
        )?;
        if let Some(k) = &rec {
            let events = exposed_events(k, n > 0, revoke);
            if revoke {
                tx.execute("DELETE FROM api_keys WHERE id = ?1", [key_id])?;
            }
            append_events(&tx, &self.sealer.0, events)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        for u in usage {
            tx.prepare_cached(
                "UPDATE api_keys SET
                   last_used = CASE WHEN last_used IS NULL OR last_used < ?2 THEN ?2 ELSE last_used END,
                   request_count = request_count + ?3,
                   rate_limited_count = rate_limited_count + ?4
                 WHERE id = ?1",
            )?
            .execute(params![
                u.key_id,
                crate::usage::format_ms(u.last_used_ms),
                i64::try_from(u.requests).unwrap_or(i64::MAX),
                i64::try_from(u.rate_limited).unwrap_or(i64::MAX)
            ])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn list_ai_secrets(
        &self,
        q: &ListQuery,
        types: &[String],
    ) -> Result<Vec<AiSecretRecord>, StoreError> {
        let mut extra = Vec::new();
        if !types.is_empty() {
            extra.push((
                format!("type IN ({})", vec!["?"; types.len()].join(", ")),
                types.iter().cloned().map(Value::Text).collect(),
            ));
        }
        list_page(
            &self.conn(),
            "ai_secrets",
            SECRET_COLUMNS,
            q,
            extra,
            secret_from_row,
        )
    }

    fn get_ai_secret(&self, org_id: &str, id: &str) -> Result<Option<AiSecretRecord>, StoreError> {
        one(
            &self.conn(),
            &format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = ?1 AND id = ?2"),
            [org_id, id],
            secret_from_row,
        )
    }

    fn write_ai_secret(
        &self,
        org_id: &str,
        w: AiSecretWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<AiSecretRecord, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let by_name =
            format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = ?1 AND name = ?2");
        let existing = one(&tx, &by_name, [org_id, w.name.as_str()], secret_from_row)?;
        let done = match plan_secret_write(existing, &w, mode) {
            Planned::Existing(rec) => return Ok(rec),
            Planned::Update {
                id,
                secret_type,
                metadata,
            } => {
                tx.execute(
                    "UPDATE ai_secrets SET updated_at = ?2, type = ?3, metadata = ?4 WHERE id = ?1",
                    params![id, now_rfc3339(), secret_type, metadata],
                )?;
                if let Some(secret) = &w.secret {
                    let sealed = self.sealer.seal(Sealed::AiSecret, &id, secret)?;
                    tx.execute(
                        "UPDATE ai_secrets SET sealed = ?2, preview_secret = ?3 WHERE id = ?1",
                        params![id, sealed, secret.preview("")],
                    )?;
                }
                secret_write_action(mode)
            }
            Planned::Insert => {
                let (id, created) = new_id();
                let sealed = w
                    .secret
                    .as_ref()
                    .map(|s| self.sealer.seal(Sealed::AiSecret, &id, s))
                    .transpose()?;
                tx.execute(
                    "INSERT INTO ai_secrets (id, created, updated_at, org_id, name, type, metadata, sealed, preview_secret)
                     VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        id,
                        created,
                        org_id,
                        w.name,
                        w.secret_type,
                        metadata_text(&w.metadata),
                        sealed,
                        w.secret.as_ref().map(|s| s.preview(""))
                    ],
                )?;
                action::SECRET_CREATED
            }
        };
        let rec =
            one(&tx, &by_name, [org_id, w.name.as_str()], secret_from_row)?.ok_or_else(|| {
                StoreError::Corrupt("ai_secret vanished inside its transaction".into())
            })?;
        append_events(&tx, &self.sealer.0, [secret_event(by, done, &rec)])?;
        tx.commit()?;
        Ok(rec)
    }

    fn patch_ai_secret(
        &self,
        org_id: &str,
        id: &str,
        p: AiSecretPatch,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let by_id =
            format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = ?1 AND id = ?2");
        let Some(rec) = one(&tx, &by_id, [org_id, id], secret_from_row)? else {
            return Ok(None);
        };
        if let Some(name) = p.name.as_ref().filter(|n| **n != rec.name) {
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM ai_secrets WHERE org_id = ?1 AND name = ?2",
                    [org_id, name.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if taken.is_some() {
                return Err(name_taken("ai_secret", name));
            }
        }
        let (name, secret_type, metadata) = patched_secret(&rec, &p);
        tx.execute(
            "UPDATE ai_secrets SET updated_at = ?2, name = ?3, type = ?4, metadata = ?5 WHERE id = ?1",
            params![id, now_rfc3339(), name, secret_type, metadata],
        )?;
        if let Some(secret) = &p.secret {
            let sealed = self.sealer.seal(Sealed::AiSecret, id, secret)?;
            tx.execute(
                "UPDATE ai_secrets SET sealed = ?2, preview_secret = ?3 WHERE id = ?1",
                params![id, sealed, secret.preview("")],
            )?;
        }
        let out = one(&tx, &by_id, [org_id, id], secret_from_row)?;
        if let Some(rec) = &out {
            append_events(
                &tx,
                &self.sealer.0,
                [secret_event(by, action::SECRET_CHANGED, rec)],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn delete_ai_secret(
        &self,
        org_id: &str,
        r: SecretRef<'_>,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let (col, val) = match r {
            SecretRef::Id(id) => ("id", id),
            SecretRef::Name(name) => ("name", name),
        };
        let rec = one(
            &tx,
            &format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = ?1 AND {col} = ?2"),
            [org_id, val],
            secret_from_row,
        )?;
        if let Some(r) = &rec {
            tx.execute("DELETE FROM ai_secrets WHERE id = ?1", [&r.id])?;
            append_events(
                &tx,
                &self.sealer.0,
                [secret_event(by, action::SECRET_DELETED, r)],
            )?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn ai_secret_value(
        &self,
        org_id: &str,
        name: &str,
    ) -> Result<Option<(AiSecretRecord, Secret)>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("SELECT {SECRET_COLUMNS}, sealed FROM ai_secrets WHERE org_id = ?1 AND name = ?2"),
                params![org_id, name],
                |r| Ok((secret_from_row(r)?, r.get::<_, Option<Vec<u8>>>(8)?)),
            )
            .optional()?;
        match row {
            None | Some((_, None)) => Ok(None),
            Some((rec, Some(sealed))) => {
                let value = self.sealer.open(Sealed::AiSecret, &rec.id, &sealed)?;
                Ok(Some((rec, value)))
            }
        }
    }

    fn list_env_vars(
        &self,
        q: &ListQuery,
        f: &EnvVarFilter,
    ) -> Result<Vec<EnvVarRecord>, StoreError> {
        let mut extra = Vec::new();
        if let Some(t) = f.object_type {
            extra.push((
                "object_type = ?".to_owned(),
                vec![Value::Text(t.as_str().to_owned())],
            ));
        }
        if let Some(id) = &f.object_id {
            extra.push(("object_id = ?".to_owned(), vec![Value::Text(id.clone())]));
        }
        list_page(
            &self.conn(),
            "env_vars",
            ENV_COLUMNS,
            q,
            extra,
            env_from_row,
        )
    }

    fn get_env_var(&self, org_id: &str, id: &str) -> Result<Option<EnvVarRecord>, StoreError> {
        one(
            &self.conn(),
            &format!("SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = ?1 AND id = ?2"),
            [org_id, id],
            env_from_row,
        )
    }

    fn write_env_var(
        &self,
        org_id: &str,
        w: EnvVarWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<EnvVarRecord, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let by_name = format!(
            "SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = ?1 AND object_type = ?2 AND object_id = ?3 AND name = ?4"
        );
        let key = [
            org_id,
            w.object_type.as_str(),
            w.object_id.as_str(),
            w.name.as_str(),
        ];
        let done = match (one(&tx, &by_name, key, env_from_row)?, mode) {
            (Some(rec), WriteMode::CreateOrGet) => return Ok(rec),
            (Some(rec), WriteMode::Replace | WriteMode::SetValue) => {
                if let Some(v) = &w.value {
                    let sealed = self.sealer.seal(Sealed::EnvVar, &rec.id, v)?;
                    tx.execute(
                        "UPDATE env_vars SET sealed = ?2 WHERE id = ?1",
                        params![rec.id, sealed],
                    )?;
                }
                action::ENV_VAR_REPLACED
            }
            (None, _) => {
                let (id, created) = new_id();
                let sealed = w
                    .value
                    .as_ref()
                    .map(|v| self.sealer.seal(Sealed::EnvVar, &id, v))
                    .transpose()?;
                tx.execute(
                    "INSERT INTO env_vars (id, created, org_id, object_type, object_id, name, sealed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![id, created, org_id, w.object_type.as_str(), w.object_id, w.name, sealed],
                )?;
                action::ENV_VAR_CREATED
            }
        };
        let rec = one(&tx, &by_name, key, env_from_row)?
            .ok_or_else(|| StoreError::Corrupt("env_var vanished inside its transaction".into()))?;
        append_events(&tx, &self.sealer.0, [env_event(by, done, &rec)])?;
        tx.commit()?;
        Ok(rec)
    }

    fn patch_env_var(
        &self,
        org_id: &str,
        id: &str,
        name: &str,
        value: Option<Secret>,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let by_id = format!("SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = ?1 AND id = ?2");
        let Some(rec) = one(&tx, &by_id, [org_id, id], env_from_row)? else {
            return Ok(None);
        };
        if name != rec.name {
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM env_vars WHERE org_id = ?1 AND object_type = ?2 AND object_id = ?3 AND name = ?4",
                    [org_id, rec.object_type.as_str(), rec.object_id.as_str(), name],
                    |r| r.get(0),
                )
                .optional()?;
            if taken.is_some() {
                return Err(name_taken("env_var", name));
            }
            tx.execute(
                "UPDATE env_vars SET name = ?2 WHERE id = ?1",
                params![id, name],
            )?;
        }
        if let Some(v) = &value {
            let sealed = self.sealer.seal(Sealed::EnvVar, id, v)?;
            tx.execute(
                "UPDATE env_vars SET sealed = ?2 WHERE id = ?1",
                params![id, sealed],
            )?;
        }
        let out = one(&tx, &by_id, [org_id, id], env_from_row)?;
        if let Some(rec) = &out {
            append_events(
                &tx,
                &self.sealer.0,
                [env_event(by, action::ENV_VAR_CHANGED, rec)],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn delete_env_var(
        &self,
        org_id: &str,
        id: &str,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let rec = one(
            &tx,
            &format!("SELECT {ENV_COLUMNS} FROM env_vars WHERE org_id = ?1 AND id = ?2"),
            [org_id, id],
            env_from_row,
        )?;
        if let Some(r) = &rec {
            tx.execute("DELETE FROM env_vars WHERE id = ?1", [id])?;
            append_events(
                &tx,
                &self.sealer.0,
                [env_event(by, action::ENV_VAR_DELETED, r)],
            )?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn env_var_values(
        &self,
        org_id: &str,
        scopes: &[(ObjectType, String)],
    ) -> Result<Vec<(EnvVarRecord, Secret)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ENV_COLUMNS}, sealed FROM env_vars
             WHERE org_id = ?1 AND object_type = ?2 AND object_id = ?3 AND sealed IS NOT NULL
             ORDER BY created, id"
        ))?;
        let mut out = Vec::new();
        for (ot, oid) in scopes {
            let rows = stmt.query_map(params![org_id, ot.as_str(), oid], |r| {
                Ok((env_from_row(r)?, r.get::<_, Vec<u8>>(7)?))
            })?;
            for row in rows {
                let (rec, sealed) = row?;
                let value = self.sealer.open(Sealed::EnvVar, &rec.id, &sealed)?;
                out.push((rec, value));
            }
        }
        Ok(out)
    }

    fn mark_env_vars_used(&self, org_id: &str, ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let now = now_rfc3339();
        for id in ids {
            tx.execute(
                "UPDATE env_vars SET used = ?3 WHERE org_id = ?1 AND id = ?2",
                params![org_id, id, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revisions(&self) -> Result<Revisions, StoreError> {
        let conn = self.conn();
        Ok(Revisions {
            keys: revision(&conn, "keys")?,
            secrets: revision(&conn, "secrets")?,
            env_vars: revision(&conn, "env_vars")?,
        })
    }

    fn record_event(&self, ev: NewEvent) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        append_events(&tx, &self.sealer.0, [ev])?;
        tx.commit()?;
        Ok(())
    }

    fn audit_events(&self, q: &AuditQuery) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let (cmp, order, reverse) = page_order(&q.page);
        let cursor = match &q.page {
            Page::First => None,
            Page::After(id) | Page::Before(id) => Some(
                conn.query_row("SELECT seq FROM audit_events WHERE id = ?1", [id], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .ok_or_else(|| StoreError::UnknownCursor(id.clone()))?,
            ),
        };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events
             WHERE (org_id = ?1 OR org_id IS NULL) AND (?2 IS NULL OR seq {} ?2)
             ORDER BY seq {order} LIMIT ?3",
            cmp.unwrap_or("<")
        ))?;
        let mut rows = stmt
            .query_map(params![q.org_id, cursor, q.limit], event_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        if reverse {
            rows.reverse();
        }
        Ok(rows)
    }

    fn audit_trail(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![after_seq, limit], event_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn audit_head(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT v FROM meta WHERE k = 'audit_head'", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "sqlite",
            location: self.path.display().to_string(),
            notifications: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, byte: u8) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(
            &dir.join("k.db"),
            Arc::new(MasterKey::from_bytes(&[byte; 32])),
        )
    }

    fn put(s: &SqliteStore, org: &str, name: &str, value: &str) -> AiSecretRecord {
        s.write_ai_secret(
            org,
            AiSecretWrite {
                name: name.into(),
                secret_type: Some("openai".into()),
                metadata: None,
                secret: Some(Secret::new(value.into())),
            },
            WriteMode::SetValue,
            &crate::audit::Actor::Keygate,
        )
        .unwrap()
    }

    /// What only SQLite can show: the file itself never holds a secret in plaintext (the write
    /// modes are in the conformance suite, `tests/store_conformance.rs`).
    #[test]
    fn secrets_are_sealed_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        let org = s.tenant().unwrap().org_id;
        put(&s, &org, "OPENAI", "upstream-secret-value-123");
        put(&s, &org, "OPENAI", "second-value-xyz9");
        assert_eq!(
            s.ai_secret_value(&org, "OPENAI")
                .unwrap()
                .unwrap()
                .1
                .expose(),
            "second-value-xyz9"
        );
        drop(s);
        let raw = std::fs::read(dir.path().join("k.db")).unwrap();
        let wal = std::fs::read(dir.path().join("k.db-wal")).unwrap_or_default();
        for hay in [&raw, &wal] {
            assert!(
                !hay.windows(17).any(|w| w == b"second-value-xyz9"),
                "plaintext on disk"
            );
        }
    }

    #[test]
    fn a_version_1_store_migrates_and_stamps_and_usage_stop_counting_as_changes() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A store as the first release made it.
            let mut conn = Connection::open(dir.path().join("k.db")).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(SCHEMA_V1).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.commit().unwrap();
        }
        let s = open(dir.path(), 1).unwrap();
        let version: i64 = s
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
        let t = s.tenant().unwrap();
        let rec = s
            .create_api_key(
                NewApiKey {
                    org_id: t.org_id,
                    user_id: t.user_id,
                    name: "k".into(),
                    role: Role::Proxy,
                    digest: [3; 32],
                    preview_name: "sk-****".into(),
                    routes: None,
                    limit: None,
                },
                &crate::audit::Actor::Keygate,
            )
            .unwrap();
        let before = s.revisions().unwrap().keys;
        s.flag_exposed(&rec.id, false).unwrap();
        s.record_usage(&[crate::store::KeyUsage {
            key_id: rec.id.clone(),
            last_used_ms: 1,
            requests: 1,
            rate_limited: 0,
        }])
        .unwrap();
        assert_eq!(s.revisions().unwrap().keys, before);
        let events = s.audit_trail(0, 10).unwrap();
        let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["key.created", "key.flagged_exposed"]);
        drop(s);
        // A store newer than this binary is refused.
        Connection::open(dir.path().join("k.db"))
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            open(dir.path(), 1),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
