//! What the command line and the admin API both do, one function per action, so that both
//! check the same things in the same words: a name, a quota, the routes a key may use, a secret
//! value. The CLI (`src/main.rs`) and the admin handlers (`src/admin/`) call these; neither
//! re-implements a check.

use std::io::Read;

use crate::audit::Actor;
use crate::config::{LimitSpec, Route};
use crate::crypto::MasterKey;
use crate::secret::Secret;
use crate::store::{
    issue_keys, AiSecretRecord, AiSecretWrite, ApiKeyRecord, KeyOptions, Role, SecretRef, Store,
    StoreError, WriteMode,
};

/// Why an action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A bad argument; the message names it (the admin API answers 400 with it).
    #[error("{0}")]
    Invalid(String),
    /// The object named does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the secret value failed (stdin closed, not UTF-8 …).
    #[error("cannot read the secret: {0}")]
    Read(#[source] std::io::Error),
}

/// The longest name of a key, secret or env var, and the longest object id.
pub const MAX_NAME: usize = 256;

/// Checks a name (of a key, secret, env var, type) or an object id given as `field`: not
/// blank, at most [`MAX_NAME`] bytes, no control characters (names are printed in tables and
/// logs).
pub fn check_name(field: &str, v: &str) -> Result<(), ActionError> {
    if v.trim().is_empty() {
        return Err(ActionError::Invalid(format!("`{field}` must not be empty")));
    }
    if v.len() > MAX_NAME {
        return Err(ActionError::Invalid(format!(
            "`{field}` must be at most {MAX_NAME} bytes"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(ActionError::Invalid(format!(
            "`{field}` must not contain control characters"
        )));
    }
    Ok(())
}

/// A key's own quota from `per_second` and `burst`, named `field` in the error.
pub fn limit_spec(field: &str, per_second: f64, burst: u32) -> Result<LimitSpec, ActionError> {
    LimitSpec::new(per_second, burst)
        .ok_or_else(|| ActionError::Invalid(format!("`{field}`: {}", LimitSpec::BOUNDS)))
}

/// What a new key (or batch of keys) is.
pub struct NewKeys {
    pub name: String,
    pub role: Role,
    /// The route names it may use; `None`: all.
    pub routes: Option<Vec<String>>,
    pub limit: Option<LimitSpec>,
    /// How many keys, all alike, in one transaction.
    pub count: usize,
}

/// Creates keys for `owner` (org id, user id) after checking the name and that each route
/// named exists in `routes` (the running config's). Returns each key (shown once) and record.
pub fn create_keys(
    store: &dyn Store,
    master: &MasterKey,
    owner: (&str, &str),
    routes: &[Route],
    new: NewKeys,
    by: &Actor,
) -> Result<Vec<(Secret, ApiKeyRecord)>, ActionError> {
    check_name("name", &new.name)?;
    for r in new.routes.iter().flatten() {
        if !routes.iter().any(|c| *c.name == **r) {
            return Err(ActionError::Invalid(format!(
                "`routes`: no route is named {r:?}"
            )));
        }
    }
    let opts = KeyOptions {
        role: new.role,
        routes: new.routes,
        limit: new.limit,
    };
    Ok(issue_keys(
        store, master, owner, &new.name, opts, new.count, by,
    )?)
}

/// Deletes the key `id` (of `org`, when given).
pub fn delete_key(
    store: &dyn Store,
    org: Option<&str>,
    id: &str,
    by: &Actor,
) -> Result<ApiKeyRecord, ActionError> {
    store
        .delete_api_key(org, id, by)?
        .ok_or_else(|| ActionError::NotFound(format!("no key with id {id}")))
}

/// Stores the value of secret `name` (creating it, or keeping its type and metadata).
pub fn put_secret(
    store: &dyn Store,
    org: &str,
    name: &str,
    secret_type: Option<String>,
    value: Secret,
    by: &Actor,
) -> Result<AiSecretRecord, ActionError> {
    check_name("name", name)?;
    if let Some(t) = &secret_type {
        check_name("type", t)?;
    }
    let write = AiSecretWrite {
        name: name.to_owned(),
        secret_type,
        metadata: None,
        secret: Some(value),
    };
    Ok(store.write_ai_secret(org, write, WriteMode::SetValue, by)?)
}

/// Deletes secret `name` of `org`.
pub fn delete_secret(
    store: &dyn Store,
    org: &str,
    name: &str,
    by: &Actor,
) -> Result<AiSecretRecord, ActionError> {
    store
        .delete_ai_secret(org, SecretRef::Name(name), by)?
        .ok_or_else(|| ActionError::NotFound(format!("no secret named {name}")))
}

/// Reads a secret value: all of `input`, less one trailing newline (`\n` or `\r\n`). Refuses
/// an empty value and one with other control characters (it could not go in a header).
pub fn read_secret(mut input: impl Read) -> Result<Secret, ActionError> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    input.read_to_end(&mut buf).map_err(ActionError::Read)?;
    let end = buf
        .strip_suffix(b"\r\n")
        .or_else(|| buf.strip_suffix(b"\n"))
        .map_or(buf.len(), <[u8]>::len);
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| ActionError::Invalid("the secret must be UTF-8 text".into()))?;
    if text.is_empty() {
        return Err(ActionError::Invalid("the secret is empty".into()));
    }
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ActionError::Invalid(
            "the secret holds control characters (a second line?); it cannot be sent in an HTTP header"
                .into(),
        ));
    }
    Ok(Secret::new(text.to_owned()))
}

/// The key table `keys list` prints (never a key; names with odd characters escaped).
pub fn keys_table(keys: &[ApiKeyRecord]) -> String {
    let mut out = format!(
        "{:<36}  {:<24}  {:<5}  {:<11}  {:<24}  {:<24}  {:>9}  {:>9}  EXPOSED\n",
        "ID", "CREATED", "ROLE", "PREVIEW", "NAME", "LAST USED", "REQUESTS", "429s"
    );
    for k in keys {
        out.push_str(&format!(
            "{:<36}  {:<24}  {:<5}  {:<11}  {:<24}  {:<24}  {:>9}  {:>9}  {}\n",
            k.id,
            k.created,
            k.role.as_str(),
            k.preview_name,
            printable(&k.name),
            k.last_used.as_deref().unwrap_or("never"),
            k.request_count,
            k.rate_limited_count,
            k.exposed
                .as_deref()
                .map(|t| format!("yes, at {t}"))
                .unwrap_or_else(|| "no".into())
        ));
    }
    out
}

/// How long before deleting a key its last use calls for a confirmation.
pub const RECENT_USE: std::time::Duration = std::time::Duration::from_secs(3600);

/// When key `k` was last used, in words ("2 minutes ago"), if that was within [`RECENT_USE`]
/// of `now`: deleting it then needs a confirmation.
pub fn used_recently(k: &ApiKeyRecord, now: time::OffsetDateTime) -> Option<String> {
    let t = time::OffsetDateTime::parse(
        k.last_used.as_deref()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    let ago = (now - t).max(time::Duration::ZERO);
    (ago < RECENT_USE).then(|| relative(ago))
}

/// A duration in words, rounded down: "just now", "1 minute ago", "42 minutes ago".
pub fn relative(d: time::Duration) -> String {
    let secs = d.whole_seconds();
    match secs {
        i64::MIN..=9 => "just now".to_owned(),
        10..=59 => format!("{secs} seconds ago"),
        60..=119 => "1 minute ago".to_owned(),
        120..=3599 => format!("{} minutes ago", secs / 60),
        3600..=7199 => "1 hour ago".to_owned(),
        _ => format!("{} hours ago", secs / 3600),
    }
}

/// The audit table `audit list` prints.
pub fn audit_table(events: &[crate::audit::Event]) -> String {
    let mut out = format!(
        "{:>6}  {:<24}  {:<22}  {:<44}  {:<9}  {:<36}  NAME\n",
        "#", "TIME", "ACTION", "ACTOR", "OUTCOME", "OBJECT"
    );
    for e in events {
        out.push_str(&format!(
            "{:>6}  {:<24}  {:<22}  {:<44}  {:<9}  {:<36}  {}\n",
            e.seq,
            e.created,
            printable(&e.action),
            printable(&e.actor.to_string()),
            printable(&e.outcome),
            printable(&format!("{} {}", e.object_type, e.object_id)),
            printable(&e.object_name)
        ));
    }
    out
}

/// Checks the whole audit trail, oldest first, a page at a time, and `expect` (a mark noted
/// earlier) against it. `Ok`: how many events there are, and the mark of the last one to keep
/// elsewhere against a rollback.
pub fn verify_audit(
    store: &dyn Store,
    master: &MasterKey,
    expect: Option<&crate::audit::Mark>,
) -> Result<Result<(i64, Option<crate::audit::Mark>), crate::audit::Broken>, ActionError> {
    let mut v = crate::audit::Verifier::new(master);
    let mut after = 0;
    let mut head = None;
    loop {
        let page = store.audit_trail(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            if let Err(b) = v.check(e) {
                return Ok(Err(b));
            }
            if let Some(m) = expect.filter(|m| m.seq == e.seq) {
                if let Err(b) = m.check(e) {
                    return Ok(Err(b));
                }
            }
        }
        head = Some(crate::audit::Mark::of(last.seq, &last.mac));
    }
    if let Err(b) = v.finish(store.audit_head()?.as_deref()) {
        return Ok(Err(b));
    }
    if let Some(m) = expect.filter(|m| m.seq > v.checked()) {
        return Ok(Err(crate::audit::Broken(format!(
            "the trail ends at #{}, before #{} noted as {m}: it was rolled back to an older \
             copy, or the mark is from another store",
            v.checked(),
            m.seq
        ))));
    }
    Ok(Ok((v.checked(), head)))
}

/// The secret table `secrets list` prints (previews only).
pub fn secrets_table(secrets: &[AiSecretRecord]) -> String {
    let mut out = format!(
        "{:<36}  {:<24}  {:<10}  {:<9}  {:<24}\n",
        "ID", "UPDATED", "TYPE", "PREVIEW", "NAME"
    );
    for s in secrets {
        out.push_str(&format!(
            "{:<36}  {:<24}  {:<10}  {:<9}  {:<24}\n",
            s.id,
            s.updated_at,
            printable(s.secret_type.as_deref().unwrap_or("-")),
            s.preview_secret.as_deref().unwrap_or("-"),
            printable(&s.name)
        ));
    }
    out
}

/// `s` with control characters escaped: a stored name (from an older version, or written
/// around the checks) cannot move the cursor or rewrite a terminal line.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_alike_everywhere() {
        assert!(check_name("name", "ok name").is_ok());
        for bad in ["", "  ", "a\nb", "tab\tname", &"x".repeat(257)] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_lose_one_newline_and_refuse_control_characters() {
        assert_eq!(read_secret(&b"sk-1\n"[..]).unwrap().expose(), "sk-1");
        assert_eq!(read_secret(&b"sk-1\r\n"[..]).unwrap().expose(), "sk-1");
        assert_eq!(read_secret(&b"a\tb"[..]).unwrap().expose(), "a\tb");
        assert!(read_secret(&b"\n"[..]).is_err());
        assert!(read_secret(&b"a\nb\n"[..]).is_err());
        assert!(read_secret(&b"\xff"[..]).is_err());
    }

    #[test]
    fn tables_escape_control_characters() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\x1b[2Jb"), "a\\u{1b}[2Jb");
    }
}
