//! What each route adds upstream, decrypted once and kept as prebuilt, sensitive header values,
//! so the hot path does one atomic load and no store access or formatting.
//!
//! ```text
//!  poller sees the secrets or env_vars revision move (or an admin write) ──▶ refresh():
//!    read + decrypt each route's ai_secret and the org's env vars ──▶ build header values
//!    ──▶ swap in a new table (ArcSwap)
//!  request ──▶ load the table ──▶ the `Resolved` of its route (an Arc clone)
//! ```
//!
//! A request that loaded the old table keeps the old credential to its end; the next one uses
//! the new table: rotation without errors.
//!
//! The header follows the ai_secret `type`: `anthropic` → `x-api-key` (+ `anthropic-version`
//! when the client sent none), `google` → `x-goog-api-key`, `azure` → `api-key`, everything
//! else → `Authorization: Bearer`. A route may override the header name and value prefix.
//! `metadata.additionalHeaders` of the secret and the route's `set_headers` are added.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderName, AUTHORIZATION};
use http::HeaderValue;

use crate::config::{Inject, Route};
use crate::secret::Secret;
use crate::store::{ObjectType, Store, StoreError, Tenant};

/// The Anthropic API version sent when the client names none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Everything a route adds to a forwarded request.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Credential headers, replacing any of the same name.
    pub credential: Vec<(HeaderName, HeaderValue)>,
    /// Headers set only when the client sent none (`anthropic-version`).
    pub defaults: Vec<(HeaderName, HeaderValue)>,
    /// `metadata.additionalHeaders` and the route's `set_headers`, replacing the client's.
    pub extra: Vec<(HeaderName, HeaderValue)>,
    /// A route-specific credential header to strip from the client's request, too.
    pub strip: Option<HeaderName>,
    /// The injected secret, so that an upstream echoing it can be caught.
    pub secret: Option<Secret>,
    /// The route's name, for the log line when an echo is caught.
    pub route: Arc<str>,
}

/// One route's state.
#[derive(Clone)]
pub enum Credential {
    /// Ready to forward.
    Ready(Arc<Resolved>),
    /// The named secret or env var does not exist (yet), or holds no usable value.
    Missing,
}

/// The credentials of all routes, indexed like the configured routes.
pub struct Credentials {
    table: ArcSwap<Vec<Credential>>,
}

impl Credentials {
    /// An empty table (every route `Missing`) until the first refresh.
    pub fn new(routes: usize) -> Self {
        Credentials {
            table: ArcSwap::from_pointee(vec![Credential::Missing; routes]),
        }
    }

    /// The credential of route `index`.
    pub fn get(&self, index: usize) -> Credential {
        self.table
            .load()
            .get(index)
            .cloned()
            .unwrap_or(Credential::Missing)
    }

    /// Re-reads every route's secret and the org's env vars, and swaps the table. Blocking.
    /// Warns (without any value) about each route left without a credential.
    pub fn refresh(
        &self,
        store: &dyn Store,
        tenant: &Tenant,
        routes: &[Route],
    ) -> Result<(), StoreError> {
        let env = org_env(store, tenant)?;
        let mut table = Vec::with_capacity(routes.len());
        for route in routes {
            let cred = match resolve(store, tenant, &env, route)? {
                Ok(r) => Credential::Ready(Arc::new(r)),
                Err(why) => {
                    tracing::warn!(route = %route.name, reason = %why,
                        "route has no credential configured; it answers 503 until it does");
                    Credential::Missing
                }
            };
            table.push(cred);
        }
        self.table.store(Arc::new(table));
        Ok(())
    }
}

/// The org's env vars, by name.
fn org_env(store: &dyn Store, tenant: &Tenant) -> Result<HashMap<String, Secret>, StoreError> {
    let org = (tenant.org_id.as_str(), tenant.org_name.as_str());
    Ok(
        crate::store::scope_env(store, org, ObjectType::Organization, &tenant.org_id)?
            .into_iter()
            .map(|(rec, value)| (rec.name, value))
            .collect(),
    )
}

/// The header name and value prefix an ai_secret type calls for.
pub fn provider_header(secret_type: Option<&str>) -> (HeaderName, &'static str) {
    match secret_type.map(str::to_ascii_lowercase).as_deref() {
        Some("anthropic") => (HeaderName::from_static("x-api-key"), ""),
        Some("google") => (HeaderName::from_static("x-goog-api-key"), ""),
        Some("azure") => (HeaderName::from_static("api-key"), ""),
        _ => (AUTHORIZATION, "Bearer "),
    }
}

fn sensitive(v: &str) -> Option<HeaderValue> {
    super::headers::added_value(v).ok()
}

/// A route's additions, or why it has none.
fn resolve(
    store: &dyn Store,
    tenant: &Tenant,
    env: &HashMap<String, Secret>,
    route: &Route,
) -> Result<Result<Resolved, String>, StoreError> {
    let mut r = Resolved {
        route: route.name.clone(),
        ..Resolved::default()
    };
    if let Inject::AiSecret {
        name,
        header,
        prefix,
    } = &route.inject
    {
        let Some((rec, value)) = store.ai_secret_value(&tenant.org_id, name)? else {
            return Ok(Err(format!(
                "ai_secret {name} does not exist or has no value"
            )));
        };
        let (type_header, type_prefix) = provider_header(rec.secret_type.as_deref());
        let name_h = header.clone().unwrap_or_else(|| type_header.clone());
        let prefix = match (prefix, header) {
            (Some(p), _) => p.as_str(),
            (None, Some(h)) if *h != type_header => "",
            (None, _) => type_prefix,
        };
        let Some(v) = sensitive(&format!("{prefix}{}", value.expose())) else {
            return Ok(Err(format!(
                "ai_secret {name} holds characters not allowed in an HTTP header"
            )));
        };
        r.credential.push((name_h.clone(), v));
        if rec
            .secret_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("anthropic"))
            && header.is_none()
        {
            r.defaults.push((
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            ));
        }
        r.strip = header.clone();
        if let Some(extra) = rec
            .metadata
            .as_ref()
            .and_then(|m| m.get("additionalHeaders"))
        {
            // The admin API checks this at write time; a row written before that check (or
            // by another tool) is checked again here, with the same rules.
            match super::headers::additional_headers(extra) {
                Ok(headers) => r.extra.extend(headers),
                Err(why) => return Ok(Err(format!("ai_secret {name}: {why}"))),
            }
        }
        r.secret = Some(value);
    }
    for (h, template) in &route.set_headers {
        let rendered = match template.render(|n| env.get(n).map(Secret::expose)) {
            Ok(v) => v,
            Err(missing) => {
                return Ok(Err(format!(
                    "env var {missing} (for set_headers.{h}) does not exist"
                )))
            }
        };
        let Ok(v) = super::headers::added_value(&rendered) else {
            return Ok(Err(format!(
                "set_headers.{h} renders to a value not allowed in an HTTP header"
            )));
        };
        r.extra.push((h.clone(), v));
    }
    // An added header never replaces the credential itself.
    if let Some((h, _)) = r
        .extra
        .iter()
        .find(|(h, _)| r.credential.iter().any(|(c, _)| c == h))
    {
        return Ok(Err(format!(
            "an added header ({h}) would replace the route's credential header"
        )));
    }
    Ok(Ok(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_headers_follow_the_type() {
        assert_eq!(provider_header(Some("openai")), (AUTHORIZATION, "Bearer "));
        assert_eq!(provider_header(Some("Anthropic")).0, "x-api-key");
        assert_eq!(provider_header(Some("google")).0, "x-goog-api-key");
        assert_eq!(provider_header(Some("azure")).0, "api-key");
        assert_eq!(provider_header(Some("mistral")), (AUTHORIZATION, "Bearer "));
        assert_eq!(provider_header(None), (AUTHORIZATION, "Bearer "));
    }
}
