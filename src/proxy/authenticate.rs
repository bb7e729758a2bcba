//! Stage 1: the client's key → `Principal`, through the key cache.
//!
//! The key comes from `x-api-key`, or else from `Authorization: Bearer`. Every failure is the
//! same `Unauthorized`, so a client cannot tell a malformed key from a revoked one.

use std::sync::Arc;

use http::header::{HeaderMap, AUTHORIZATION};

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

/// Authenticates the request's key.
pub async fn authenticate(
    keys: &KeyCache,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, ProxyError> {
    let key = presented_key(headers).ok_or(ProxyError::Unauthorized)?;
    match keys.authenticate(key).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(ProxyError::Unauthorized),
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
