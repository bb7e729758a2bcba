//! Key usage (`last_used`, `request_count`, `rate_limited_count`) and the audit trail, over
//! TLS: usage moves within one flush interval and not before, counts add up over allowed and
//! refused requests, every admin change of the API and the CLI leaves exactly one event with
//! its actor, `keygate audit verify` passes on an honest trail and names the event that an
//! edit, a deletion or a reordering in the database broke, and no secret is in the trail.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use keygate::audit::Actor;
use keygate::store::{KeyOptions, Role};
use serde_json::{json, Value};
use support::*;

type TestClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    TestBody,
>;

fn parse_time(t: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{t:?} is not RFC 3339: {e}"))
}

/// The key `id` as `GET /v1/api_key` shows it.
async fn key_object(kg: &Keygate, client: &TestClient, admin: &str, id: &str) -> Value {
    let (s, _, list) = admin_call(
        client,
        "GET",
        &kg.admin_url("/v1/api_key"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    list["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("key {id} not listed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_moves_within_one_flush_interval_and_counts_allowed_and_refused_requests() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "\n[keys]\nusage_flush_interval = \"1s\"\n",
    )
    .await;
    let client = ca.client(false);
    let (admin, admin_id) = make_key(&kg, Role::Admin);
    // A key with a quota of 3 at once and almost no refill: of 10 requests, 3 pass.
    let (master, store) = kg.store();
    let t = store.tenant().unwrap();
    let (limited, rec) = keygate::store::issue_key(
        store.as_ref(),
        &master,
        (&t.org_id, &t.user_id),
        "limited",
        KeyOptions {
            role: Role::Proxy,
            routes: None,
            limit: keygate::config::LimitSpec::new(0.001, 3),
        },
        &Actor::Keygate,
    )
    .unwrap();
    let limited = limited.expose().to_owned();

    let before = key_object(&kg, &client, &admin, &rec.id).await;
    assert_eq!(before["last_used"], Value::Null, "{before}");
    assert_eq!(before["request_count"], 0);
    assert_eq!(before["rate_limited_count"], 0);
    let fresh = key_object(&kg, &client, &admin, &kg.key_id).await;
    assert_eq!(fresh["last_used"], Value::Null, "an unused key: {fresh}");

    let t0 = time::OffsetDateTime::now_utc();
    let mut statuses = Vec::new();
    for i in 0..10 {
        let (s, _, _) = send(
            &client,
            get(&kg.url(&format!("/u/{i}")), &[("x-api-key", &limited)]),
        )
        .await;
        statuses.push(s);
    }
    let t1 = time::OffsetDateTime::now_utc();
    let sent = Instant::now();
    let passed = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((passed, refused), (3, 7), "{statuses:?}");
    assert_eq!(
        up.recorded()
            .iter()
            .filter(|r| r.uri.path().starts_with("/u/"))
            .count(),
        3,
        "the upstream got exactly the admitted requests"
    );

    // The flush writes it within one interval (1 s), plus this machine's slack.
    let shown = loop {
        let k = key_object(&kg, &client, &admin, &rec.id).await;
        if k["request_count"] != 0 {
            break k;
        }
        assert!(
            sent.elapsed() < Duration::from_millis(2500),
            "usage not flushed within one interval: {k}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!(
        "usage visible {:?} after the last request (interval 1 s)",
        sent.elapsed()
    );
    assert_eq!(shown["request_count"], 10, "{shown}");
    assert_eq!(shown["rate_limited_count"], 7, "{shown}");
    let last = parse_time(shown["last_used"].as_str().unwrap());
    let ms = time::Duration::milliseconds(1);
    assert!(
        last >= t0 - ms && last <= t1 + ms,
        "last_used {last} not within [{t0}, {t1}]"
    );
    assert!(shown["last_used"].as_str().unwrap().ends_with('Z'));
    // Ten more: the counts add, the time moves forward.
    for i in 0..10 {
        send(
            &client,
            get(&kg.url(&format!("/v/{i}")), &[("x-api-key", &limited)]),
        )
        .await;
    }
    let again = loop {
        let k = key_object(&kg, &client, &admin, &rec.id).await;
        if k["request_count"] != 10 {
            break k;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(again["request_count"], 20, "{again}");
    assert_eq!(again["rate_limited_count"], 17, "{again}");
    assert!(parse_time(again["last_used"].as_str().unwrap()) >= last);
    // The admin key's own calls count as its use.
    let admin_rec = store.get_api_key(&t.org_id, &admin_id).unwrap().unwrap();
    assert!(admin_rec.request_count >= 1, "{admin_rec:?}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_not_written_before_the_flush_and_is_written_at_shutdown() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "\n[keys]\nusage_flush_interval = \"1h\"\n",
    )
    .await;
    let client = ca.client(true);
    for _ in 0..5 {
        let (s, _, _) = send(&client, get(&kg.url("/x"), &[("x-api-key", &kg.key)])).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let revisions = kg.store().1.revisions().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, store) = kg.store();
    let t = store.tenant().unwrap();
    let rec = store.get_api_key(&t.org_id, &kg.key_id).unwrap().unwrap();
    assert_eq!(
        (rec.last_used.as_deref(), rec.request_count),
        (None, 0),
        "the hot path wrote usage to the store"
    );
    assert_eq!(kg.state().plane.usage.pending_keys(), 1);
    // Stopped, but its directory (the store) kept for reading it afterwards.
    let Keygate {
        running,
        dir: _dir,
        config_path,
        ..
    } = kg;
    running.unwrap().shutdown().await;
    let text = std::fs::read_to_string(&config_path).unwrap();
    let config = keygate::config::Config::parse(&text, "test").unwrap();
    let (_, store) = keygate::app::open_store(&config, None).unwrap();
    let rec = store.get_api_key(&t.org_id, &rec.id).unwrap().unwrap();
    assert_eq!(rec.request_count, 5, "flushed at shutdown");
    assert!(rec.last_used.is_some());
    assert_eq!(
        store.revisions().unwrap().keys,
        revisions.keys,
        "a usage flush counts as no key change"
    );
}

/// The events after the first `skip` (oldest first) of the trail, as the API lists them.
async fn events_since(kg: &Keygate, client: &TestClient, admin: &str, skip: usize) -> Vec<Value> {
    let (s, _, list) = admin_call(
        client,
        "GET",
        &kg.admin_url("/v1/audit?limit=1000"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let mut all: Vec<Value> = list["objects"].as_array().unwrap().clone();
    all.reverse();
    all.split_off(skip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_api_change_leaves_one_event_naming_the_admin_key() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "S")], "").await;
    let client = ca.client(false);
    let (admin, admin_id) = make_key(&kg, Role::Admin);
    let preview = keygate::crypto::key_preview(&keygate::secret::Secret::new(admin.clone()));
    let (s, _, list) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/audit"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let skip = list["objects"].as_array().unwrap().len();
    // Set up by the harness: the secret S, the proxy key, the admin key; by keygate.
    assert_eq!(skip, 3, "{list}");
    assert_eq!(list["objects"][0]["actor"], json!({"type": "keygate"}));

    let call = |m: &'static str, path: &str, body: Option<Value>| {
        let url = kg.admin_url(path);
        let (client, admin) = (client.clone(), admin.clone());
        async move {
            let (s, _, v) = admin_call(&client, m, &url, Some(&admin), body).await;
            assert_eq!(s, StatusCode::OK, "{m} {url}: {v}");
            v
        }
    };
    let k = call("POST", "/v1/api_key", Some(json!({"name": "ci-key"}))).await;
    let kid = k["id"].as_str().unwrap().to_owned();
    let new_key = k["key"].as_str().unwrap().to_owned();
    call(
        "PATCH",
        &format!("/v1/api_key/{kid}"),
        Some(json!({"rate_limit": {"per_second": 5, "burst": 5}})),
    )
    .await;
    let sec = call(
        "POST",
        "/v1/ai_secret",
        Some(json!({"name": "X", "type": "openai", "secret": "sk-first-value-1111"})),
    )
    .await;
    let sid = sec["id"].as_str().unwrap().to_owned();
    // The same POST again changes nothing, so it records nothing.
    call(
        "POST",
        "/v1/ai_secret",
        Some(json!({"name": "X", "type": "openai", "secret": "sk-other-value-2222"})),
    )
    .await;
    call(
        "PUT",
        "/v1/ai_secret",
        Some(json!({"name": "X", "type": "openai", "secret": "sk-second-value-3333"})),
    )
    .await;
    call(
        "PATCH",
        &format!("/v1/ai_secret/{sid}"),
        Some(json!({"metadata": {"team": "a"}})),
    )
    .await;
    call("DELETE", &format!("/v1/ai_secret/{sid}"), None).await;
    let ev = call("POST", "/v1/env_var", Some(json!({"object_type": "project", "object_id": "p1", "name": "TOKEN", "value": "env-value-4444"}))).await;
    let eid = ev["id"].as_str().unwrap().to_owned();
    call("PUT", "/v1/env_var", Some(json!({"object_type": "project", "object_id": "p1", "name": "TOKEN", "value": "env-value-5555"}))).await;
    call(
        "PATCH",
        &format!("/v1/env_var/{eid}"),
        Some(json!({"name": "TOKEN2"})),
    )
    .await;
    call("DELETE", &format!("/v1/env_var/{eid}"), None).await;
    call("DELETE", &format!("/v1/api_key/{kid}"), None).await;
    let (s, _, _) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/-/reload"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    let got = events_since(&kg, &client, &admin, skip).await;
    let seen: Vec<(String, String, String)> = got
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["object_type"].as_str().unwrap().to_owned(),
                e["object_name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("key.created", "api_key", "ci-key"),
        ("key.changed", "api_key", "ci-key"),
        ("secret.created", "ai_secret", "X"),
        ("secret.replaced", "ai_secret", "X"),
        ("secret.changed", "ai_secret", "X"),
        ("secret.deleted", "ai_secret", "X"),
        ("env_var.created", "env_var", "TOKEN"),
        ("env_var.replaced", "env_var", "TOKEN"),
        ("env_var.changed", "env_var", "TOKEN2"),
        ("env_var.deleted", "env_var", "TOKEN2"),
        ("key.deleted", "api_key", "ci-key"),
        (
            "config.reloaded",
            "config",
            &kg.config_path.display().to_string(),
        ),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(seen, want);
    for e in &got {
        assert_eq!(
            e["actor"],
            json!({"type": "api_key", "id": admin_id, "preview_name": preview}),
            "{e}"
        );
        assert_eq!(e["outcome"], "ok");
        assert!(parse_time(e["created"].as_str().unwrap()) <= time::OffsetDateTime::now_utc());
    }
    assert_eq!(got[0]["object_id"], kid.as_str());
    assert_eq!(got[2]["object_id"], sid.as_str());

    // Paging: three at a time, newest first, gives the same events.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() {
            "/v1/audit?limit=3".to_owned()
        } else {
            format!("/v1/audit?limit=3&starting_after={cursor}")
        };
        let page = call("GET", &q, None).await;
        let page = page["objects"].as_array().unwrap().clone();
        let Some(last) = page.last() else { break };
        cursor = last["id"].as_str().unwrap().to_owned();
        assert!(page.len() <= 3);
        paged.extend(page);
    }
    paged.reverse();
    assert_eq!(paged.len(), skip + want.len());
    assert_eq!(paged[skip..], got[..]);
    let seqs: Vec<i64> = paged.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=paged.len() as i64).collect::<Vec<_>>());

    // Admin keys only; no key at all is a 401; no write verb.
    let (s, _, _) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/audit"),
        Some(&kg.key),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = admin_call(&client, "GET", &kg.admin_url("/v1/audit"), None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = admin_call(
        &client,
        "DELETE",
        &kg.admin_url("/v1/audit"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, _, _) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/audit?starting_after=nope"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // No key, secret or env var value, nor a tail of one beyond what previews show.
    let (_, _, raw) = send(
        &client,
        get(
            &kg.admin_url("/v1/audit?limit=1000"),
            &[("x-api-key", &admin)],
        ),
    )
    .await;
    let raw = String::from_utf8_lossy(&raw);
    for secret in [
        admin.as_str(),
        &new_key,
        &kg.key,
        "sk-first-value-1111",
        "sk-other-value-2222",
        "sk-second-value-3333",
        "env-value-4444",
        "env-value-5555",
        UPSTREAM_SECRET,
    ] {
        assert!(!raw.contains(secret), "the trail holds a secret");
        assert!(
            !raw.contains(&secret[..secret.len() - 4]),
            "the trail holds a prefix of a secret"
        );
    }

    // The chain verifies.
    let (master, store) = kg.store();
    let verdict = keygate::actions::verify_audit(store.as_ref(), &master, None).unwrap();
    assert_eq!(verdict.map(|v| v.0), Ok(paged.len() as i64));
    kg.stop().await;
}

/// Runs the CLI on the store of `dir` (its default config: `data/` under `dir`).
async fn kg_cli(
    dir: &std::path::Path,
    args: &[&str],
    stdin: &[u8],
) -> (Option<i32>, String, String) {
    cli(dir, args, stdin, &[("USER", "alice"), ("LOGNAME", "alice")]).await
}

/// The OS's name for the user running the tests, as `id -un` gives it: what the trail names for
/// the CLI, whatever `$USER` says.
fn os_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `keygate audit verify [--expect MARK]` on the store of `dir`: its stderr, once its exit code
/// is checked to be `code`.
async fn audit_verify(dir: &std::path::Path, expect: Option<&str>, code: i32) -> String {
    let expect = expect.map(|m| format!("--expect={m}"));
    let mut args = vec!["audit", "verify"];
    args.extend(expect.as_deref());
    let (got, _, err) = kg_cli(dir, &args, b"").await;
    assert_eq!(got, Some(code), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_changes_are_recorded_and_verify_names_edited_deleted_and_reordered_events() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, out, err) = kg_cli(d, &["keys", "create", "--name", "ci"], b"").await;
    assert_eq!(code, Some(0), "{err}");
    let new_key = out.trim().to_owned();
    let (code, _, err) = kg_cli(d, &["secrets", "put", "OPENAI"], b"sk-cli-secret-7777\n").await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = kg_cli(d, &["secrets", "put", "OPENAI"], b"sk-cli-secret-8888\n").await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = kg_cli(d, &["secrets", "delete", "OPENAI"], b"").await;
    assert_eq!(code, Some(0), "{err}");
    let (_, listed, _) = kg_cli(d, &["keys", "list"], b"").await;
    let id = listed
        .lines()
        .find(|l| l.contains(" ci "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(
        listed.contains("never"),
        "an unused key's LAST USED: {listed}"
    );

    // A key used a minute ago is not deleted without a yes or --force.
    {
        // The store the CLI used: its default paths under `d`.
        let text = format!(
            "[store]\npath = {:?}\nmaster_key_file = {:?}\n",
            d.join("data/keygate.db"),
            d.join("data/master.key")
        );
        let config = keygate::config::Config::parse(&text, "test").unwrap();
        let (_, store) = keygate::app::open_store(&config, None).unwrap();
        let minute_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            - 120_000;
        store
            .record_usage(&[keygate::store::KeyUsage {
                key_id: id.clone(),
                last_used_ms: minute_ago,
                requests: 3,
                rate_limited: 1,
            }])
            .unwrap();
    }
    let (code, _, err) = kg_cli(d, &["keys", "delete", &id], b"y\n").await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("this key was used 2 minutes ago; integrations using it will stop working")
            && err.contains("--force"),
        "{err}"
    );
    let (_, listed, _) = kg_cli(d, &["keys", "list"], b"").await;
    assert!(listed.contains(&id), "the key was deleted without --force");
    let (code, _, err) = kg_cli(d, &["keys", "delete", &id, "--force"], b"").await;
    assert_eq!(code, Some(0), "{err}");

    let (code, out, err) = kg_cli(d, &["audit", "list", "--json"], b"").await;
    assert_eq!(code, Some(0), "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["object_name"].as_str().unwrap(),
            )
        })
        .collect();
    actions.reverse();
    assert_eq!(
        actions,
        [
            ("key.created", "ci"),
            ("secret.created", "OPENAI"),
            ("secret.changed", "OPENAI"),
            ("secret.deleted", "OPENAI"),
            ("key.deleted", "ci"),
        ]
    );
    // `$USER` and `$LOGNAME` were set to alice: the trail names the OS's user instead.
    let me = os_user();
    assert_ne!(me, "alice");
    for e in &events {
        assert_eq!(e["actor"], json!({"type": "cli", "user": me}), "{e}");
    }
    assert!(!out.contains("sk-cli-secret") && !out.contains(&new_key[..new_key.len() - 4]));
    let (code, table, _) = kg_cli(d, &["audit", "list"], b"").await;
    assert_eq!(code, Some(0));
    assert!(
        table.contains(&format!("cli ({me})")) && table.contains("secret.deleted"),
        "{table}"
    );

    let err = audit_verify(d, None, 0).await;
    assert!(err.contains("audit trail OK: 5 events"), "{err}");

    let db = rusqlite::Connection::open(d.join("data/keygate.db")).unwrap();
    let sql = |s: &str| db.execute_batch(s).unwrap();
    // An edit.
    sql("UPDATE audit_events SET object_name = 'innocent' WHERE seq = 3");
    let err = audit_verify(d, None, 2).await;
    assert!(
        err.contains("BROKEN: event #3 ") && err.contains("does not match its MAC"),
        "{err}"
    );
    sql("UPDATE audit_events SET object_name = 'OPENAI' WHERE seq = 3");
    audit_verify(d, None, 0).await;
    // A deletion in the middle.
    sql("CREATE TABLE saved AS SELECT * FROM audit_events WHERE seq = 4; DELETE FROM audit_events WHERE seq = 4");
    let err = audit_verify(d, None, 2).await;
    assert!(err.contains("#4 is missing"), "{err}");
    sql("INSERT INTO audit_events SELECT * FROM saved; DROP TABLE saved");
    audit_verify(d, None, 0).await;
    // A reordering: events 4 and 5 swap places.
    sql("UPDATE audit_events SET seq = -5 WHERE seq = 5; UPDATE audit_events SET seq = 5 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = -5");
    let err = audit_verify(d, None, 2).await;
    assert!(err.contains("BROKEN: event #4 "), "{err}");
    sql("UPDATE audit_events SET seq = -5 WHERE seq = 5; UPDATE audit_events SET seq = 5 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = -5");
    audit_verify(d, None, 0).await;
    // The newest event cut off the end.
    sql("DELETE FROM audit_events WHERE seq = 5");
    let err = audit_verify(d, None, 2).await;
    assert!(err.contains("head record says #5"), "{err}");
    // An event forged without the master key in its place: a plausible row, a made-up MAC.
    sql("INSERT INTO audit_events SELECT 5, 'f0000000-0000-7000-8000-000000000000', created, org_id, 'cli', '', 'alice', 'key.created', 'api_key', object_id, 'ci', 'ok', mac FROM audit_events WHERE seq = 4");
    let err = audit_verify(d, None, 2).await;
    assert!(err.contains("BROKEN: event #5 "), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_a_noted_mark_catches_a_rollback_and_a_replaced_trail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The mark `verify` prints: "mark SEQ:HEX".
    let mark = |err: &str| -> String {
        let at = err
            .find(" mark ")
            .unwrap_or_else(|| panic!("no mark in {err}"));
        err[at + 6..].split_whitespace().next().unwrap().to_owned()
    };
    let create = |name: &'static str| async move {
        let (code, _, err) = kg_cli(d, &["keys", "create", "--name", name], b"").await;
        assert_eq!(code, Some(0), "{err}");
    };

    create("one").await;
    let first = mark(&audit_verify(d, None, 0).await);
    let db_path = d.join("data/keygate.db");
    let old_copy = d.join("old.db");
    rusqlite::Connection::open(&db_path)
        .unwrap()
        .execute("VACUUM INTO ?1", [old_copy.to_str().unwrap()])
        .unwrap();

    create("two").await;
    let second = mark(&audit_verify(d, None, 0).await);
    assert_ne!(first, second);
    // An earlier mark still fits a longer trail.
    let err = audit_verify(d, Some(&first), 0).await;
    assert!(err.contains("as noted"), "{err}");

    // A wrong MAC for a number the trail has: not the trail that was noted.
    let (seq, hex) = first.split_once(':').unwrap();
    let flipped = format!(
        "{}{}",
        if hex.starts_with('0') { '1' } else { '0' },
        &hex[1..]
    );
    let err = audit_verify(d, Some(&format!("{seq}:{flipped}")), 2).await;
    assert!(
        err.contains(&format!("event #{seq} ")) && err.contains("not the one noted"),
        "{err}"
    );

    // The whole database put back as it was before "two": the chain and its head record are
    // consistent, so a plain verify passes; the mark taken after "two" does not.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(d.join(format!("data/keygate.db{suffix}")));
    }
    std::fs::copy(&old_copy, &db_path).unwrap();
    audit_verify(d, None, 0).await;
    let err = audit_verify(d, Some(&second), 2).await;
    assert!(err.contains("rolled back"), "{err}");

    // A malformed mark is refused before anything is read, saying what it should look like.
    let err = audit_verify(d, Some("42"), 2).await;
    assert!(err.contains("SEQ:HEX"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_records_its_own_changes_and_a_refused_reload() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "\n[keys]\non_cleartext = \"revoke\"\n",
    )
    .await;
    let client = ca.client(false);
    let (admin, _) = make_key(&kg, Role::Admin);
    let (s, _, list) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/audit"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let skip = list["objects"].as_array().unwrap().len();

    // The proxy key leaks over cleartext: flagged, then revoked, both by keygate itself.
    let answer = cleartext_get(kg.proxy, &kg.key).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        let got = events_since(&kg, &client, &admin, skip).await;
        if got.len() >= 2 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let actions: Vec<&str> = got.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["key.flagged_exposed", "key.revoked_cleartext"]);
    for e in &got {
        assert_eq!(e["actor"], json!({"type": "keygate"}));
        assert_eq!(e["object_id"], kg.key_id.as_str());
        assert_eq!(e["object_name"], "test");
    }

    // A config file that does not load: refused, recorded without the error's text.
    let good = std::fs::read_to_string(&kg.config_path).unwrap();
    std::fs::write(
        &kg.config_path,
        format!("{good}\n[store]\nurl = \"postgres://u:hunter2-password@db/x\"\nbogus = 1\n"),
    )
    .unwrap();
    let (s, _, body) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/-/reload"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let got = events_since(&kg, &client, &admin, skip + 2).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["action"], "config.refused");
    assert_eq!(got[0]["outcome"], "refused");
    assert_eq!(got[0]["object_type"], "config");
    let (_, _, raw) = send(
        &client,
        get(&kg.admin_url("/v1/audit"), &[("x-api-key", &admin)]),
    )
    .await;
    assert!(!String::from_utf8_lossy(&raw).contains("hunter2"));
    std::fs::write(&kg.config_path, good).unwrap();
    kg.stop().await;
}

/// `keys delete` on a terminal (a pty from util-linux's `script`): a key used within the hour
/// is deleted after a yes, and kept after anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_delete_on_a_terminal_asks_and_takes_only_a_yes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ids = Vec::new();
    for name in ["kept", "gone"] {
        let (code, _, err) = kg_cli(d, &["keys", "create", "--name", name], b"").await;
        assert_eq!(code, Some(0), "{err}");
    }
    let (_, listed, _) = kg_cli(d, &["keys", "list"], b"").await;
    for name in ["kept", "gone"] {
        ids.push(
            listed
                .lines()
                .find(|l| l.contains(&format!(" {name} ")))
                .and_then(|l| l.split_whitespace().next())
                .unwrap()
                .to_owned(),
        );
    }
    let text = format!(
        "[store]\npath = {:?}\nmaster_key_file = {:?}\n",
        d.join("data/keygate.db"),
        d.join("data/master.key")
    );
    let config = keygate::config::Config::parse(&text, "test").unwrap();
    let (_, store) = keygate::app::open_store(&config, None).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let used: Vec<_> = ids
        .iter()
        .map(|id| keygate::store::KeyUsage {
            key_id: id.clone(),
            last_used_ms: now - 5 * 60_000,
            requests: 1,
            rate_limited: 0,
        })
        .collect();
    store.record_usage(&used).unwrap();
    let org = store.tenant().unwrap().org_id;

    let on_a_terminal = |id: String, answer: &'static [u8]| {
        let d = d.to_owned();
        async move {
            let line = format!("{} keys delete {id}", env!("CARGO_BIN_EXE_keygate"));
            let mut cmd = tokio::process::Command::new("script");
            cmd.args(["-qec", &line, "/dev/null"])
                .current_dir(&d)
                .env("USER", "alice")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().expect("util-linux script");
            let mut input = child.stdin.take().unwrap();
            // The question comes first; a pty given its answer early keeps it for the read.
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::io::AsyncWriteExt::write_all(&mut input, answer)
                .await
                .unwrap();
            let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .expect("keys delete answered")
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };
    let (code, out) = on_a_terminal(ids[0].clone(), b"n\n").await;
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("this key was used 5 minutes ago; integrations using it will stop working")
            && out.contains("[y/N]"),
        "{out}"
    );
    assert!(
        store.get_api_key(&org, &ids[0]).unwrap().is_some(),
        "deleted after a no"
    );
    let (code, out) = on_a_terminal(ids[1].clone(), b"y\n").await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("deleted key"), "{out}");
    assert!(
        store.get_api_key(&org, &ids[1]).unwrap().is_none(),
        "kept after a yes"
    );
}
