//! The hot path's instruction count (`cargo bench --bench hotpath`, or for a count that does not
//! move with machine load, under callgrind):
//!
//! ```text
//! cargo bench --bench hotpath --no-run
//! BIN=$(ls -t target/release/deps/hotpath-* | grep -v '\.d$' | head -1)
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/hot1.cg $BIN 100000   # "I refs: A"
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/hot2.cg $BIN 200000   # "I refs: B"
//! # (B − A) ÷ 100000 = instructions per request, set-up cancelled out;
//! # callgrind_annotate /tmp/hot2.cg shows where they go.
//! ```
//!
//! One "request" here is what keygate does per proxied request before forwarding, for a key
//! already in the cache: the cached authentication (staleness check, HMAC digest, cache hit),
//! the rate limit check with its `RateLimit` value, and the strip-and-inject of headers on a
//! typical request. TLS, HTTP parsing and the upstream leg are not in it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::config::{LimitSpec, LimitsConfig};
use keygate::crypto::{KeyDigest, MasterKey};
use keygate::keycache::{KeyCache, KeyCacheSettings};
use keygate::proxy::limit::{Limiters, Quotas};
use keygate::store::{KeyLookup, Principal, Profile, Role, StoreError};

struct OneKey(KeyDigest);

impl KeyLookup for OneKey {
    fn principal_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<(Option<Principal>, u64), StoreError> {
        let p = (digest == &self.0).then(|| Principal {
            key_uid: 7,
            profile: Arc::new(Profile {
                org_id: "org".into(),
                user_id: "user".into(),
                role: Role::Proxy,
                routes: None,
                limit: None,
            }),
        });
        Ok((p, 1))
    }
}

fn request(key: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("host", "127.0.0.1:8443".parse().unwrap());
    h.insert("user-agent", "bench/1.0".parse().unwrap());
    h.insert("accept", "*/*".parse().unwrap());
    h.insert("x-api-key", key.parse().unwrap());
    h.insert("content-type", "application/json".parse().unwrap());
    h
}

async fn hot_loop(
    cache: &KeyCache,
    limits: &dyn Quotas,
    key: &str,
    bearer: &http::HeaderValue,
    n: u64,
) -> u64 {
    let mut ok = 0;
    for _ in 0..n {
        let mut headers = request(key);
        let k = keygate::proxy::authenticate::presented_key(&headers).map(str::to_owned);
        let Some(p) = cache
            .authenticate(k.as_deref().unwrap_or(""))
            .await
            .ok()
            .flatten()
        else {
            continue;
        };
        // Through the seam the proxy uses (`dyn Quotas`, a boxed future), as `proxy::limit` does.
        if let Ok(admitted) = limits.check(p.key_uid, p.limit(), 0).await {
            let v = keygate::error::admission_header(&admitted);
            keygate::proxy::headers::strip_hop_by_hop(&mut headers);
            headers.remove("x-api-key");
            headers.remove("host");
            headers.insert(http::header::AUTHORIZATION, bearer.clone());
            headers.insert("ratelimit", v);
            ok += 1;
        }
    }
    ok
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let master = Arc::new(MasterKey::from_bytes(&[5u8; 32]));
    let key = master.generate_key().expect("key");
    let cache = KeyCache::new(
        Arc::new(OneKey(master.digest(key.expose()))),
        master.clone(),
        KeyCacheSettings {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            capacity: 1000,
            staleness_bound: Duration::from_secs(3600),
        },
        1,
    );
    cache.note_revision(1);
    // A quota the loop never exhausts, so every iteration takes the admitted path.
    let spec = LimitSpec::new(1_000_000.0, 1_000_000).expect("quota");
    let limits = Limiters::new(
        &LimitsConfig {
            default: spec,
            auth_failures: spec,
            admin: spec,
            backend: Default::default(),
        },
        &[],
    );
    let bearer = http::HeaderValue::from_static("Bearer upstream-secret");
    let t = Instant::now();
    let ok = hot_loop(&cache, &limits, key.expose(), &bearer, n).await;
    let took = t.elapsed();
    println!(
        "hot path (cached auth + limit + inject): {:.0} ns/request over {n} requests ({ok} admitted)",
        took.as_nanos() as f64 / n as f64
    );
}
