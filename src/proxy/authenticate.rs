//! Stage 3: the client's key → a grant for its route.
//!
//! The key comes from `x-api-key`, or else from `Authorization: Bearer`. On an ai_secret route
//! it must be a keygate key (through the key cache) that may use the route (403 otherwise); on a
//! passthrough route the upstream must accept it, and a keygate key is refused (403) before it
//! could be sent there. While the peer is throttled for failed attempts, only keys already
//! cached as valid get through. Every refusal of the key itself is the same
//! `Unauthorized`, so a client cannot tell a malformed key from a revoked one.

use http::header::{HeaderMap, AUTHORIZATION};
use std::net::IpAddr;

use http::HeaderValue;

use super::forward::Upstream;
use super::limit::Limiters;
use super::passthrough::PassthroughCache;
use crate::config::{Inject, Route};
use crate::crypto::{is_well_formed_key, MasterKey};
use crate::error::ProxyError;
use crate::keycache::{KeyCache, LookupError};
use crate::store::Principal;

/// The header keygate's own keys travel in.
pub const X_API_KEY: &str = "x-api-key";

/// The key the client presented, if exactly one was.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let mut api_keys = headers.get_all(X_API_KEY).iter();
    if let Some(v) = api_keys.next() {
        if api_keys.next().is_some() {
            return None; // two keys: ambiguous, refuse
        }
        return v.to_str().ok().map(str::trim);
    }
    let mut auths = headers.get_all(AUTHORIZATION).iter();
    let v = auths.next()?;
    if auths.next().is_some() {
        return None;
    }
    bearer_token(v.to_str().ok()?)
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// What the authenticate stage grants.
pub enum Grant {
    /// A keygate key.
    Key(Principal),
    /// A passthrough key, validated upstream: the `Authorization` value to forward, and the
    /// number its rate limiter state is keyed by (from its keyed digest).
    Passthrough { bearer: HeaderValue, uid: u128 },
}

/// What authentication reads: the key cache, the passthrough verdicts (with the master key for
/// their digests and the upstream client for validation calls), and the failed-attempt
/// throttle.
pub struct Verifiers<'a> {
    pub keys: &'a KeyCache,
    pub passthrough: &'a PassthroughCache,
    pub master: &'a MasterKey,
    pub upstream: &'a Upstream,
    pub limits: &'a Limiters,
}

/// Authenticates the request for its route: a keygate key allowed on the route, or on a
/// passthrough route a key the upstream accepts.
/// Failed attempts count against `peer`'s allowance; a blocked peer gets 429 before any lookup.
pub async fn authenticate(
    v: &Verifiers<'_>,
    route: (usize, &Route),
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Grant, ProxyError> {
    if let Some(l) = v.limits.ip_blocked(peer) {
        // The throttle guards the store (and a passthrough upstream) against unknown keys. A
        // key already known as valid costs neither, and refusing it would lock out every good
        // client behind the same address (as a sidecar, all of them are 127.0.0.1).
        if !known(v, route, headers).await {
            return Err(ProxyError::RateLimited(l));
        }
    }
    match check(v, route, headers).await {
        Err(ProxyError::Unauthorized) => Err(match v.limits.auth_failed(peer) {
            Some(l) => ProxyError::RateLimited(l),
            None => ProxyError::Unauthorized,
        }),
        other => other,
    }
}

/// Whether the presented key is cached as valid for the route: no store read, no upstream call.
async fn known(v: &Verifiers<'_>, (index, route): (usize, &Route), headers: &HeaderMap) -> bool {
    let Some(key) = presented_key(headers) else {
        return false;
    };
    match &route.inject {
        Inject::Passthrough(_) => Box::pin(v.passthrough.known_valid(v.master, index, key)).await,
        Inject::AiSecret { .. } => v.keys.cached(key).is_some(),
    }
}

async fn check(
    v: &Verifiers<'_>,
    (index, route): (usize, &Route),
    headers: &HeaderMap,
) -> Result<Grant, ProxyError> {
    let key = presented_key(headers).ok_or(ProxyError::Unauthorized)?;
    if let Inject::Passthrough(validate) = &route.inject {
        // A key keygate issued never leaves keygate, whatever its route permissions say.
        if is_well_formed_key(key) && lookup(v.keys, key).await?.is_some() {
            return Err(ProxyError::Forbidden {
                route: route.name.to_string(),
            });
        }
        // Boxed: the validation call (an upstream request and moka's cache) is a future of
        // several KiB, and inline it would size every request's future, which is moved into
        // a box per request (a memcpy of its whole size), for the few routes that pass keys
        // through.
        let (bearer, uid) =
            Box::pin(
                v.passthrough
                    .validate(v.master, v.upstream, (index, route), validate, key),
            )
            .await?;
        return Ok(Grant::Passthrough { bearer, uid });
    }
    let principal = lookup(v.keys, key).await?.ok_or(ProxyError::Unauthorized)?;
    if !principal.may_use(&route.name) {
        return Err(ProxyError::Forbidden {
            route: route.name.to_string(),
        });
    }
    Ok(Grant::Key(principal))
}

/// The key cache's answer on `key`; a store that cannot answer fails closed (503).
async fn lookup(keys: &KeyCache, key: &str) -> Result<Option<Principal>, ProxyError> {
    match keys.authenticate(key).await {
        Ok(found) => Ok(found),
        Err(LookupError::Stale) => Err(ProxyError::StoreUnavailable),
        Err(LookupError::Store(e)) => {
            tracing::error!(error = %e, "key lookup failed");
            Err(ProxyError::StoreUnavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn key_sources() {
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "sk-a")])),
            Some("sk-a")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer sk-b")])),
            Some("sk-b")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  sk-b ")])),
            Some("sk-b")
        );
        assert_eq!(
            presented_key(&headers(&[
                ("x-api-key", "sk-a"),
                ("authorization", "Bearer sk-b")
            ])),
            Some("sk-a")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "a"), ("x-api-key", "b")])),
            None
        );
        assert_eq!(presented_key(&headers(&[])), None);
    }
}
