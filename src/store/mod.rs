//! The store: keys (as keyed digests), ai_secrets and env vars (sealed under the master key),
//! behind a trait so that a shared database can serve a fleet later.
//!
//! Every method is one transaction. Implementations encrypt and decrypt secrets themselves:
//! values go in and come out as [`Secret`], and only sealed bytes are ever written.
//!
//! Change detection: every write to keys or secrets bumps a revision counter in the same
//! transaction (SQLite triggers, so writes from any process count). The server polls
//! [`Store::revisions`] and drops what it cached when a counter moves.

mod sqlite;

pub use sqlite::SqliteStore;

use crate::crypto::KeyDigest;
use crate::secret::Secret;

/// A store failure. Messages never carry a key or secret value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("store: cannot create {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the master key does not match this store (was KEYGATE_MASTER_KEY or the master key file changed?); refusing to continue so that no secret is lost or overwritten")]
    WrongMasterKey,
    #[error("{0}")]
    Crypto(#[from] crate::crypto::OpenError),
    #[error("{0}")]
    MasterKey(#[from] crate::crypto::MasterKeyError),
    #[error("store: a stored row is malformed: {0}")]
    Corrupt(String),
    #[error("store schema version {found} is newer than this keygate understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May call the admin API (and the proxy).
    Admin,
    /// May call the proxy only.
    Proxy,
}

impl Role {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Proxy => "proxy",
        }
    }

    /// Parses the wire and storage name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "proxy" => Some(Role::Proxy),
            _ => None,
        }
    }
}

/// An API key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub created: String,
    pub name: String,
    pub preview_name: String,
    pub user_id: String,
    pub org_id: String,
    pub role: Role,
    /// When the key was seen in a cleartext request, if it was.
    pub exposed: Option<String>,
}

/// Who a valid key belongs to: what the proxy needs to know on the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub org_id: String,
    pub user_id: String,
    pub role: Role,
}

/// A new key to insert: the caller generated the key and computed its digest and preview.
pub struct NewApiKey {
    pub name: String,
    pub role: Role,
    pub digest: KeyDigest,
    pub preview_name: String,
}

/// An ai_secret as listed: never the value.
#[derive(Debug, Clone, PartialEq)]
pub struct AiSecretRecord {
    pub id: String,
    pub created: String,
    pub updated_at: String,
    pub org_id: String,
    pub name: String,
    pub secret_type: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub preview_secret: Option<String>,
}

/// The change counters the server polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Revisions {
    pub keys: u64,
    pub secrets: u64,
}

/// The default org and user of a store (a fresh store has exactly one of each).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub org_id: String,
    pub org_name: String,
    pub user_id: String,
}

/// The store interface. Methods block: async callers use `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// The default org and user.
    fn tenant(&self) -> Result<Tenant, StoreError>;
    /// Inserts a key for the default org and user.
    fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError>;
    /// All keys, newest first.
    fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Deletes a key; `None` when there was none with that id.
    fn delete_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The number of keys.
    fn count_api_keys(&self) -> Result<u64, StoreError>;
    /// The principal of a key digest, with the keys revision it was read at.
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError>;
    /// Marks a key as seen in cleartext (keeps the first time it was).
    fn flag_exposed(&self, key_id: &str) -> Result<(), StoreError>;
    /// Creates or replaces an ai_secret of the default org by name.
    fn put_ai_secret(
        &self,
        name: &str,
        secret_type: Option<&str>,
        value: &Secret,
    ) -> Result<AiSecretRecord, StoreError>;
    /// All ai_secrets of the default org, newest first.
    fn list_ai_secrets(&self) -> Result<Vec<AiSecretRecord>, StoreError>;
    /// Deletes an ai_secret of the default org by name.
    fn delete_ai_secret(&self, name: &str) -> Result<Option<AiSecretRecord>, StoreError>;
    /// An ai_secret of the default org with its decrypted value.
    fn ai_secret_value(&self, name: &str) -> Result<Option<(AiSecretRecord, Secret)>, StoreError>;
    /// The change counters.
    fn revisions(&self) -> Result<Revisions, StoreError>;
}

/// Generates a new key, stores its digest, and returns the key (to show once) and its record.
pub fn issue_key(
    store: &dyn Store,
    master: &crate::crypto::MasterKey,
    name: &str,
    role: Role,
) -> Result<(Secret, ApiKeyRecord), StoreError> {
    let key = master.generate_key()?;
    let rec = store.create_api_key(NewApiKey {
        name: name.to_owned(),
        role,
        digest: master.digest(key.expose()),
        preview_name: crate::crypto::key_preview(&key),
    })?;
    Ok((key, rec))
}
