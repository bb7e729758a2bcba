//! W4 (run with `cargo bench --bench keys`): memory per key at 10k / 100k / 1M distinct keys,
//! key cache + rate limiter, as the hot path fills them (each key authenticated once through
//! the key cache, then admitted once by its limiter), and the cost per authentication.
//!
//! Memory is the growth of this process's resident set, divided by the number of keys. The
//! store behind the cache is an in-memory stand-in that knows every key (so every lookup is a
//! hit and is cached); its own memory is not counted, because it is built before the baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::config::{LimitSpec, LimitsConfig};
use keygate::crypto::{KeyDigest, MasterKey};
use keygate::keycache::{KeyCache, KeyCacheSettings};
use keygate::proxy::limit::Limiters;
use keygate::store::{KeyLookup, Principal, Profile, Role, StoreError};

/// Knows every well-formed key: builds its principal from the digest, as a store row would.
struct EveryKey;

impl KeyLookup for EveryKey {
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError> {
        let mut uid = [0u8; 16];
        uid.copy_from_slice(&digest[..16]);
        let uid = u128::from_be_bytes(uid);
        Ok((
            Some(Principal {
                key_uid: uid,
                profile: Arc::new(Profile {
                    org_id: "01a2022f-0e2f-772f-9dfc-9cf9480aec80".into(),
                    user_id: "01a2022f-0e2f-772f-9dfc-9cfab4b7475b".into(),
                    role: Role::Proxy,
                    routes: None,
                    limit: None,
                }),
            }),
            1,
        ))
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn key(i: u64) -> String {
    // sk- + 48 characters of [A-Za-z0-9]: the counter in base 62, padded.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut body = [b'a'; 48];
    let mut n = i;
    for slot in body.iter_mut().rev() {
        *slot = A[(n % 62) as usize];
        n /= 62;
    }
    format!("sk-{}", String::from_utf8_lossy(&body))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let master = Arc::new(MasterKey::from_bytes(&[5u8; 32]));
    for n in [10_000u64, 100_000, 1_000_000] {
        let cache = KeyCache::new(
            Arc::new(EveryKey),
            master.clone(),
            KeyCacheSettings {
                ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(5),
                capacity: 2_000_000,
                staleness_bound: Duration::from_secs(3600),
            },
            1,
        );
        cache.note_revision(1);
        let spec = LimitSpec::new(1000.0, 2000).expect("quota");
        let limits = Limiters::new(
            &LimitsConfig {
                default: spec,
                auth_failures: spec,
                admin: spec,
                backend: Default::default(),
            },
            &[],
        );
        let keys: Vec<String> = (0..n).map(|i| key(i * 7919 + 13)).collect();
        let before = rss_kib();
        let t = Instant::now();
        for k in &keys {
            let p = cache.authenticate(k).await.expect("lookup").expect("known");
            let _ = limits.check_key(p.key_uid, p.limit(), 0);
        }
        let first = t.elapsed();
        let after = rss_kib();
        // Second pass: every key is now a cache hit.
        let t = Instant::now();
        for k in &keys {
            let p = cache.authenticate(k).await.expect("lookup").expect("known");
            let _ = limits.check_key(p.key_uid, p.limit(), 0);
        }
        let hit = t.elapsed();
        println!(
            "{n:>9} keys: {:>6.0} bytes/key (cache + limiter; RSS +{} KiB), first sight {:>5.0} ns/key, cached auth + limit {:>5.0} ns/request",
            (after.saturating_sub(before) * 1024) as f64 / n as f64,
            after.saturating_sub(before),
            first.as_nanos() as f64 / n as f64,
            hit.as_nanos() as f64 / n as f64,
        );
        if n == 100_000 {
            // Where the time goes, per request, on the same keys.
            let t = Instant::now();
            let mut x = 0u8;
            for k in &keys {
                x ^= master.digest(k)[0];
            }
            let digest = t.elapsed();
            let t = Instant::now();
            for (i, _) in keys.iter().enumerate() {
                let _ = limits.check_key(i as u128, None, 0);
            }
            let limit = t.elapsed();
            let t = Instant::now();
            for _ in 0..n {
                let _ = tokio::time::Instant::now();
            }
            let clock = t.elapsed();
            println!(
                "      parts: HMAC digest {:.0} ns, limiter check {:.0} ns, tokio clock read {:.0} ns ({x})",
                digest.as_nanos() as f64 / n as f64,
                limit.as_nanos() as f64 / n as f64,
                clock.as_nanos() as f64 / n as f64,
            );
        }
        drop(keys);
    }
}
