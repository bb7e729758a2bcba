//! Fleet mode end to end: several `keygate serve` processes on one PostgreSQL database (a
//! private server from Debian's package), over TLS on 127.0.0.1:0, with the recording fake
//! upstream. Changes made through any instance take effect on the others within a second
//! (measured and printed); the outages of the shared store are survived as documented.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::StatusCode;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::json;
use support::postgres::PgServer;
use support::*;

/// The tests of this file run one at a time: each starts up to three keygate processes and
/// measures times and rates that a neighbour's load on this 2-core machine would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The fleet's shared master key (64 hex characters), given to every instance.
const MASTER: &str = "6b657967617465206669656574206d6173746572206b6579206f6e6c79212121";
const SECRET_ONE: &str = "fleet-upstream-secret-ONE-7Hq2";
const SECRET_TWO: &str = "fleet-upstream-secret-TWO-9Zx4";

/// One instance's directory and config: its own certificate and files, the shared database.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// Writes an instance config: a route `/v1/` to `upstream` injecting `OPENAI`, the store at
/// `url` (when given; else the URL comes from the environment), and `extra` TOML.
fn node(ca: &TestCa, upstream: &str, url: Option<&str>, extra: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue("keygate");
    let url_line = url.map(|u| format!("url = {u:?}\n")).unwrap_or_default();
    let text = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [store]\n{url_line}path = {db:?}\nmaster_key_file = {mk:?}\ntimeout = \"2s\"\n\
         [upstream]\nca_file = {ca_file:?}\n\
         {extra}\n\
         [[route]]\nprefix = \"/v1/\"\nupstream = {upstream:?}\ninject = {{ ai_secret = \"OPENAI\" }}\n",
        db = dir.path().join("unused.db"),
        mk = dir.path().join("unused.key"),
        ca_file = ca.ca_file,
    );
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, text).unwrap();
    Node { dir, config }
}

async fn serve(n: &Node, env: &[(&str, &str)]) -> KeygateProcess {
    let mut env = env.to_vec();
    env.push(("KEYGATE_MASTER_KEY", MASTER));
    KeygateProcess::serve(
        n.dir.path(),
        &["--config", n.config.to_str().unwrap()],
        &env,
    )
    .await
}

/// A proxied GET with `key`: (status, the authorization the upstream got, if it got one).
async fn call(
    client: &Client<HttpsConnector<HttpConnector>, TestBody>,
    kg: &KeygateProcess,
    up: &FakeUpstream,
    key: &str,
) -> (StatusCode, Option<String>) {
    let marker = format!("/v1/probe/{}", uuid::Uuid::new_v4());
    let (status, _, _) = send(client, get(&kg.url(&marker), &[("x-api-key", key)])).await;
    let seen = up
        .recorded()
        .into_iter()
        .find(|r| r.uri.path() == marker)
        .and_then(|r| {
            r.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
        });
    (status, seen)
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns how long it took.
async fn until<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A database of the test's own on the shared server, dropped at the end.
struct TestDb {
    name: String,
}

impl TestDb {
    fn new(tag: &str) -> Self {
        TestDb {
            name: PgServer::shared().create_test_database(tag),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        PgServer::shared().drop_database(&self.name);
    }
}

/// Asserts that no log holds a key, a secret or the database password.
fn assert_no_secrets(logs: &[String], secrets: &[&str]) {
    for (i, log) in logs.iter().enumerate() {
        for s in secrets {
            assert!(
                !log.contains(s),
                "instance {i}'s log holds a secret ({} characters)",
                s.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_any_instance_apply_on_every_other_within_a_second() {
    let _serial = SERIAL.lock().await;
    let pg = PgServer::shared();
    let db = TestDb::new("fleet_changes");
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let client = ca.client(false);
    // Polling every 5 s: what arrives within a second was pushed (LISTEN/NOTIFY).
    let extra = "[keys]\npoll_interval = \"5s\"\nstaleness_bound = \"30s\"\ncache_ttl = \"60s\"\n";
    let with_password = pg.url(&db.name);
    let without_password = pg.url_without_password(&db.name);
    // Three ways to give the password: in the file's URL, in KEYGATE_STORE_URL, in PGPASSWORD.
    let a_node = node(&ca, &up.url(), Some(&with_password), extra);
    let b_node = node(&ca, &up.url(), None, extra);
    let c_node = node(&ca, &up.url(), Some(&without_password), extra);
    let a = serve(&a_node, &[]).await;
    let admin_key = a
        .stdout_lines
        .first()
        .expect("A minted the first admin key")
        .clone();
    let b = serve(&b_node, &[("KEYGATE_STORE_URL", &with_password)]).await;
    let c = serve(&c_node, &[("PGPASSWORD", pg.password())]).await;
    assert!(
        b.stdout_lines.is_empty() && c.stdout_lines.is_empty(),
        "one first admin key"
    );

    // A secret written through A, a key created through A: B and C use both at once.
    let (s, _, _) = admin_call(
        &client,
        "POST",
        &a.admin_url("/v1/ai_secret"),
        Some(&admin_key),
        Some(json!({"name": "OPENAI", "type": "openai", "secret": SECRET_ONE})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = admin_call(
        &client,
        "POST",
        &a.admin_url("/v1/api_key"),
        Some(&admin_key),
        Some(json!({"name": "fleet"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let key = v["key"].as_str().unwrap().to_owned();
    let key_id = v["id"].as_str().unwrap().to_owned();
    let one = format!("Bearer {SECRET_ONE}");
    for kg in [&b, &c] {
        let waited = until(Duration::from_secs(2), || async {
            call(&client, kg, &up, &key).await == (StatusCode::CREATED, Some(one.clone()))
        })
        .await;
        assert!(waited.is_some(), "a key made on A works elsewhere");
    }

    // A key made with the CLI (another process on the same database) works on A at once.
    let (code, out, err) = cli(
        c_node.dir.path(),
        &[
            "--config",
            c_node.config.to_str().unwrap(),
            "keys",
            "create",
            "--name",
            "cli-made",
        ],
        b"",
        &[
            ("PGPASSWORD", pg.password()),
            ("KEYGATE_MASTER_KEY", MASTER),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let cli_key = out
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap()
        .trim()
        .to_owned();
    let cli_took = until(Duration::from_secs(2), || async {
        call(&client, &a, &up, &cli_key).await.0 == StatusCode::CREATED
    })
    .await
    .expect("a CLI-made key works on A");
    println!("fleet: a key made by the CLI worked on A after {cli_took:?}");

    // Warm the key everywhere, then delete it through B: A and C refuse it within 1 s.
    for kg in [&a, &c] {
        assert_eq!(call(&client, kg, &up, &key).await.0, StatusCode::CREATED);
    }
    let (s, _, _) = admin_call(
        &client,
        "DELETE",
        &b.admin_url(&format!("/v1/api_key/{key_id}")),
        Some(&admin_key),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for (name, kg) in [("A", &a), ("C", &c)] {
        let took = until(Duration::from_secs(3), || async {
            call(&client, kg, &up, &key).await.0 == StatusCode::UNAUTHORIZED
        })
        .await
        .unwrap_or_else(|| panic!("{name} still admits a key deleted through B after 3 s"));
        println!("fleet: a key deleted through B was refused by {name} after {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "{name}: revocation took {took:?}"
        );
    }

    // The secret replaced through C: A and B inject the new one within 1 s.
    let (s, _, _) = admin_call(
        &client,
        "PUT",
        &c.admin_url("/v1/ai_secret"),
        Some(&admin_key),
        Some(json!({"name": "OPENAI", "type": "openai", "secret": SECRET_TWO})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let two = format!("Bearer {SECRET_TWO}");
    for (name, kg) in [("A", &a), ("B", &b)] {
        let took = until(Duration::from_secs(3), || async {
            call(&client, kg, &up, &cli_key).await.1.as_deref() == Some(two.as_str())
        })
        .await
        .unwrap_or_else(|| panic!("{name} still injects the old secret after 3 s"));
        println!("fleet: a secret replaced through C was injected by {name} after {took:?}");
        assert!(took < Duration::from_secs(1), "{name}: took {took:?}");
    }

    // Usage from three instances adds up in the store: a new key used through each (counting
    // only the requests it authenticated: a 401 before an instance knew the key is no use).
    let (s, _, v) = admin_call(
        &client,
        "POST",
        &a.admin_url("/v1/api_key"),
        Some(&admin_key),
        Some(json!({"name": "usage"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let usage_key = v["key"].as_str().unwrap().to_owned();
    let usage_id = v["id"].as_str().unwrap().to_owned();
    let mut used = 0;
    for (kg, extra) in [(&a, 2), (&b, 3), (&c, 4)] {
        let mut more = extra;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while more > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the usage key never worked"
            );
            let (s, _, _) = send(
                &client,
                get(&kg.url("/v1/usage"), &[("x-api-key", &usage_key)]),
            )
            .await;
            if s == StatusCode::CREATED {
                used += 1;
                more -= 1;
            } else {
                assert_eq!(s, StatusCode::UNAUTHORIZED);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let last_sent = time::OffsetDateTime::now_utc();

    let mut logs = Vec::new();
    for kg in [a, b, c] {
        logs.push(kg.terminate().await.1);
    }
    // Each instance flushed its own at shutdown; the store added them.
    let row = pg.psql(
        &db.name,
        &format!("SELECT request_count, rate_limited_count, last_used FROM api_keys WHERE id = '{usage_id}'"),
    );
    let cols: Vec<&str> = row.trim().split('|').collect();
    assert_eq!(cols[..2], [used.to_string().as_str(), "0"], "{row}");
    let last_used =
        time::OffsetDateTime::parse(cols[2], &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert!(
        last_used <= last_sent && last_sent - last_used < time::Duration::seconds(2),
        "last_used {last_used} is not the latest request ({last_sent})"
    );
    assert_no_secrets(
        &logs,
        &[
            &admin_key,
            &key,
            &usage_key,
            &cli_key,
            SECRET_ONE,
            SECRET_TWO,
            pg.password(),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_mint_one_admin_key_and_a_stranger_is_refused() {
    let _serial = SERIAL.lock().await;
    let pg = PgServer::shared();
    let db = TestDb::new("fleet_first_start");
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let url = pg.url(&db.name);
    let nodes: Vec<Node> = (0..3)
        .map(|_| node(&ca, &up.url(), Some(&url), ""))
        .collect();
    let (a, b, c) = tokio::join!(
        serve(&nodes[0], &[]),
        serve(&nodes[1], &[]),
        serve(&nodes[2], &[])
    );
    let minted: Vec<&String> = [&a, &b, &c]
        .iter()
        .flat_map(|k| k.stdout_lines.iter())
        .collect();
    assert_eq!(
        minted.len(),
        1,
        "exactly one first admin key across the fleet"
    );
    assert_eq!(
        pg.psql(&db.name, "SELECT COUNT(*) FROM api_keys").trim(),
        "1"
    );
    assert_eq!(
        pg.psql(
            &db.name,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM keygate_migrations"
        )
        .trim(),
        "1,2",
        "each migration applied once"
    );
    assert_eq!(
        pg.psql(
            &db.name,
            "SELECT seq, action, actor_type FROM audit_events ORDER BY seq"
        )
        .trim(),
        "1|key.created|keygate",
        "one audit event for the one first admin key"
    );

    // Another master key: refused before anything is read or written.
    let before = pg.psql(&db.name, "SELECT n FROM revisions ORDER BY name");
    let stranger = node(&ca, &up.url(), Some(&url), "");
    let (code, _, err) = cli(
        stranger.dir.path(),
        &["--config", stranger.config.to_str().unwrap(), "serve"],
        b"",
        &[(
            "KEYGATE_MASTER_KEY",
            "1111111111111111111111111111111111111111111111111111111111111111",
        )],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(err.contains("master key does not match"), "{err}");
    assert_eq!(
        pg.psql(&db.name, "SELECT n FROM revisions ORDER BY name"),
        before
    );
    for kg in [a, b, c] {
        kg.terminate().await;
    }
}

/// Waits until `/readyz` answers `want`; returns its body.
async fn readyz(
    client: &Client<HttpsConnector<HttpConnector>, TestBody>,
    kg: &KeygateProcess,
    want: StatusCode,
    limit: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (s, _, v) = admin_call(client, "GET", &kg.admin_url("/readyz"), None, None).await;
        if s == want {
            return v;
        }
        assert!(start.elapsed() < limit, "/readyz stayed {s}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_closed_after_the_bound_and_recovers_without_restart() {
    let _serial = SERIAL.lock().await;
    let pg = PgServer::start();
    let db = pg.create_test_database("fleet_outage");
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let client = ca.client(false);
    let extra =
        "[keys]\npoll_interval = \"250ms\"\nstaleness_bound = \"3s\"\ncache_ttl = \"60s\"\n";
    let n = node(&ca, &up.url(), Some(&pg.url(&db)), extra);
    let kg = serve(&n, &[]).await;
    let admin_key = kg.stdout_lines.first().expect("admin key").clone();
    let secret_url = kg.admin_url("/v1/ai_secret");
    let put = |secret: &'static str| {
        admin_call(
            &client,
            "POST",
            &secret_url,
            Some(&admin_key),
            Some(json!({"name": "OPENAI", "secret": secret})),
        )
    };
    assert_eq!(put(SECRET_ONE).await.0, StatusCode::OK);
    let (_, _, v) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin_key),
        Some(json!({"name": "warm"})),
    )
    .await;
    let key = v["key"].as_str().unwrap().to_owned();
    assert_eq!(call(&client, &kg, &up, &key).await.0, StatusCode::CREATED);
    let body = readyz(&client, &kg, StatusCode::OK, Duration::from_secs(5)).await;
    assert_eq!(body["checks"]["key_store"]["backend"], "postgres");
    assert_eq!(body["checks"]["key_store"]["notifications"], true);

    // Stopped: the cached key works until the staleness bound, then 503; /readyz says why.
    pg.stop();
    let stopped = Instant::now();
    assert_eq!(call(&client, &kg, &up, &key).await.0, StatusCode::CREATED);
    let (s, _, v) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin_key),
        Some(json!({"name": "during-outage"})),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v.to_string().contains("key store unavailable"), "{v}");
    let closed = until(Duration::from_secs(8), || async {
        call(&client, &kg, &up, &key).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await
    .expect("fails closed after the staleness bound");
    let closed_after = stopped.elapsed();
    println!("fleet: PostgreSQL stopped; cached key refused (503) after {closed_after:?} (bound 3 s; polled for {closed:?})");
    assert!(
        closed_after >= Duration::from_millis(2500),
        "{closed_after:?}"
    );
    let body = readyz(
        &client,
        &kg,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(body["checks"]["key_store"]["ok"], false);
    let why = body["checks"]["key_store"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("store unavailable"),
        "/readyz says why: {body}"
    );
    assert!(!why.contains(pg.password()));

    // Back: everything recovers without a restart, and nothing half-written was left.
    pg.start_again();
    let back = Instant::now();
    readyz(&client, &kg, StatusCode::OK, Duration::from_secs(15)).await;
    let ok = until(Duration::from_secs(10), || async {
        call(&client, &kg, &up, &key).await.0 == StatusCode::CREATED
    })
    .await
    .expect("serves again");
    println!(
        "fleet: PostgreSQL back; serving again after {:?} (/readyz first, then {ok:?})",
        back.elapsed()
    );
    assert_eq!(
        pg.psql(
            &db,
            "SELECT COUNT(*) FROM api_keys WHERE name = 'during-outage'"
        )
        .trim(),
        "0"
    );
    assert_eq!(put(SECRET_TWO).await.0, StatusCode::OK);

    // Frozen (SIGSTOP): admin calls answer 503 within the store timeout instead of hanging.
    pg.freeze();
    let t = Instant::now();
    let (s, _, _) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin_key),
        Some(json!({"name": "during-freeze"})),
    )
    .await;
    let took = t.elapsed();
    println!(
        "fleet: PostgreSQL frozen; an admin write answered {s} after {took:?} (store.timeout 2 s)"
    );
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_secs(6), "{took:?}");
    pg.thaw();
    readyz(&client, &kg, StatusCode::OK, Duration::from_secs(15)).await;
    assert_eq!(call(&client, &kg, &up, &key).await.0, StatusCode::CREATED);

    // The notification connection cut: it comes back on its own, and meanwhile polling works.
    let listener = || {
        pg.psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
    };
    let before = listener();
    assert!(!before.trim().is_empty(), "a LISTEN connection exists");
    let cut = pg.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    );
    assert_eq!(cut.trim(), "t");
    let relistened = until(Duration::from_secs(10), || async {
        let now = listener();
        let (_, _, v) = admin_call(&client, "GET", &kg.admin_url("/readyz"), None, None).await;
        !now.trim().is_empty() && now != before && v["checks"]["key_store"]["notifications"] == true
    })
    .await
    .expect("the listener reconnects");
    println!("fleet: notification connection cut; listening again after at most {relistened:?}");

    let (_, log) = kg.terminate().await;
    assert_no_secrets(
        &[log],
        &[&admin_key, &key, SECRET_ONE, SECRET_TWO, pg.password()],
    );
    pg.drop_database(&db);
}

/// Hammers `key` through every instance from `per_instance` connections each for `secs`, every
/// connection opened (with a request of `warm`) before the clock starts; returns (201s, 429s,
/// anything else).
async fn hammer(
    ca: &TestCa,
    fleet: &[&KeygateProcess],
    (key, warm): (&str, &str),
    per_instance: usize,
    secs: f64,
) -> (u64, u64, u64) {
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(fleet.len() * per_instance + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut tasks = Vec::new();
    for kg in fleet {
        for _ in 0..per_instance {
            let client = ca.client(false);
            let (url, warm_req) = (
                kg.url("/v1/hammer"),
                get(&kg.url("/v1/warm"), &[("x-api-key", warm)]),
            );
            let (key, ready, mut start_rx) = (key.to_owned(), ready.clone(), start_rx.clone());
            tasks.push(tokio::spawn(async move {
                assert_eq!(send(&client, warm_req).await.0, StatusCode::CREATED);
                ready.wait().await;
                let end = loop {
                    if let Some(end) = *start_rx.borrow_and_update() {
                        break end;
                    }
                    start_rx.changed().await.unwrap();
                };
                let mut got = [0u64; 3];
                while Instant::now() < end {
                    let (s, _, _) = send(&client, get(&url, &[("x-api-key", &key)])).await;
                    got[match s {
                        StatusCode::CREATED => 0,
                        StatusCode::TOO_MANY_REQUESTS => 1,
                        _ => 2,
                    }] += 1;
                }
                got
            }));
        }
    }
    ready.wait().await;
    start_tx
        .send(Some(Instant::now() + Duration::from_secs_f64(secs)))
        .unwrap();
    let mut total = [0u64; 3];
    for t in tasks {
        for (sum, n) in total.iter_mut().zip(t.await.unwrap()) {
            *sum += n;
        }
    }
    (total[0], total[1], total[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_postgres_and_redis_share_one_quota_and_survive_redis_loss() {
    let _serial = SERIAL.lock().await;
    let pg = PgServer::shared();
    let db = TestDb::new("fleet_quota");
    let mut redis = support::redis::RedisServer::start();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let client = ca.client(false);
    let extra = format!(
        "[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"{}:\"\n\
         default = {{ per_second = 20, burst = 10 }}\n",
        redis.url(),
        db.name
    );
    let nodes: Vec<Node> = (0..3)
        .map(|_| node(&ca, &up.url(), Some(&pg.url(&db.name)), &extra))
        .collect();
    let a = serve(&nodes[0], &[]).await;
    let admin_key = a.stdout_lines.first().expect("admin key").clone();
    let b = serve(&nodes[1], &[]).await;
    let c = serve(&nodes[2], &[]).await;
    let (s, _, _) = admin_call(
        &client,
        "POST",
        &a.admin_url("/v1/ai_secret"),
        Some(&admin_key),
        Some(json!({"name": "OPENAI", "secret": SECRET_ONE})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let make_key = async |name: &str| -> String {
        let (_, _, v) = admin_call(
            &client,
            "POST",
            &a.admin_url("/v1/api_key"),
            Some(&admin_key),
            Some(json!({ "name": name })),
        )
        .await;
        v["key"].as_str().unwrap().to_owned()
    };
    let (key, warm) = (make_key("hammered").await, make_key("warm").await);
    up.requests.lock().unwrap().clear();

    // One quota for the fleet: rate × t + burst within ± 2 %.
    // A rate any client load here exceeds many times over, so that the run measures the limiter
    // and not how fast this machine can send.
    let secs = 5.0;
    let (admitted, refused, other) = hammer(&ca, &[&a, &b, &c], (&key, &warm), 3, secs).await;
    let want = 20.0 * secs + 10.0;
    let off = (admitted as f64 - want) / want * 100.0;
    println!(
        "fleet: 3 processes, one key at 20/s burst 10 hammered {secs} s: admitted {admitted} \
         (want {want}, {off:+.2} %), refused {refused}"
    );
    assert_eq!(other, 0, "only 201 and 429");
    assert!(
        refused > admitted,
        "hammered hard enough: {refused} refusals"
    );
    assert!(off.abs() <= 2.0, "admitted {admitted}, want {want} ± 2 %");
    let forwarded = up
        .recorded()
        .iter()
        .filter(|r| r.uri.path() == "/v1/hammer")
        .count() as u64;
    assert_eq!(
        forwarded, admitted,
        "the upstream saw exactly the admitted requests"
    );

    // Redis stopped: every instance limits locally at once (never 5xx, never unlimited).
    redis.stop();
    let fresh = make_key("during-redis-outage").await;
    for kg in [&a, &b, &c] {
        let mut statuses = Vec::new();
        let t = Instant::now();
        for _ in 0..100 {
            let (s, _, _) =
                send(&client, get(&kg.url("/v1/local"), &[("x-api-key", &fresh)])).await;
            statuses.push(s.as_u16());
        }
        let took = t.elapsed().as_secs_f64();
        assert!(
            statuses.iter().all(|s| *s == 201 || *s == 429),
            "{statuses:?}"
        );
        let admitted = statuses.iter().filter(|s| **s == 201).count() as f64;
        let most = 10.0 + 20.0 * took + 1.0;
        println!("fleet: Redis stopped; 100 requests on one instance in {took:.3} s: {admitted} admitted by the local limiter, the rest 429");
        assert!(
            (10.0..=most).contains(&admitted),
            "the local limiter holds the quota: {admitted} admitted in {took:.3} s (at most {most:.0})"
        );
        let (_, _, metrics) = send(&client, get(&kg.admin_url("/metrics"), &[])).await;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        assert!(
            metrics.lines().any(|l| l == "keygate_limiter_degraded 1"),
            "{metrics}"
        );
    }

    // Back: global again within a few seconds, without a restart.
    redis.restart();
    let back = until(Duration::from_secs(10), || async {
        let mut all = true;
        for kg in [&a, &b, &c] {
            let (_, _, m) = send(&client, get(&kg.admin_url("/metrics"), &[])).await;
            all &= String::from_utf8_lossy(&m)
                .lines()
                .any(|l| l == "keygate_limiter_degraded 0");
        }
        all
    })
    .await
    .expect("every instance is back on Redis");
    println!("fleet: Redis restarted; all three instances global again after {back:?}");

    let mut logs = Vec::new();
    for kg in [a, b, c] {
        logs.push(kg.terminate().await.1);
    }
    assert_no_secrets(
        &logs,
        &[&admin_key, &key, &warm, &fresh, SECRET_ONE, pg.password()],
    );
}
