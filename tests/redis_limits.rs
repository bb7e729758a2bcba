//! Fleet quotas (`[limits] backend = "redis"`) over real TLS: three keygates sharing one
//! private redis-server (and one store, as a fleet does) give a key its quota once, not three
//! times; a refusal spends nothing; with Redis stopped or frozen every instance answers from its
//! local limiter (200 or 429, never 5xx, never unlimited) and the degraded metric says so; with
//! Redis back the quotas are global again within a few seconds.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use keygate::app::{self, Running};
use keygate::config::{Config, LimitSpec};
use keygate::proxy::limit::fleet::{FleetQuotas, RedisLink};
use keygate::proxy::limit::{Limiters, Quotas};
use keygate::store::{issue_key, KeyOptions, Role};
use support::redis::RedisServer;
use support::*;

/// keygate instances of one fleet: one store directory, one Redis.
struct Fleet {
    store_dir: tempfile::TempDir,
    instances: Vec<Running>,
    config_text: String,
}

impl Fleet {
    /// `n` keygates with `limits` (TOML lines of the `[limits]` table, without the backend),
    /// quotas in `redis` under a prefix of this test, `routes_toml` after the defaults.
    async fn start(
        ca: &TestCa,
        up: &FakeUpstream,
        redis: &RedisServer,
        n: usize,
        limits: &str,
        routes_toml: &str,
    ) -> Fleet {
        let store_dir = tempfile::tempdir().unwrap();
        let prefix = format!("kgtest-{}-{}:", std::process::id(), redis.port);
        let extra = format!(
            "[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"{prefix}\"\n{limits}",
            redis.url()
        );
        let mut routes = format!(
            "[[route]]\nprefix = \"/\"\nupstream = \"{}\"\ninject = {{ ai_secret = \"K\" }}\n",
            up.url()
        );
        routes.push_str(&routes_toml.replace("UPSTREAM", &up.url()));
        let text = format!("{}{routes}", config_text(ca, store_dir.path(), &[], &extra));
        {
            let config = Config::parse(&text, "fleet.toml").expect("fleet config");
            let (_, store) = app::open_store(&config, None).unwrap();
            put_secret(store.as_ref(), "K", UPSTREAM_SECRET);
        }
        let mut instances = Vec::new();
        for _ in 0..n {
            let config = Config::parse(&text, "fleet.toml").unwrap();
            instances.push(app::start(config, None).await.expect("keygate starts"));
        }
        Fleet {
            store_dir,
            instances,
            config_text: text,
        }
    }

    /// A new proxy key in the fleet's store.
    fn key(&self, limit: Option<LimitSpec>) -> String {
        let config = Config::parse(&self.config_text, "fleet.toml").unwrap();
        let (master, store) = app::open_store(&config, None).unwrap();
        let t = store.tenant().unwrap();
        let mut options = KeyOptions::role(Role::Proxy);
        options.limit = limit;
        let (k, _) = issue_key(
            store.as_ref(),
            &master,
            (&t.org_id, &t.user_id),
            "fleet",
            options,
            &keygate::audit::Actor::Keygate,
        )
        .unwrap();
        k.expose().to_owned()
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}{path}",
            self.instances[i].proxy_addr.port()
        )
    }

    fn degraded(&self, i: usize) -> (i64, u64) {
        let m = &self.instances[i].state.plane.metrics;
        (m.limiter_degraded_now.get(), m.limiter_degraded.get())
    }

    async fn stop(self) {
        for r in self.instances {
            r.shutdown().await;
        }
        drop(self.store_dir);
    }
}

/// Polls `cond` every 50 ms until it holds, at most `within`; returns how long it took.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Hammers `key` on every instance from `per_instance` tasks each for `secs`; returns
/// (admitted, refused, other statuses). Every task's connection is opened (with one request
/// of `warm_key`) before the clock starts, so that TLS handshakes do not eat into the window.
async fn hammer(
    ca: &TestCa,
    fleet: &Fleet,
    (key, warm_key): (&str, &str),
    per_instance: usize,
    secs: f64,
) -> (u64, u64, u64) {
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let tasks_n = fleet.instances.len() * per_instance;
    let ready = Arc::new(tokio::sync::Barrier::new(tasks_n + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut tasks = Vec::new();
    for i in 0..fleet.instances.len() {
        for _ in 0..per_instance {
            let client = ca.client(false);
            let url = fleet.url(i, "/hammer");
            let warm = get(&fleet.url(i, "/warm"), &[("x-api-key", warm_key)]);
            let (key, counts) = (key.to_owned(), counts.clone());
            let (ready, mut start_rx) = (ready.clone(), start_rx.clone());
            tasks.push(tokio::spawn(async move {
                let (s, _, _) = send(&client, warm).await;
                assert_eq!(s, StatusCode::CREATED, "warm-up request");
                ready.wait().await;
                let end = loop {
                    if let Some(end) = *start_rx.borrow_and_update() {
                        break end;
                    }
                    start_rx.changed().await.expect("start");
                };
                while Instant::now() < end {
                    let res = client
                        .request(get(&url, &[("x-api-key", &key)]))
                        .await
                        .expect("request");
                    let slot = match res.status() {
                        StatusCode::CREATED => 0,
                        StatusCode::TOO_MANY_REQUESTS => 1,
                        _ => 2,
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    ready.wait().await;
    start_tx
        .send(Some(Instant::now() + Duration::from_secs_f64(secs)))
        .expect("tasks wait");
    for t in tasks {
        t.await.unwrap();
    }
    (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_quota_within_two_percent() {
    let redis = RedisServer::start();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let fleet = Fleet::start(
        &ca,
        &up,
        &redis,
        3,
        "default = { per_second = 100, burst = 30 }\n",
        "",
    )
    .await;
    let (key, warm) = (fleet.key(None), fleet.key(None));
    let secs = 5.0;
    let (admitted, refused, other) = hammer(&ca, &fleet, (&key, &warm), 3, secs).await;
    let want = 100.0 * secs + 30.0;
    let off = (admitted as f64 - want) / want * 100.0;
    println!(
        "fleet of 3 keygates, one key at 100/s burst 30 hammered {secs} s: admitted {admitted} \
         (want {want}, {off:+.2} %), refused {refused}"
    );
    assert_eq!(other, 0, "only 201 and 429");
    assert!(
        refused > admitted,
        "not hammered hard enough to measure: {refused} refusals"
    );
    assert!(
        off.abs() <= 2.0,
        "admitted {admitted}, want {want} ± 2 % ({off:+.2} %)"
    );
    let forwarded = up
        .recorded()
        .iter()
        .filter(|r| r.uri.path() == "/hammer")
        .count();
    assert_eq!(
        forwarded as u64, admitted,
        "the upstream saw every admitted request, and only those"
    );
    for i in 0..3 {
        assert_eq!(
            fleet.degraded(i),
            (0, 0),
            "instance {i} used its local limiter"
        );
    }
    fleet.stop().await;
}

#[tokio::test]
async fn a_refusal_spends_no_quota() {
    let redis = RedisServer::start();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    // A token back every 100 s: nothing refills during the test.
    let fleet = Fleet::start(
        &ca,
        &up,
        &redis,
        2,
        "default = { per_second = 0.01, burst = 3 }\n",
        "[[route]]\nname = \"tight\"\nprefix = \"/tight\"\nupstream = \"UPSTREAM\"\ninject = { ai_secret = \"K\" }\nlimit = { per_second = 0.01, burst = 1 }\n",
    )
    .await;
    let key = fleet.key(None);
    let client = ca.client(false);
    let call =
        |i: usize, path: &str| send(&client, get(&fleet.url(i, path), &[("x-api-key", &key)]));
    let (s, h, _) = call(0, "/tight").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"route\";r=0;t=100");
    // Refused by the route, on both instances: the key's own quota is not touched.
    for i in 0..10 {
        let (s, h, _) = call(i % 2, "/tight").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(h["ratelimit-policy"], "\"route\";q=1;w=100");
        assert_eq!(h["retry-after"], "100");
    }
    let (s, h, _) = call(1, "/other").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        h["ratelimit"], "\"default\";r=1;t=200",
        "the route's refusals spent key quota"
    );
    let (s, h, _) = call(0, "/other").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=300");
    let (s, h, body) = call(1, "/other").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(&body[..], br#"{"error":"rate limit exceeded"}"#);
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=100");
    assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=300");
    fleet.stop().await;
}

/// The other direction, on the limiter objects: a key quota that refuses leaves the route's
/// quota unspent (both verdicts are computed before either is written).
#[tokio::test]
async fn a_key_refusal_leaves_the_route_quota_unspent() {
    let redis = RedisServer::start();
    let text = format!(
        "[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"kgunit-{}:\"\n\
         default = {{ per_second = 0.01, burst = 1 }}\n\
         [[route]]\nprefix = \"/\"\nupstream = \"https://u\"\ninject = {{ ai_secret = \"S\" }}\n\
         limit = {{ per_second = 0.01, burst = 2 }}\n",
        redis.url(),
        std::process::id()
    );
    let config = Config::parse(&text, "t").unwrap();
    let keygate::config::LimitsBackend::Redis(r) = &config.limits.backend else {
        panic!("redis backend");
    };
    let metrics = Arc::new(keygate::metrics::Metrics::default());
    let link = RedisLink::start(r, metrics.clone()).await.unwrap();
    assert!(!link.degraded());
    let local = Arc::new(Limiters::new(&config.limits, &config.routes));
    let quotas = FleetQuotas::new(link, &config.limits, &config.routes, local);
    let a = quotas.check(1, None, 0).await.unwrap();
    assert_eq!((a.policy, a.remaining), ("default", 0));
    for _ in 0..10 {
        assert_eq!(
            quotas.check(1, None, 0).await.unwrap_err().policy,
            "default"
        );
    }
    // A larger own quota is a fresh key bucket; the route still has one of its two.
    let own = LimitSpec::new(0.01, 50);
    let a = quotas.check(1, own, 0).await.unwrap();
    assert_eq!((a.policy, a.remaining), ("route", 0));
    assert_eq!(quotas.check(1, own, 0).await.unwrap_err().policy, "route");
    assert_eq!(metrics.limiter_degraded.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_local_limits_and_back_up_means_global_again() {
    let mut redis = RedisServer::start();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let fleet = Fleet::start(
        &ca,
        &up,
        &redis,
        2,
        "default = { per_second = 0.05, burst = 5 }\n",
        "",
    )
    .await;
    let client = ca.client(false);
    let statuses = |key: String, i: usize, n: usize| {
        let (client, url) = (client.clone(), fleet.url(i, "/r"));
        async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let (s, _, _) = send(&client, get(&url, &[("x-api-key", &key)])).await;
                got.push(s.as_u16());
            }
            got
        }
    };
    let admitted = |v: &[u16]| v.iter().filter(|s| **s == 201).count();

    // Global: the burst is shared by both instances.
    let key = fleet.key(None);
    let (a, b) = (statuses(key.clone(), 0, 4).await, statuses(key, 1, 4).await);
    assert_eq!(admitted(&a) + admitted(&b), 5, "{a:?} {b:?}");

    // Stopped: each instance limits alone; the burst still holds on each, nothing fails.
    redis.stop();
    let key = fleet.key(None);
    let started = Instant::now();
    let a = statuses(key.clone(), 0, 8).await;
    let b = statuses(key, 1, 8).await;
    println!(
        "Redis stopped: 16 requests answered in {:?}: {a:?} {b:?}",
        started.elapsed()
    );
    for v in [&a, &b] {
        assert!(v.iter().all(|s| *s == 201 || *s == 429), "{v:?}");
        assert_eq!(admitted(v), 5, "the local burst is enforced: {v:?}");
    }
    for i in 0..2 {
        let (now, checks) = fleet.degraded(i);
        assert_eq!(now, 1, "instance {i} does not report itself degraded");
        assert!(checks >= 8, "instance {i} counted {checks} local checks");
    }
    let metrics = fleet.instances[0]
        .state
        .plane
        .metrics
        .render(&keygate::metrics::Snapshot {
            key_cache_entries: 0,
            key_cache_hits: 0,
            key_cache_misses: 0,
            key_store_staleness: Duration::ZERO,
            limiter_tracked: 0,
            config_generation: 0,
        });
    assert!(
        metrics.lines().any(|l| l == "keygate_limiter_degraded 1"),
        "{metrics}"
    );
    let readyz = format!(
        "https://127.0.0.1:{}/readyz",
        fleet.instances[0].admin_addr.port()
    );
    let (s, _, ready) = admin_call(&client, "GET", &readyz, None, None).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "degraded limits are not a readiness failure: {ready}"
    );
    assert_eq!(
        ready["limits"],
        serde_json::json!({"backend": "redis", "degraded": true})
    );

    // Back: within a few seconds every instance uses Redis again, and the quota is global.
    redis.restart();
    let took = wait_until(Duration::from_secs(10), "back to Redis", || {
        (0..2).all(|i| fleet.degraded(i).0 == 0)
    })
    .await;
    println!("Redis restarted: both instances global again after {took:?}");
    let (_, _, ready) = admin_call(&client, "GET", &readyz, None, None).await;
    assert_eq!(ready["limits"]["degraded"], false);
    let key = fleet.key(None);
    let (a, b) = (statuses(key.clone(), 0, 4).await, statuses(key, 1, 4).await);
    assert_eq!(admitted(&a) + admitted(&b), 5, "{a:?} {b:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_does_not_hang_requests() {
    let redis = RedisServer::start();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let fleet = Fleet::start(
        &ca,
        &up,
        &redis,
        1,
        "default = { per_second = 0.05, burst = 3 }\n",
        "",
    )
    .await;
    let client = ca.client(false);
    let key = fleet.key(None);
    let call = || send(&client, get(&fleet.url(0, "/r"), &[("x-api-key", &key)]));
    assert_eq!(call().await.0, StatusCode::CREATED);
    redis.freeze();
    let started = Instant::now();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(call().await.0.as_u16());
    }
    let took = started.elapsed();
    println!("Redis frozen: 5 requests answered in {took:?}: {got:?}");
    assert!(
        took < Duration::from_secs(2),
        "requests waited on a frozen Redis: {took:?}"
    );
    // The local limiter starts with the full burst of its own.
    assert_eq!(got, [201, 201, 201, 429, 429]);
    assert_eq!(fleet.degraded(0).0, 1);
    redis.thaw();
    wait_until(
        Duration::from_secs(10),
        "back to Redis after the thaw",
        || fleet.degraded(0).0 == 0,
    )
    .await;
    // Redis again: the local limiter has spent its burst and would refuse. Redis remembers
    // the request it admitted before the freeze, and may have run the one that was waiting in
    // its socket when it froze (that request was answered locally): one or two spent of three.
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED, "not answered by Redis");
    let rl = h["ratelimit"].to_str().unwrap();
    assert!(
        rl == "\"default\";r=1;t=40" || rl == "\"default\";r=0;t=60",
        "{rl}"
    );
    fleet.stop().await;
}
