//! Passthrough keys: on an `inject = "passthrough"` route the client's own key goes upstream as
//! `Authorization: Bearer <key>`. The key is unknown here, so it is checked by one call to the
//! upstream's validation endpoint and the verdict cached by keyed digest (positive and negative
//! TTLs per route).
//!
//! ```text
//!  key ──shape ok?──no──▶ 401 (no upstream call)
//!   │ digest (HMAC with the pepper; the key itself is never kept)
//!  cache hit ──▶ verdict
//!  miss ──▶ one validation call per (route, digest), concurrent misses wait for it
//!        2xx ──▶ valid (ttl)    401/403 ──▶ invalid (negative ttl)
//!        anything else, timeout, unreachable ──▶ 502, nothing cached, never "let it through"
//! ```

use std::time::Duration;

use http::HeaderValue;

use super::forward::Upstream;
use crate::config::{Route, Validate};
use crate::crypto::{KeyDigest, MasterKey};
use crate::error::ProxyError;

#[derive(Clone, Copy)]
struct Verdict {
    valid: bool,
    ttl: Duration,
}

struct VerdictTtl;

impl moka::Expiry<(usize, KeyDigest), Verdict> for VerdictTtl {
    fn expire_after_create(
        &self,
        _: &(usize, KeyDigest),
        v: &Verdict,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// Cached verdicts on passthrough keys.
pub struct PassthroughCache {
    cache: moka::future::Cache<(usize, KeyDigest), Verdict>,
}

/// The longest passthrough key accepted.
const MAX_KEY: usize = 4096;

impl PassthroughCache {
    /// A cache of at most `capacity` verdicts.
    pub fn new(capacity: u64) -> Self {
        PassthroughCache {
            cache: moka::future::Cache::builder()
                .max_capacity(capacity)
                .expire_after(VerdictTtl)
                .build(),
        }
    }

    /// Forgets every verdict (after a reload: route indexes may name other routes).
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Whether `key` is cached as valid for route `index` (no upstream call).
    pub async fn known_valid(&self, master: &MasterKey, index: usize, key: &str) -> bool {
        key.len() <= MAX_KEY
            && self
                .cache
                .get(&(index, master.digest(key)))
                .await
                .is_some_and(|v| v.valid)
    }

    /// Checks `key` for route `index`; returns the `Authorization` value to forward and the
    /// number its rate limiter state is keyed by.
    pub async fn validate(
        &self,
        master: &MasterKey,
        upstream: &Upstream,
        (index, route): (usize, &Route),
        v: &Validate,
        key: &str,
    ) -> Result<(HeaderValue, u128), ProxyError> {
        if key.is_empty() || key.len() > MAX_KEY || key.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(ProxyError::Unauthorized);
        }
        let mut bearer = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| ProxyError::Unauthorized)?;
        bearer.set_sensitive(true);
        let digest = master.digest(key);
        let probe = bearer.clone();
        let verdict = self
            .cache
            .try_get_with((index, digest), async move {
                let status = match upstream.validate_key(route, &v.path, probe).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(route = %route.name, error = %crate::error::chain(&e),
                            "passthrough key validation call failed");
                        return Err(ProxyError::PassthroughValidation);
                    }
                };
                match status {
                    200..=299 => Ok(Verdict { valid: true, ttl: v.ttl }),
                    401 | 403 => Ok(Verdict { valid: false, ttl: v.negative_ttl }),
                    other => {
                        tracing::warn!(route = %route.name, status = other, "passthrough key validation got an unexpected status");
                        Err(ProxyError::PassthroughValidation)
                    }
                }
            })
            .await
            .map_err(|_| ProxyError::PassthroughValidation)?;
        if verdict.valid {
            let mut uid = [0u8; 16];
            uid.copy_from_slice(&digest[..16]);
            Ok((bearer, u128::from_be_bytes(uid)))
        } else {
            Err(ProxyError::Unauthorized)
        }
    }
}
