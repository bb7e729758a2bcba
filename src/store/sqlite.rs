//! The embedded store: one SQLite file in WAL mode, shared safely by a running server and the
//! CLI (each opens its own connection; SQLite serialises writers, `busy_timeout` waits).
//!
//! `synchronous = FULL` because writes are rare (key and secret management) and a committed key
//! or secret must survive a power cut as well as a `kill -9`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{
    AiSecretRecord, ApiKeyRecord, NewApiKey, Principal, Revisions, Role, Store, StoreError, Tenant,
};
use crate::crypto::{KeyDigest, MasterKey};
use crate::secret::Secret;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
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
  exposed TEXT
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
CREATE TABLE IF NOT EXISTS env_vars (
  id TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  object_type TEXT NOT NULL CHECK (object_type IN ('organization', 'project', 'function')),
  object_id TEXT NOT NULL,
  name TEXT NOT NULL,
  sealed BLOB,
  used TEXT,
  UNIQUE (object_type, object_id, name)
);
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
"#;

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    master: Arc<MasterKey>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

/// The current time as the wire format wants it: RFC 3339, milliseconds, `Z`.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
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
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        check_or_set_fingerprint(&tx, &master.fingerprint())?;
        ensure_tenant(&tx)?;
        tx.commit()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            master,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written transaction (rusqlite rolls
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tenant_in(tx: &Connection) -> Result<Tenant, StoreError> {
        Ok(tx.query_row(
            "SELECT o.id, o.name, u.id FROM orgs o JOIN users u ON u.org_id = o.id
             ORDER BY o.created, u.created LIMIT 1",
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
}

fn check_or_set_fingerprint(tx: &Transaction<'_>, fp: &[u8; 32]) -> Result<(), StoreError> {
    let stored: Option<Vec<u8>> = tx
        .query_row(
            "SELECT v FROM meta WHERE k = 'master_key_fingerprint'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match stored {
        Some(v) if v.as_slice() == fp.as_slice() => Ok(()),
        Some(_) => Err(StoreError::WrongMasterKey),
        None => {
            tx.execute(
                "INSERT INTO meta (k, v) VALUES ('master_key_fingerprint', ?1)",
                params![fp.as_slice()],
            )?;
            Ok(())
        }
    }
}

fn ensure_tenant(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM orgs", [], |r| r.get(0))?;
    if n == 0 {
        let now = now_rfc3339();
        let org = new_id();
        tx.execute(
            "INSERT INTO orgs (id, name, created) VALUES (?1, 'default', ?2)",
            params![org, now],
        )?;
        tx.execute(
            "INSERT INTO users (id, org_id, created) VALUES (?1, ?2, ?3)",
            params![new_id(), org, now],
        )?;
    }
    Ok(())
}

const KEY_COLUMNS: &str = "id, created, name, preview_name, user_id, org_id, role, exposed";

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
    })
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
        metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
        preview_secret: r.get(7)?,
    })
}

fn secret_context(id: &str) -> String {
    format!("ai_secret:{id}")
}

fn revision(tx: &Connection, name: &str) -> Result<u64, StoreError> {
    let n: i64 = tx.query_row("SELECT n FROM revisions WHERE name = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok(n.max(0) as u64)
}

impl Store for SqliteStore {
    fn tenant(&self) -> Result<Tenant, StoreError> {
        Self::tenant_in(&self.conn())
    }

    fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let tenant = Self::tenant_in(&tx)?;
        let id = new_id();
        tx.execute(
            "INSERT INTO api_keys (id, created, name, preview_name, user_id, org_id, role, digest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                now_rfc3339(),
                new.name,
                new.preview_name,
                tenant.user_id,
                tenant.org_id,
                new.role.as_str(),
                new.digest.as_slice()
            ],
        )?;
        let rec = tx.query_row(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
            [&id],
            key_from_row,
        )?;
        tx.commit()?;
        Ok(rec)
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created DESC, id DESC"
        ))?;
        let rows = stmt.query_map([], key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rec = tx
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_from_row,
            )
            .optional()?;
        if rec.is_some() {
            tx.execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
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
                "SELECT id, org_id, user_id, role, digest FROM api_keys WHERE digest = ?1",
                [digest.as_slice()],
                |r| {
                    let role: String = r.get(3)?;
                    let stored: Vec<u8> = r.get(4)?;
                    Ok((
                        Principal {
                            key_id: r.get(0)?,
                            org_id: r.get(1)?,
                            user_id: r.get(2)?,
                            role: Role::parse(&role).unwrap_or(Role::Proxy),
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

    fn flag_exposed(&self, key_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE api_keys SET exposed = ?2 WHERE id = ?1 AND exposed IS NULL",
            params![key_id, now_rfc3339()],
        )?;
        Ok(())
    }

    fn put_ai_secret(
        &self,
        name: &str,
        secret_type: Option<&str>,
        value: &Secret,
    ) -> Result<AiSecretRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let tenant = Self::tenant_in(&tx)?;
        let now = now_rfc3339();
        let existing: Option<String> = tx
            .query_row(
                "SELECT id FROM ai_secrets WHERE org_id = ?1 AND name = ?2",
                params![tenant.org_id, name],
                |r| r.get(0),
            )
            .optional()?;
        let id = existing.clone().unwrap_or_else(new_id);
        let sealed = self
            .master
            .seal(&secret_context(&id), value.expose().as_bytes())?;
        let preview = value.preview("");
        match existing {
            Some(_) => {
                tx.execute(
                    "UPDATE ai_secrets SET updated_at = ?2, type = ?3, sealed = ?4, preview_secret = ?5
                     WHERE id = ?1",
                    params![id, now, secret_type, sealed, preview],
                )?;
            }
            None => {
                tx.execute(
                    "INSERT INTO ai_secrets (id, created, updated_at, org_id, name, type, sealed, preview_secret)
                     VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![id, now, tenant.org_id, name, secret_type, sealed, preview],
                )?;
            }
        }
        let rec = tx.query_row(
            &format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE id = ?1"),
            [&id],
            secret_from_row,
        )?;
        tx.commit()?;
        Ok(rec)
    }

    fn list_ai_secrets(&self) -> Result<Vec<AiSecretRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SECRET_COLUMNS} FROM ai_secrets ORDER BY created DESC, id DESC"
        ))?;
        let rows = stmt.query_map([], secret_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_ai_secret(&self, name: &str) -> Result<Option<AiSecretRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let tenant = Self::tenant_in(&tx)?;
        let rec = tx
            .query_row(
                &format!("SELECT {SECRET_COLUMNS} FROM ai_secrets WHERE org_id = ?1 AND name = ?2"),
                params![tenant.org_id, name],
                secret_from_row,
            )
            .optional()?;
        if let Some(r) = &rec {
            tx.execute("DELETE FROM ai_secrets WHERE id = ?1", [&r.id])?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn ai_secret_value(&self, name: &str) -> Result<Option<(AiSecretRecord, Secret)>, StoreError> {
        let conn = self.conn();
        let tenant = Self::tenant_in(&conn)?;
        let row = conn
            .query_row(
                &format!("SELECT {SECRET_COLUMNS}, sealed FROM ai_secrets WHERE org_id = ?1 AND name = ?2"),
                params![tenant.org_id, name],
                |r| Ok((secret_from_row(r)?, r.get::<_, Option<Vec<u8>>>(8)?)),
            )
            .optional()?;
        match row {
            None | Some((_, None)) => Ok(None),
            Some((rec, Some(sealed))) => {
                let value = self.master.open(&secret_context(&rec.id), &sealed)?;
                Ok(Some((rec, value)))
            }
        }
    }

    fn revisions(&self) -> Result<Revisions, StoreError> {
        let conn = self.conn();
        Ok(Revisions {
            keys: revision(&conn, "keys")?,
            secrets: revision(&conn, "secrets")?,
        })
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

    #[test]
    fn keys_round_trip_and_bump_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        let r0 = s.revisions().unwrap();
        let rec = s
            .create_api_key(NewApiKey {
                name: "ci".into(),
                role: Role::Proxy,
                digest: [9; 32],
                preview_name: "sk-****abcd".into(),
            })
            .unwrap();
        assert!(s.revisions().unwrap().keys > r0.keys);
        let (p, _) = s.principal_by_digest(&[9; 32]).unwrap();
        assert_eq!(p.unwrap().key_id, rec.id);
        assert!(s.principal_by_digest(&[8; 32]).unwrap().0.is_none());
        assert_eq!(s.list_api_keys().unwrap().len(), 1);
        s.flag_exposed(&rec.id).unwrap();
        assert!(s.list_api_keys().unwrap()[0].exposed.is_some());
        assert_eq!(s.delete_api_key(&rec.id).unwrap().unwrap().id, rec.id);
        assert!(s.delete_api_key(&rec.id).unwrap().is_none());
        assert!(s.principal_by_digest(&[9; 32]).unwrap().0.is_none());
    }

    #[test]
    fn secrets_are_sealed_at_rest_and_replaced_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1).unwrap();
        let v = Secret::new("upstream-secret-value-123".into());
        let a = s.put_ai_secret("OPENAI", Some("openai"), &v).unwrap();
        assert_eq!(a.preview_secret.as_deref(), Some("****-123"));
        let (_, got) = s.ai_secret_value("OPENAI").unwrap().unwrap();
        assert_eq!(got.expose(), v.expose());
        let b = s
            .put_ai_secret(
                "OPENAI",
                Some("openai"),
                &Secret::new("second-value-xyz9".into()),
            )
            .unwrap();
        assert_eq!(a.id, b.id, "replacing keeps the id");
        assert_eq!(
            s.ai_secret_value("OPENAI").unwrap().unwrap().1.expose(),
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
    fn a_wrong_master_key_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path(), 1).unwrap();
        let err = open(dir.path(), 2).unwrap_err();
        assert!(matches!(err, StoreError::WrongMasterKey), "{err}");
    }
}
