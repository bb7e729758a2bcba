//! What every store backend shares and that is not SQL: ids and timestamps, sealing and its
//! context strings, how a named write treats an existing object, name conflicts, cursor
//! positions, how a key's routes and quota are stored, tenant bootstrap and the master-key
//! fingerprint check. SQLite and PostgreSQL call these, so the two cannot drift apart.

use std::sync::Arc;

use serde_json::Map;

use super::{
    AiSecretPatch, AiSecretRecord, AiSecretWrite, ApiKeyRecord, EnvVarRecord, Page, StoreError,
    WriteMode,
};
use crate::audit::{action, Actor, NewEvent};
use crate::config::LimitSpec;
use crate::crypto::MasterKey;
use crate::secret::Secret;

/// A time in the stored and wire form: RFC 3339, milliseconds, `Z`.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// The current time as the wire format wants it: RFC 3339, milliseconds, `Z`. Stored as text
/// of this fixed shape, so that text order is time order in every backend.
pub fn now_rfc3339() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// A new id (UUID v7) and the `created` time it encodes.
pub fn new_id() -> (String, String) {
    let id = uuid::Uuid::now_v7();
    let created = created_of(&id).unwrap_or_else(now_rfc3339);
    (id.to_string(), created)
}

/// The creation time a UUID v7 encodes.
fn created_of(id: &uuid::Uuid) -> Option<String> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(
        secs as i128 * 1_000_000_000 + nanos as i128,
    )
    .ok()?;
    Some(format_time(t))
}

/// Where a cursor whose object is gone stands: the time its UUID v7 encodes.
pub fn cursor_of_deleted(id: &str) -> Result<(String, String), StoreError> {
    uuid::Uuid::parse_str(id)
        .ok()
        .and_then(|u| created_of(&u))
        .map(|created| (created, id.to_owned()))
        .ok_or_else(|| StoreError::UnknownCursor(id.to_owned()))
}

/// How a page is cut and ordered: (comparison against the cursor, SQL order, whether the rows
/// come back oldest first and must be reversed).
pub fn page_order(page: &Page) -> (Option<&'static str>, &'static str, bool) {
    match page {
        Page::First => (None, "DESC", false),
        Page::After(_) => (Some("<"), "DESC", false),
        Page::Before(_) => (Some(">"), "ASC", true),
    }
}

/// The key id as the number limiter state is keyed by.
pub fn key_uid(id: &str) -> u128 {
    uuid::Uuid::parse_str(id)
        .map(|u| u.as_u128())
        .unwrap_or_default()
}

/// A key's route list, stored as a JSON array (NULL: all routes).
pub fn routes_from(text: Option<String>) -> Option<Vec<String>> {
    // An unreadable list grants nothing rather than everything.
    text.map(|t| serde_json::from_str(&t).unwrap_or_default())
}

/// The stored form of a key's route list.
pub fn routes_text(routes: &Option<Vec<String>>) -> Option<String> {
    routes
        .as_ref()
        .map(|r| serde_json::Value::from(r.clone()).to_string())
}

/// A key's own quota, from its two columns (both NULL: the default).
pub fn limit_from(per_second: Option<f64>, burst: Option<i64>) -> Option<LimitSpec> {
    LimitSpec::new(per_second?, u32::try_from(burst?).ok()?)
}

/// The two columns of a key's own quota.
pub fn limit_columns(limit: Option<LimitSpec>) -> (Option<f64>, Option<i64>) {
    (
        limit.map(|l| l.per_second()),
        limit.map(|l| i64::from(l.burst)),
    )
}

/// The stored form of an ai_secret's metadata.
pub fn metadata_text(m: &Option<Map<String, serde_json::Value>>) -> Option<String> {
    m.as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string())
}

/// An ai_secret's metadata from its stored form.
pub fn metadata_from(text: Option<String>) -> Option<Map<String, serde_json::Value>> {
    text.and_then(|m| serde_json::from_str(&m).ok())
}

/// The conflict a taken name is.
pub fn name_taken(what: &str, name: &str) -> StoreError {
    StoreError::Conflict(format!("an {what} named {name:?} already exists"))
}

/// What a named write does to the object of that name, when there is one.
pub enum Planned<R> {
    /// POST on an existing name: return it unmodified.
    Existing(R),
    /// Update the existing object (its id) with these fields.
    Update {
        id: String,
        secret_type: Option<String>,
        metadata: Option<String>,
    },
    /// Insert a new object.
    Insert,
}

/// The write modes of an ai_secret: POST keeps an existing one, PUT replaces its fields (an
/// omitted value keeps the stored one), the CLI's `secrets put` sets the value and keeps the
/// rest unless given.
pub fn plan_secret_write(
    existing: Option<AiSecretRecord>,
    w: &AiSecretWrite,
    mode: WriteMode,
) -> Planned<AiSecretRecord> {
    match (existing, mode) {
        (None, _) => Planned::Insert,
        (Some(rec), WriteMode::CreateOrGet) => Planned::Existing(rec),
        (Some(rec), WriteMode::Replace) => Planned::Update {
            id: rec.id,
            secret_type: w.secret_type.clone(),
            metadata: metadata_text(&w.metadata),
        },
        (Some(rec), WriteMode::SetValue) => Planned::Update {
            id: rec.id,
            secret_type: w.secret_type.clone().or(rec.secret_type),
            metadata: metadata_text(&w.metadata.clone().or(rec.metadata)),
        },
    }
}

/// The fields of an ai_secret after a PATCH: (name, type, metadata). Metadata is deep-merged.
pub fn patched_secret(
    rec: &AiSecretRecord,
    p: &AiSecretPatch,
) -> (String, Option<String>, Option<String>) {
    let mut metadata = rec.metadata.clone();
    if let Some(patch) = p.metadata.clone() {
        super::merge_metadata(metadata.get_or_insert_with(Map::new), patch);
    }
    (
        p.name.clone().unwrap_or_else(|| rec.name.clone()),
        p.secret_type.clone().or_else(|| rec.secret_type.clone()),
        metadata_text(&metadata),
    )
}

/// Seals and opens stored values under the master key. The context string binds each sealed
/// value to its kind and id, so a sealed value copied onto another row does not open.
#[derive(Clone)]
pub struct Sealer(pub Arc<MasterKey>);

/// The kinds of sealed values, as their context strings name them.
#[derive(Clone, Copy)]
pub enum Sealed {
    AiSecret,
    EnvVar,
}

impl Sealed {
    fn context(self, id: &str) -> String {
        match self {
            Sealed::AiSecret => format!("ai_secret:{id}"),
            Sealed::EnvVar => format!("env_var:{id}"),
        }
    }
}

impl Sealer {
    /// The sealed bytes of `value` for the object `id`.
    pub fn seal(&self, kind: Sealed, id: &str, value: &Secret) -> Result<Vec<u8>, StoreError> {
        Ok(self.0.seal(&kind.context(id), value.expose().as_bytes())?)
    }

    /// The value sealed for the object `id`.
    pub fn open(&self, kind: Sealed, id: &str, sealed: &[u8]) -> Result<Secret, StoreError> {
        Ok(self.0.open(&kind.context(id), sealed)?)
    }

    /// What the store keeps to recognise its master key.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.0.fingerprint()
    }
}

/// The master-key check every backend makes before it reads or writes anything else: `Ok(true)`
/// when the store has no fingerprint yet (the caller stores this one), `Ok(false)` when it
/// matches, an error when the store was made with another master key.
pub fn fingerprint_missing(stored: Option<&[u8]>, ours: &[u8; 32]) -> Result<bool, StoreError> {
    match stored {
        None => Ok(true),
        Some(v) if v == ours.as_slice() => Ok(false),
        Some(_) => Err(StoreError::WrongMasterKey),
    }
}

/// The default org and its first user, for a store that has none: ids and creation time.
pub struct NewTenant {
    pub org_id: String,
    pub org_name: &'static str,
    pub user_id: String,
    pub created: String,
}

impl NewTenant {
    pub fn generate() -> Self {
        let (org_id, created) = new_id();
        NewTenant {
            org_id,
            org_name: "default",
            user_id: new_id().0,
            created,
        }
    }
}

/// The audit event of a change to key `k`.
pub fn key_event(by: &Actor, action: &'static str, k: &ApiKeyRecord) -> NewEvent {
    NewEvent::change(by, &k.org_id, action, "api_key", &k.id, &k.name)
}

/// The audit event of a change to ai_secret `s`.
pub fn secret_event(by: &Actor, action: &'static str, s: &AiSecretRecord) -> NewEvent {
    NewEvent::change(by, &s.org_id, action, "ai_secret", &s.id, &s.name)
}

/// The audit event of a change to env var `e`.
pub fn env_event(by: &Actor, action: &'static str, e: &EnvVarRecord) -> NewEvent {
    NewEvent::change(by, &e.org_id, action, "env_var", &e.id, &e.name)
}

/// The events of finding key `k` sent over cleartext, by keygate: flagged (the first time only)
/// and, with `revoke`, revoked.
pub fn exposed_events(k: &ApiKeyRecord, first: bool, revoke: bool) -> Vec<NewEvent> {
    let flagged = first.then(|| key_event(&Actor::Keygate, action::KEY_EXPOSED, k));
    let revoked = revoke.then(|| key_event(&Actor::Keygate, action::KEY_REVOKED, k));
    flagged.into_iter().chain(revoked).collect()
}

/// What a write of an existing ai_secret is: PUT replaces it, the CLI's `secrets put` sets
/// its value.
pub fn secret_write_action(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Replace => action::SECRET_REPLACED,
        WriteMode::SetValue | WriteMode::CreateOrGet => action::SECRET_CHANGED,
    }
}
