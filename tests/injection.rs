//! Secret injection over real TLS: provider-aware credential headers, overrides and extra
//! headers, host and prefix routing, per-key route permissions, passthrough keys, rotation,
//! the reflection guard, env-var templated headers, and `keygate run`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::*;

/// The credential-bearing headers a client might send, all of which must be stripped.
const CLIENT_CREDS: [(&str, &str); 3] = [
    ("x-goog-api-key", "client-google-key"),
    ("api-key", "client-azure-key"),
    ("proxy-authorization", "Basic Y2xpZW50"),
];

const CRED_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "x-custom-auth",
];

#[tokio::test]
async fn each_upstream_gets_exactly_the_credential_its_secret_type_calls_for() {
    let ca = TestCa::new();
    let openai = FakeUpstream::start(&ca).await;
    let anthropic = FakeUpstream::start(&ca).await;
    let google = FakeUpstream::start(&ca).await;
    let azure = FakeUpstream::start(&ca).await;
    let other = FakeUpstream::start(&ca).await;
    let custom = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[
            ("/openai", &openai.url(), "OPENAI"),
            ("/anthropic", &anthropic.url(), "ANTHROPIC"),
            ("/google", &google.url(), "GOOGLE"),
            ("/azure", &azure.url(), "AZURE"),
            ("/mistral", &other.url(), "MISTRAL"),
        ],
        &format!(
            "[[route]]\nprefix = \"/custom\"\nupstream = \"{}\"\ninject = {{ ai_secret = \"CUSTOM\", header = \"x-custom-auth\", prefix = \"Token \" }}\n",
            custom.url()
        ),
    )
    .await;
    {
        let (_, store) = kg.store();
        let s = store.as_ref();
        put_typed(
            s,
            "OPENAI",
            "openai",
            "oa-secret",
            Some(json!({"additionalHeaders": {"OpenAI-Organization": "org-123"}})),
        );
        put_typed(s, "ANTHROPIC", "anthropic", "an-secret", None);
        put_typed(s, "GOOGLE", "google", "go-secret", None);
        put_typed(s, "AZURE", "azure", "az-secret", None);
        put_typed(s, "MISTRAL", "mistral", "mi-secret", None);
        put_typed(s, "CUSTOM", "openai", "cu-secret", None);
    }
    let client = ca.client(false);
    // Wait for the poller to pick up the new values (at most a poll interval or two).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        send(
            &client,
            get(&kg.url("/custom/x"), &[("x-api-key", &kg.key)]),
        )
        .await;
        let r = custom.recorded();
        if r.last()
            .and_then(|r| r.headers.get("x-custom-auth"))
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "new secrets not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let expect: [(&str, &FakeUpstream, &str, &str); 6] = [
        (
            "/openai/v1/chat",
            &openai,
            "authorization",
            "Bearer oa-secret",
        ),
        (
            "/anthropic/v1/messages",
            &anthropic,
            "x-api-key",
            "an-secret",
        ),
        (
            "/google/v1beta/models",
            &google,
            "x-goog-api-key",
            "go-secret",
        ),
        ("/azure/openai/deployments", &azure, "api-key", "az-secret"),
        (
            "/mistral/v1/chat",
            &other,
            "authorization",
            "Bearer mi-secret",
        ),
        ("/custom/x", &custom, "x-custom-auth", "Token cu-secret"),
    ];
    for (path, up, header, value) in expect {
        let mut headers: Vec<(&str, &str)> = vec![
            ("x-api-key", &kg.key),
            ("authorization", "Bearer client-own"),
        ];
        headers.extend(CLIENT_CREDS);
        let (s, _, _) = send(&client, get(&kg.url(path), &headers)).await;
        assert_eq!(s, StatusCode::CREATED, "{path}");
        let got = up.recorded().pop().unwrap();
        for h in CRED_HEADERS {
            let values: Vec<_> = got.headers.get_all(h).iter().collect();
            if h == header {
                assert_eq!(values, [value], "{path}: {h}");
            } else {
                assert!(
                    values.is_empty(),
                    "{path}: {h} reached the upstream: {values:?}"
                );
            }
        }
        assert!(got.headers.get("proxy-authorization").is_none());
        if path.starts_with("/anthropic") {
            assert_eq!(got.headers["anthropic-version"], "2023-06-01");
        } else {
            assert!(got.headers.get("anthropic-version").is_none());
        }
        if path.starts_with("/openai") {
            assert_eq!(got.headers["openai-organization"], "org-123");
        }
    }
    // A client-sent anthropic-version is kept.
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/anthropic/v1/messages"),
            &[("x-api-key", &kg.key), ("anthropic-version", "2024-10-22")],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let got = anthropic.recorded().pop().unwrap();
    assert_eq!(
        got.headers
            .get_all("anthropic-version")
            .iter()
            .collect::<Vec<_>>(),
        ["2024-10-22"]
    );
    assert_eq!(got.headers["x-api-key"], "an-secret");
    kg.stop().await;
}

#[tokio::test]
async fn strip_prefix_host_routes_and_unmatched_paths() {
    let ca = TestCa::new();
    let a = FakeUpstream::start(&ca).await;
    let b = FakeUpstream::start(&ca).await;
    let extra = format!(
        "[[route]]\nname = \"stripped\"\nprefix = \"/openai\"\nstrip_prefix = true\nupstream = \"{}/base\"\ninject = {{ ai_secret = \"K\" }}\n\
         [[route]]\nname = \"by-host\"\nprefix = \"/openai\"\nhost = \"api.local\"\nupstream = \"{}\"\ninject = {{ ai_secret = \"K\" }}\n",
        a.url(),
        b.url()
    );
    let kg = Keygate::start(&ca, &[("/x", &a.url(), "K")], &extra).await;
    let client = ca.client(false);
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/openai/v1/chat?stream=true"),
            &[("x-api-key", &kg.key)],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let got = a.recorded().pop().unwrap();
    assert_eq!(got.uri.path(), "/base/v1/chat");
    assert_eq!(got.uri.query(), Some("stream=true"));
    let (s, _, _) = send(&client, get(&kg.url("/openai"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(a.recorded().pop().unwrap().uri.path(), "/base/");
    // The same prefix for host api.local goes to the other upstream, unstripped.
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/openai/v1/chat"),
            &[("x-api-key", &kg.key), ("host", "api.local")],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b.recorded().pop().unwrap().uri.path(), "/openai/v1/chat");
    // No route: 404 JSON, nothing forwarded.
    let (na, nb) = (a.recorded().len(), b.recorded().len());
    let (s, _, body) = send(
        &client,
        get(&kg.url("/nothing/here"), &[("x-api-key", &kg.key)]),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());
    assert_eq!((a.recorded().len(), b.recorded().len()), (na, nb));
    kg.stop().await;
}

#[tokio::test]
async fn keys_limited_to_routes_get_403_elsewhere() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let extra = format!(
        "[[route]]\nname = \"openai\"\nprefix = \"/openai\"\nupstream = \"{u}\"\ninject = {{ ai_secret = \"K\" }}\n\
         [[route]]\nname = \"anthropic\"\nprefix = \"/anthropic\"\nupstream = \"{u}\"\ninject = {{ ai_secret = \"K\" }}\n",
        u = up.url()
    );
    let kg = Keygate::start(&ca, &[("/x", &up.url(), "K")], &extra).await;
    let (admin, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);
    let (s, _, created) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        Some(json!({"name": "only-openai", "routes": ["openai"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(created["routes"], json!(["openai"]));
    let limited = created["key"].as_str().unwrap().to_owned();
    let (s, _, bad) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        Some(json!({"name": "typo", "routes": ["opnai"]})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    // The CLI sets the same restriction.
    let config = kg.config_path.to_str().unwrap().to_owned();
    let out = keygate_cmd(kg.dir.path(), &[])
        .args([
            "--config",
            &config,
            "keys",
            "create",
            "--name",
            "cli-limited",
            "--route",
            "anthropic",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let bad_cli = keygate_cmd(kg.dir.path(), &[])
        .args([
            "--config", &config, "keys", "create", "--name", "x", "--route", "nope",
        ])
        .output()
        .await
        .unwrap();
    assert!(!bad_cli.status.success());

    let n = up.recorded().len();
    let try_path = |key: String, path: &'static str| {
        let client = client.clone();
        let url = kg.url(path);
        async move { send(&client, get(&url, &[("x-api-key", &key)])).await }
    };
    assert_eq!(
        try_path(limited.clone(), "/openai/a").await.0,
        StatusCode::CREATED
    );
    let (s, _, body) = try_path(limited.clone(), "/anthropic/a").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "this key may not use route anthropic");
    assert_eq!(try_path(limited, "/x/a").await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        try_path(cli_key.clone(), "/anthropic/a").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        try_path(cli_key, "/openai/a").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        try_path(kg.key.clone(), "/anthropic/a").await.0,
        StatusCode::CREATED,
        "unrestricted key"
    );
    assert_eq!(
        up.recorded().len(),
        n + 3,
        "a refused request reached the upstream"
    );
    kg.stop().await;
}

fn validations(up: &FakeUpstream, path: &str) -> usize {
    up.recorded()
        .iter()
        .filter(|r| r.uri.path() == path)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_keys_are_validated_once_and_cached() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let extra = format!(
        "response_header_timeout = \"500ms\"\n[limits]\ndefault = {{ per_second = 1000, burst = 1000 }}\n\
         [[route]]\nname = \"pt\"\nprefix = \"/pt\"\nupstream = \"{u}\"\ninject = \"passthrough\"\n\
         [[route]]\nname = \"pt-broken\"\nprefix = \"/broken\"\nupstream = \"{u}\"\ninject = \"passthrough\"\nvalidate = {{ path = \"/validate-500\" }}\n\
         [[route]]\nname = \"pt-slow\"\nprefix = \"/slowval\"\nupstream = \"{u}\"\ninject = \"passthrough\"\nvalidate = {{ path = \"/slow?ms=3000\" }}\n",
        u = up.url()
    );
    let kg = Keygate::start(&ca, &[], &extra).await;
    let client = ca.client(true);
    // Twenty concurrent first requests with the good key: one validation call.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, url) = (client.clone(), kg.url(&format!("/pt/v1/models/{i}")));
        tasks.push(tokio::spawn(async move {
            send(&client, get(&url, &[("x-api-key", PASSTHROUGH_GOOD_KEY)]))
                .await
                .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(
        validations(&up, "/v1/api_key"),
        1,
        "concurrent first requests validated more than once"
    );
    let forwarded: Vec<_> = up
        .recorded()
        .into_iter()
        .filter(|r| r.uri.path().starts_with("/pt/"))
        .collect();
    assert_eq!(forwarded.len(), 20);
    for r in &forwarded {
        assert_eq!(
            r.headers
                .get_all("authorization")
                .iter()
                .collect::<Vec<_>>(),
            [format!("Bearer {PASSTHROUGH_GOOD_KEY}").as_str()]
        );
        assert!(r.headers.get("x-api-key").is_none());
    }
    // Bearer form works too, from the cache.
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/pt/x"),
            &[("authorization", &format!("Bearer {PASSTHROUGH_GOOD_KEY}"))],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(validations(&up, "/v1/api_key"), 1);

    // A key the upstream rejects: 401, never forwarded, and the refusal is cached.
    for _ in 0..3 {
        let (s, _, _) = send(
            &client,
            get(&kg.url("/pt/y"), &[("x-api-key", "pt-bad-key-0000")]),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(validations(&up, "/v1/api_key"), 2);
    assert!(!up.recorded().iter().any(|r| r.uri.path() == "/pt/y"));
    // No key, or a malformed one: 401 without any validation call.
    for headers in [vec![], vec![("x-api-key", "has space")]] {
        let (s, _, _) = send(&client, get(&kg.url("/pt/z"), &headers)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(validations(&up, "/v1/api_key"), 2);

    // The validation endpoint fails (5xx) or hangs: 502, never let through, not cached.
    for _ in 0..2 {
        let (s, _, body) = send(
            &client,
            get(&kg.url("/broken/x"), &[("x-api-key", PASSTHROUGH_GOOD_KEY)]),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{body:?}");
    }
    assert_eq!(
        validations(&up, "/validate-500"),
        2,
        "a failed validation was cached"
    );
    let started = Instant::now();
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/slowval/x"),
            &[("x-api-key", PASSTHROUGH_GOOD_KEY)],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!up
        .recorded()
        .iter()
        .any(|r| r.uri.path().starts_with("/broken/") || r.uri.path().starts_with("/slowval/")));
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_lets_in_flight_requests_finish_and_new_ones_use_the_new_secret() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let (admin, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);
    let slow = {
        let (client, url, key) = (client.clone(), kg.url("/slow?ms=600"), kg.key.clone());
        tokio::spawn(async move { send(&client, get(&url, &[("x-api-key", &key)])).await })
    };
    // Wait until the slow request reached the upstream with the old secret.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !up.recorded().iter().any(|r| r.uri.path() == "/slow") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, _, _) = admin_call(
        &client,
        "PUT",
        &kg.admin_url("/v1/ai_secret"),
        Some(&admin),
        Some(json!({"name": "K", "type": "openai", "secret": "rotated-secret"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&client, get(&kg.url("/after"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, body) = slow.await.unwrap();
    assert_eq!(
        s,
        StatusCode::OK,
        "the in-flight request failed across the rotation"
    );
    assert_eq!(&body[..], b"late");
    let rec = up.recorded();
    let old = rec.iter().find(|r| r.uri.path() == "/slow").unwrap();
    let new = rec.iter().find(|r| r.uri.path() == "/after").unwrap();
    assert_eq!(
        old.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}").as_str()
    );
    assert_eq!(new.headers["authorization"], "Bearer rotated-secret");
    kg.stop().await;
}

/// Collects log output written by the fmt subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

// current_thread: every task keygate spawns runs on this thread, under this subscriber.
#[tokio::test(flavor = "current_thread")]
async fn an_upstream_echoing_the_secret_has_that_header_removed_and_logged() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let client = ca.client(false);
    let (s, headers, _) = send(&client, get(&kg.url("/echo"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["x-safe"], "1");
    assert!(
        headers.get("x-echo-authorization").is_none(),
        "echoed secret reached the client"
    );
    assert!(
        headers.get("x-debug").is_none(),
        "a header containing the secret reached the client"
    );
    for (_, v) in headers.iter() {
        assert!(!v.to_str().unwrap_or("").contains(UPSTREAM_SECRET));
    }
    let key_body = kg.key[3..].to_owned();
    kg.stop().await;
    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("echoed the injected secret"), "not logged");
    assert!(log.contains("x-echo-authorization"));
    assert!(!log.contains(UPSTREAM_SECRET), "the log holds the secret");
    assert!(!log.contains(&key_body), "the log holds the key");
}

#[tokio::test]
async fn set_headers_come_from_org_env_vars_and_follow_their_changes() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let extra = format!(
        "[[route]]\nname = \"templated\"\nprefix = \"/t\"\nupstream = \"{}\"\ninject = {{ ai_secret = \"K\" }}\nset_headers = {{ \"x-org\" = \"org={{env:ORG_NAME}};team={{env:TEAM}}\" }}\n",
        up.url()
    );
    let kg = Keygate::start(&ca, &[("/x", &up.url(), "K")], &extra).await;
    let (admin, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);
    let call = || send(&client, get(&kg.url("/t/a"), &[("x-api-key", &kg.key)]));
    let (s, _, body) = call().await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "env vars missing: no credential"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "route templated has no credential configured");
    let (_, store) = kg.store();
    let org = store.tenant().unwrap().org_id;
    let env_url = kg.admin_url("/v1/env_var");
    let mut ids = Vec::new();
    for (name, value) in [("ORG_NAME", "acme"), ("TEAM", "ml")] {
        let (s, _, e) = admin_call(
            &client,
            "POST",
            &env_url,
            Some(&admin),
            Some(json!({"object_type": "organization", "object_id": org, "name": name, "value": value})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        ids.push(e["id"].as_str().unwrap().to_owned());
    }
    let (s, _, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        up.recorded().pop().unwrap().headers["x-org"],
        "org=acme;team=ml"
    );
    let (s, _, _) = admin_call(
        &client,
        "PATCH",
        &kg.admin_url(&format!("/v1/env_var/{}", ids[1])),
        Some(&admin),
        Some(json!({"name": "TEAM", "value": "infra"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    call().await;
    assert_eq!(
        up.recorded().pop().unwrap().headers["x-org"],
        "org=acme;team=infra"
    );
    kg.stop().await;
}

#[test]
fn config_errors_for_injection() {
    let bad = [
        ("[[route]]\nprefix = \"/\"\nupstream = \"http://x\"\ninject = \"passthrough\"\n", "route[0].upstream"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = \"magic\"\n", "route[0].inject"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\", colour = 1 }\n", "route[0].inject.colour"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\", header = \"bad header\" }\n", "route[0].inject.header"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\nvalidate = { path = \"/v\" }\n", "route[0].validate"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = \"passthrough\"\nvalidate = { path = \"nope\" }\n", "route[0].validate.path"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\nset_headers = { \"host\" = \"x\" }\n", "route[0].set_headers.host"),
        ("[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\nset_headers = { \"x-a\" = \"{env:OPEN\" }\n", "route[0].set_headers.x-a"),
        ("[[route]]\nprefix = \"/\"\nhost = \"a/b\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\n", "route[0].host"),
        ("[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\n[[route]]\nname = \"a\"\nprefix = \"/b\"\nupstream = \"https://x\"\ninject = { ai_secret = \"K\" }\n", "route[1].name"),
    ];
    for (text, field) in bad {
        let e = keygate::config::Config::parse(text, "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{field}`")), "{text:?}: {e}");
    }
}

/// Creates an env var through the store.
fn env_var(
    store: &dyn keygate::store::Store,
    ot: keygate::store::ObjectType,
    oid: &str,
    name: &str,
    value: &str,
) -> String {
    let org = store.tenant().unwrap().org_id;
    let w = keygate::store::EnvVarWrite {
        object_type: ot,
        object_id: oid.into(),
        name: name.into(),
        value: Some(keygate::secret::Secret::new(value.into())),
    };
    store
        .write_env_var(
            &org,
            w,
            keygate::store::WriteMode::Replace,
            &keygate::audit::Actor::Keygate,
        )
        .unwrap()
        .id
}

#[tokio::test]
async fn keygate_run_injects_scope_env_passes_exit_codes_and_forwards_signals() {
    use keygate::store::ObjectType;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.toml"), "").unwrap();
    let (_, store) = keygate::app::open_store(
        &keygate::config::Config::parse(
            &format!(
                "[store]\npath = {:?}\nmaster_key_file = {:?}\n",
                dir.path().join("db"),
                dir.path().join("mk")
            ),
            "t",
        )
        .unwrap(),
        None,
    )
    .unwrap();
    let org = store.tenant().unwrap();
    let org_a = env_var(
        store.as_ref(),
        ObjectType::Organization,
        &org.org_id,
        "ORG_A",
        "org-value-a",
    );
    let org_shared = env_var(
        store.as_ref(),
        ObjectType::Organization,
        &org.org_id,
        "SHARED",
        "from-org",
    );
    let proj_shared = env_var(
        store.as_ref(),
        ObjectType::Project,
        "p1",
        "SHARED",
        "from-project",
    );
    let proj_b = env_var(
        store.as_ref(),
        ObjectType::Project,
        "p1",
        "PROJ_B",
        "project value with spaces",
    );
    let other = env_var(
        store.as_ref(),
        ObjectType::Project,
        "p2",
        "OTHER",
        "not-for-p1",
    );
    let cfg = format!(
        "[store]\npath = {:?}\nmaster_key_file = {:?}\n",
        dir.path().join("db"),
        dir.path().join("mk")
    );
    std::fs::write(dir.path().join("k.toml"), cfg).unwrap();
    let base = [
        "--config",
        "k.toml",
        "run",
        "--object-type",
        "project",
        "--object-id",
        "p1",
        "--",
    ];
    let out = keygate_cmd(dir.path(), &[("INHERITED", "yes")])
        .args(base)
        .args(["sh", "-c", "echo ORG_A=$ORG_A; echo SHARED=$SHARED; echo PROJ_B=$PROJ_B; echo OTHER=$OTHER; echo INHERITED=$INHERITED; exit 7"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code passed through; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ORG_A=org-value-a",
        "SHARED=from-project",
        "PROJ_B=project value with spaces",
        "OTHER=",
        "INHERITED=yes",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} missing from:\n{stdout}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("org-value-a") && !stderr.contains("from-project"),
        "a value was logged"
    );
    // `used` is stamped on exactly the vars that were injected.
    let org_id = org.org_id.clone();
    let used = |id: &str| store.get_env_var(&org_id, id).unwrap().unwrap().used;
    assert!(used(&org_a).is_some());
    assert!(used(&proj_shared).is_some());
    assert!(used(&proj_b).is_some());
    assert!(used(&org_shared).is_none(), "an overridden var was stamped");
    assert!(used(&other).is_none());

    // A signal to keygate run reaches the child; the child's exit code comes back.
    let mut child = keygate_cmd(dir.path(), &[])
        .args(base)
        .args([
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(42));
    // A command that cannot start is a clear error.
    let out = keygate_cmd(dir.path(), &[])
        .args(base)
        .arg("/nonexistent/cmd")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start /nonexistent/cmd"));
}
