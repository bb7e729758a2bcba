//! The store: keys (as keyed digests), ai_secrets and env vars (sealed under the master key),
//! behind a trait so that a shared database can serve a fleet later.
//!
//! Every method is one transaction. Implementations encrypt and decrypt secrets themselves:
//! values go in and come out as [`Secret`], and only sealed bytes are ever written.
//!
//! Change detection: every write to keys or secrets that changes what the data plane uses
//! bumps a revision counter in the same transaction (triggers, so writes from any process or
//! instance count; stamping `exposed` or `used` does not). The server polls
//! [`Store::revisions`] and drops what it cached when a counter moves; a backend that can push
//! (PostgreSQL's LISTEN/NOTIFY) also wakes the poller through [`Store::changes`].
//!
//! Lists are newest first (`created DESC, id DESC`) and paged by cursor: ids are UUID v7 whose
//! timestamp is the `created` time, so a cursor keeps its place even when its object was deleted
//! between two pages.
//!
//! Two backends: SQLite (embedded, the default) and PostgreSQL (a fleet's shared store). What
//! is not SQL lives once, in `common`.

mod common;
mod postgres;
mod sqlite;

pub use common::{format_time, new_id, now_rfc3339};
pub use postgres::{PgSettings, PgStore};
pub use sqlite::SqliteStore;

use crate::audit::{Actor, Event, NewEvent};
use crate::config::LimitSpec;
use crate::crypto::KeyDigest;
use crate::secret::Secret;

/// A store failure, whatever the backend. Messages never carry a key or secret value, nor a
/// database password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time: a passing condition (503),
    /// not a bug (500).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement.
    #[error("store: {0}")]
    Backend(String),
    /// The store settings are unusable (a malformed URL, a CA file that does not load).
    #[error("store settings: {0}")]
    Settings(String),
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
    /// The blocking task running a store call panicked or was cancelled: a bug, not the data.
    #[error("store: the task running a store call failed: {0}")]
    TaskFailed(String),
    #[error("store schema version {found} is newer than this keygate understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The write would break a uniqueness rule (a name already taken); a client error.
    #[error("{0}")]
    Conflict(String),
    /// A pagination cursor names no object and carries no usable position.
    #[error("cursor {0} names no object")]
    UnknownCursor(String),
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The routes (by name) this key may use; `None`: all of them.
    pub routes: Option<Vec<String>>,
    /// The key's own quota; `None`: the default.
    pub limit: Option<LimitSpec>,
    /// The latest request the key authenticated, as of the last usage flush.
    pub last_used: Option<String>,
    /// Requests the key authenticated, as of the last usage flush.
    pub request_count: u64,
    /// Of those, the ones refused with 429.
    pub rate_limited_count: u64,
}

/// Usage of one key since the last flush: merged into the store (latest time wins, counts
/// add), so that instances of a fleet each flush their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    /// Milliseconds since the Unix epoch.
    pub last_used_ms: u64,
    pub requests: u64,
    pub rate_limited: u64,
}

/// A page of the audit trail (of one org, with the events of no org: config reloads).
#[derive(Debug, Clone)]
pub struct AuditQuery {
    pub org_id: String,
    pub page: Page,
    pub limit: u32,
}

/// Who a valid key belongs to: what the proxy needs to know on the hot path. Small and cheap
/// to clone: the key id as a number, and a profile most keys share (the key cache interns it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key id as a number: what rate limiter state is keyed by.
    pub key_uid: u128,
    pub profile: std::sync::Arc<Profile>,
}

/// What a key may do and for whom: shared by every key with the same settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    pub org_id: String,
    pub user_id: String,
    pub role: Role,
    /// The routes (by name) the key may use; `None`: all of them.
    pub routes: Option<Vec<String>>,
    /// The key's own quota; `None`: the default.
    pub limit: Option<LimitSpec>,
}

impl Principal {
    /// The key id, as the API shows it.
    pub fn key_id(&self) -> String {
        uuid::Uuid::from_u128(self.key_uid).to_string()
    }

    /// The key's org.
    pub fn org_id(&self) -> &str {
        &self.profile.org_id
    }

    /// The key's user.
    pub fn user_id(&self) -> &str {
        &self.profile.user_id
    }

    /// The key's role.
    pub fn role(&self) -> Role {
        self.profile.role
    }

    /// The key's own quota, if it has one.
    pub fn limit(&self) -> Option<LimitSpec> {
        self.profile.limit
    }

    /// Whether this key may use the route named `route`.
    pub fn may_use(&self, route: &str) -> bool {
        self.profile
            .routes
            .as_ref()
            .is_none_or(|r| r.iter().any(|n| n == route))
    }
}

/// A new key to insert: the caller generated the key and computed its digest and preview.
pub struct NewApiKey {
    pub org_id: String,
    pub user_id: String,
    pub name: String,
    pub role: Role,
    pub digest: KeyDigest,
    pub preview_name: String,
    /// The routes (by name) the key may use; `None`: all.
    pub routes: Option<Vec<String>>,
    /// The key's own quota; `None`: the default.
    pub limit: Option<LimitSpec>,
}

/// What a new key may do.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    pub role: Role,
    /// The routes (by name) the key may use; `None`: all.
    pub routes: Option<Vec<String>>,
    /// The key's own quota; `None`: the default.
    pub limit: Option<LimitSpec>,
}

impl KeyOptions {
    /// A key of `role` for every route with the default quota.
    pub fn role(role: Role) -> Self {
        KeyOptions {
            role,
            routes: None,
            limit: None,
        }
    }
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
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub preview_secret: Option<String>,
}

/// The scope an env var belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    Organization,
    Project,
    Function,
}

impl ObjectType {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Organization => "organization",
            ObjectType::Project => "project",
            ObjectType::Function => "function",
        }
    }

    /// Parses the wire name; anything else is `None`.
    pub fn parse(s: &str) -> Option<ObjectType> {
        match s {
            "organization" => Some(ObjectType::Organization),
            "project" => Some(ObjectType::Project),
            "function" => Some(ObjectType::Function),
            _ => None,
        }
    }
}

/// An env var as listed: never the value.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvVarRecord {
    pub id: String,
    pub created: String,
    pub org_id: String,
    pub object_type: ObjectType,
    pub object_id: String,
    pub name: String,
    pub used: Option<String>,
}

/// The change counters the server polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Revisions {
    pub keys: u64,
    pub secrets: u64,
    pub env_vars: u64,
}

/// The default org and user of a store (a fresh store has exactly one of each).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub org_id: String,
    pub org_name: String,
    pub user_id: String,
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// The newest objects.
    First,
    /// The objects older than this id.
    After(String),
    /// The objects newer than this id (still returned newest first).
    Before(String),
}

/// A list request, already validated.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub org_id: String,
    /// Only these ids (empty: no id filter).
    pub ids: Vec<String>,
    /// Only objects with exactly this name.
    pub name: Option<String>,
    pub page: Page,
    pub limit: u32,
}

impl ListQuery {
    /// Everything of an org, newest first, up to `limit`.
    pub fn all(org_id: &str, limit: u32) -> Self {
        ListQuery {
            org_id: org_id.to_owned(),
            ids: Vec::new(),
            name: None,
            page: Page::First,
            limit,
        }
    }
}

/// How a named write treats an existing object of that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// POST: create, or return the existing object unmodified.
    CreateOrGet,
    /// PUT: create, or replace the existing object's fields (an omitted value keeps the
    /// stored one).
    Replace,
    /// The CLI's `secrets put`: create, or set the value (and the type when given), keeping
    /// everything else.
    SetValue,
}

/// The fields of an ai_secret write (POST, PUT, CLI).
#[derive(Debug, Clone)]
pub struct AiSecretWrite {
    pub name: String,
    pub secret_type: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub secret: Option<Secret>,
}

/// A PATCH of an ai_secret: `None` leaves a field as it is; `metadata` is deep-merged.
#[derive(Debug, Clone, Default)]
pub struct AiSecretPatch {
    pub name: Option<String>,
    pub secret_type: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub secret: Option<Secret>,
}

/// The fields of an env var write (POST, PUT).
#[derive(Debug, Clone)]
pub struct EnvVarWrite {
    pub object_type: ObjectType,
    pub object_id: String,
    pub name: String,
    pub value: Option<Secret>,
}

/// Filters of an env var list, besides the common ones.
#[derive(Debug, Clone, Default)]
pub struct EnvVarFilter {
    pub object_type: Option<ObjectType>,
    pub object_id: Option<String>,
}

/// How to name the ai_secret to delete.
#[derive(Debug, Clone)]
pub enum SecretRef<'a> {
    Id(&'a str),
    Name(&'a str),
}

/// The one lookup the hot path's key cache needs.
pub trait KeyLookup: Send + Sync + 'static {
    /// The principal of a key digest, with the keys revision it was read at.
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError>;
}

/// The store interface. Methods block: async callers use `spawn_blocking`.
pub trait Store: KeyLookup {
    /// The default org and user.
    fn tenant(&self) -> Result<Tenant, StoreError>;
    /// The id of the org with this name.
    fn org_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Inserts a key.
    fn create_api_key(&self, new: NewApiKey, by: &Actor) -> Result<ApiKeyRecord, StoreError> {
        let mut recs = self.create_api_keys(vec![new], by)?;
        recs.pop()
            .ok_or_else(|| StoreError::Corrupt("a created key vanished".into()))
    }
    /// Inserts `new` only when the store holds no key at all, in one transaction: instances
    /// starting together on one empty store mint exactly one first key. `None`: there were keys.
    /// Its audit event names keygate as the actor.
    fn create_first_key(&self, new: NewApiKey) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Inserts keys, all in one transaction (with one audit event each).
    fn create_api_keys(
        &self,
        new: Vec<NewApiKey>,
        by: &Actor,
    ) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// A page of keys, newest first.
    fn list_api_keys(&self, q: &ListQuery) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// One key of an org.
    fn get_api_key(&self, org_id: &str, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Sets (or clears) a key's own quota; `None` when there is no such key.
    fn set_api_key_limit(
        &self,
        org_id: &str,
        id: &str,
        limit: Option<LimitSpec>,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Deletes a key (of `org_id` when given); `None` when there was none.
    fn delete_api_key(
        &self,
        org_id: Option<&str>,
        id: &str,
        by: &Actor,
    ) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The number of keys.
    fn count_api_keys(&self) -> Result<u64, StoreError>;
    /// Marks a key as seen in cleartext (keeps the first time it was; the audit event, by
    /// keygate, is written the first time only) and, with `revoke`, deletes it in the same
    /// transaction with a "revoked for cleartext" event: a crash between the two cannot leave an
    /// exposed key that was meant to be revoked, nor a revocation without its flag.
    fn flag_exposed(&self, key_id: &str, revoke: bool) -> Result<(), StoreError>;
    /// Merges flushed usage into the keys (latest time wins, counts add); keys deleted
    /// meanwhile are skipped. Moves no revision: nothing the data plane uses changes.
    fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError>;

    /// A page of ai_secrets, newest first; `types` filters by type when not empty.
    fn list_ai_secrets(
        &self,
        q: &ListQuery,
        types: &[String],
    ) -> Result<Vec<AiSecretRecord>, StoreError>;
    /// One ai_secret of an org.
    fn get_ai_secret(&self, org_id: &str, id: &str) -> Result<Option<AiSecretRecord>, StoreError>;
    /// Creates or updates an ai_secret by name, as `mode` says.
    fn write_ai_secret(
        &self,
        org_id: &str,
        w: AiSecretWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<AiSecretRecord, StoreError>;
    /// Patches an ai_secret; `None` when there is none with that id.
    fn patch_ai_secret(
        &self,
        org_id: &str,
        id: &str,
        p: AiSecretPatch,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError>;
    /// Deletes an ai_secret by id or name.
    fn delete_ai_secret(
        &self,
        org_id: &str,
        r: SecretRef<'_>,
        by: &Actor,
    ) -> Result<Option<AiSecretRecord>, StoreError>;
    /// An ai_secret with its decrypted value (`None` also when it has no value).
    fn ai_secret_value(
        &self,
        org_id: &str,
        name: &str,
    ) -> Result<Option<(AiSecretRecord, Secret)>, StoreError>;

    /// A page of env vars, newest first.
    fn list_env_vars(
        &self,
        q: &ListQuery,
        f: &EnvVarFilter,
    ) -> Result<Vec<EnvVarRecord>, StoreError>;
    /// One env var of an org.
    fn get_env_var(&self, org_id: &str, id: &str) -> Result<Option<EnvVarRecord>, StoreError>;
    /// Creates or replaces an env var by (object, name), as `mode` says.
    fn write_env_var(
        &self,
        org_id: &str,
        w: EnvVarWrite,
        mode: WriteMode,
        by: &Actor,
    ) -> Result<EnvVarRecord, StoreError>;
    /// Renames an env var and sets its value when given; `None` when there is none.
    fn patch_env_var(
        &self,
        org_id: &str,
        id: &str,
        name: &str,
        value: Option<Secret>,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError>;
    /// Deletes an env var.
    fn delete_env_var(
        &self,
        org_id: &str,
        id: &str,
        by: &Actor,
    ) -> Result<Option<EnvVarRecord>, StoreError>;
    /// The env vars of the given scopes with their decrypted values (vars without a value are
    /// left out).
    fn env_var_values(
        &self,
        org_id: &str,
        scopes: &[(ObjectType, String)],
    ) -> Result<Vec<(EnvVarRecord, Secret)>, StoreError>;
    /// Stamps `used` on these env vars.
    fn mark_env_vars_used(&self, org_id: &str, ids: &[String]) -> Result<(), StoreError>;

    /// The change counters.
    fn revisions(&self) -> Result<Revisions, StoreError>;

    /// Appends an event that records no store change (a config reload), in its own
    /// transaction.
    fn record_event(&self, ev: NewEvent) -> Result<(), StoreError>;
    /// A page of the audit trail, newest first.
    fn audit_events(&self, q: &AuditQuery) -> Result<Vec<Event>, StoreError>;
    /// Up to `limit` events after number `after_seq`, oldest first (the whole trail, for
    /// verification, whatever its org).
    fn audit_trail(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>, StoreError>;
    /// The trail's head record, if there is one.
    fn audit_head(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// Pushed change notices: the value moves when any instance changed something the data
    /// plane uses (and when the push channel reconnects, since notices may have been missed).
    /// `None` for a backend without push: polling [`Store::revisions`] is then the only way.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// What this store is, for `/readyz` and the log: never a password.
    fn describe(&self) -> StoreInfo;
}

/// What a store is, for `/readyz` and the log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreInfo {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The file, or `host:port/database` (no user, no password).
    pub location: String,
    /// Whether the push channel for changes is connected; `None` when the backend has none.
    pub notifications: Option<bool>,
}

/// Generates a new key for the org and user, stores its digest, and returns the key (to show
/// once) and its record.
pub fn issue_key(
    store: &dyn Store,
    master: &crate::crypto::MasterKey,
    owner: (&str, &str),
    name: &str,
    opts: KeyOptions,
    by: &Actor,
) -> Result<(Secret, ApiKeyRecord), StoreError> {
    issue_keys(store, master, owner, name, opts, 1, by)?
        .pop()
        .ok_or_else(|| StoreError::Corrupt("a created key vanished".into()))
}

/// Mints the first admin key when the store holds no key at all; `None` when it has keys.
/// Instances starting together on one empty store mint exactly one.
pub fn issue_first_admin_key(
    store: &dyn Store,
    master: &crate::crypto::MasterKey,
) -> Result<Option<(Secret, ApiKeyRecord)>, StoreError> {
    if store.count_api_keys()? > 0 {
        return Ok(None);
    }
    let t = store.tenant()?;
    let key = master.generate_key()?;
    let rec = store.create_first_key(NewApiKey {
        org_id: t.org_id,
        user_id: t.user_id,
        name: "admin".to_owned(),
        role: Role::Admin,
        digest: master.digest(key.expose()),
        preview_name: crate::crypto::key_preview(&key),
        routes: None,
        limit: None,
    })?;
    Ok(rec.map(|rec| (key, rec)))
}

/// Like [`issue_key`] for `count` keys with the same name and options, in one transaction.
pub fn issue_keys(
    store: &dyn Store,
    master: &crate::crypto::MasterKey,
    owner: (&str, &str),
    name: &str,
    opts: KeyOptions,
    count: usize,
    by: &Actor,
) -> Result<Vec<(Secret, ApiKeyRecord)>, StoreError> {
    let mut keys = Vec::with_capacity(count);
    let mut new = Vec::with_capacity(count);
    for _ in 0..count {
        let key = master.generate_key()?;
        new.push(NewApiKey {
            org_id: owner.0.to_owned(),
            user_id: owner.1.to_owned(),
            name: name.to_owned(),
            role: opts.role,
            digest: master.digest(key.expose()),
            preview_name: crate::crypto::key_preview(&key),
            routes: opts.routes.clone(),
            limit: opts.limit,
        });
        keys.push(key);
    }
    let recs = store.create_api_keys(new, by)?;
    Ok(keys.into_iter().zip(recs).collect())
}

/// Deep-merges `patch` into `base`: objects merge key by key, anything else replaces.
pub fn merge_metadata(
    base: &mut serde_json::Map<String, serde_json::Value>,
    patch: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in patch {
        match (base.get_mut(&k), v) {
            (Some(serde_json::Value::Object(b)), serde_json::Value::Object(p)) => {
                merge_metadata(b, p)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The env vars for a scope: the org's (scoped by its name, then by its id, which wins),
/// overlaid by the scope's own. Sorted by name. `keygate run` and the routes' `set_headers`
/// (the org's scope) both read env vars through this.
pub fn scope_env(
    store: &dyn Store,
    org: (&str, &str),
    object_type: ObjectType,
    object_id: &str,
) -> Result<Vec<(EnvVarRecord, Secret)>, StoreError> {
    let (org_id, org_name) = org;
    let mut scopes = vec![
        (ObjectType::Organization, org_name.to_owned()),
        (ObjectType::Organization, org_id.to_owned()),
    ];
    if object_type != ObjectType::Organization {
        scopes.push((object_type, object_id.to_owned()));
    } else if object_id != org_id && object_id != org_name {
        scopes.push((ObjectType::Organization, object_id.to_owned()));
    }
    // Later scopes are narrower: they overwrite.
    let mut by_name: std::collections::BTreeMap<String, (EnvVarRecord, Secret)> =
        std::collections::BTreeMap::new();
    for (rec, value) in store.env_var_values(org_id, &scopes)? {
        by_name.insert(rec.name.clone(), (rec, value));
    }
    Ok(by_name.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_merges_deeply_and_replaces_scalars_and_arrays() {
        let mut base = json!({"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": "keep"})
            .as_object()
            .unwrap()
            .clone();
        let patch = json!({"a": {"y": [3], "z": true}, "b": {"n": 1}, "d": null})
            .as_object()
            .unwrap()
            .clone();
        merge_metadata(&mut base, patch);
        assert_eq!(
            serde_json::Value::Object(base),
            json!({"a": {"x": 1, "y": [3], "z": true}, "b": {"n": 1}, "c": "keep", "d": null})
        );
    }
}
