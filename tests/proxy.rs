//! The data plane end to end over real TLS: keygate in-process on 127.0.0.1:0, a fake TLS
//! upstream that records what it received, and a client that trusts the per-run CA.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use support::harness::wait_until;
use support::*;

#[tokio::test]
async fn forwards_with_the_injected_credential_and_nothing_of_the_clients() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    for h2 in [false, true] {
        let client = ca.client(h2);
        let mut req = Request::post(kg.url("/some/path?q=1&r=two"))
            .header("x-api-key", &kg.key)
            .header("authorization", "Bearer client-own-credential")
            .header("x-custom", "kept")
            .header("content-type", "application/json");
        if !h2 {
            req = req
                .header("connection", "x-foo, keep-alive")
                .header("x-foo", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authorization", "Basic Zm9vOmJhcg==");
        }
        let (status, headers, body) = send(&client, req.body(full("{\"hello\":1}")).unwrap()).await;
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        assert_eq!(headers["x-upstream"], "fake");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body, Bytes::from_static(b"{\"from\":\"upstream\"}"));

        let got = up.recorded().pop().expect("upstream got the request");
        assert_eq!(got.method, http::Method::POST);
        assert_eq!(got.uri.path(), "/some/path");
        assert_eq!(got.uri.query(), Some("q=1&r=two"));
        assert_eq!(got.body, Bytes::from_static(b"{\"hello\":1}"));
        let auths: Vec<_> = got.headers.get_all("authorization").iter().collect();
        assert_eq!(auths.len(), 1, "exactly one Authorization upstream");
        assert_eq!(auths[0], format!("Bearer {UPSTREAM_SECRET}").as_str());
        assert!(got.headers.get("x-api-key").is_none());
        assert!(
            got.headers.get("x-foo").is_none(),
            "Connection-named header forwarded"
        );
        assert!(got.headers.get("keep-alive").is_none());
        assert!(got.headers.get("proxy-authorization").is_none());
        assert!(got.headers.get("connection").is_none());
        assert_eq!(got.headers["x-custom"], "kept");
    }
    kg.stop().await;
}

#[tokio::test]
async fn connection_header_naming_the_credentials_cannot_remove_the_injected_one() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    let client = ca.client(false);
    let req = get(
        &kg.url("/c"),
        &[
            ("x-api-key", &kg.key),
            ("connection", "authorization, x-api-key"),
        ],
    );
    let (status, _, _) = send(&client, req).await;
    assert_eq!(status, StatusCode::CREATED);
    let got = up.recorded().pop().unwrap();
    assert_eq!(got.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(
        got.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}").as_str()
    );
    assert!(got.headers.get("x-api-key").is_none());
    kg.stop().await;
}

#[tokio::test]
async fn a_bearer_key_is_accepted_and_replaced() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    let client = ca.client(true);
    let auth = format!("Bearer {}", kg.key);
    let (status, _, _) = send(&client, get(&kg.url("/b"), &[("authorization", &auth)])).await;
    assert_eq!(status, StatusCode::CREATED);
    let got = up.recorded().pop().unwrap();
    assert_eq!(
        got.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}").as_str()
    );
    kg.stop().await;
}

#[tokio::test]
async fn every_401_is_identical_and_never_reaches_the_upstream() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    let (revoked, revoked_id) = make_key(&kg, keygate::store::Role::Proxy);
    let (_, store) = kg.store();
    let client = ca.client(false);
    // Let the revoked key be cached as valid first, then delete it.
    let (s, _, _) = send(&client, get(&kg.url("/"), &[("x-api-key", &revoked)])).await;
    assert_eq!(s, StatusCode::CREATED);
    store
        .delete_api_key(None, &revoked_id, &keygate::audit::Actor::Keygate)
        .unwrap();
    // The poller has seen the new keys revision: the cached entry is stale.
    let stale = || kg.state().plane.keys.cached(&revoked).is_none();
    assert!(
        wait_until(Duration::from_secs(5), stale).await,
        "the poller did not see the deletion within 5 s"
    );
    let before = up.recorded().len();

    let unknown = format!("sk-{}", "A".repeat(48));
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("x-api-key", unknown.as_str())],
        vec![("x-api-key", "not-a-key")],
        vec![("x-api-key", "")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("x-api-key", revoked.as_str())],
        vec![
            ("x-api-key", kg.key.as_str()),
            ("x-api-key", kg.key.as_str()),
        ],
    ];
    let mut answers = Vec::new();
    for headers in &cases {
        let (status, mut h, body) = send(&client, get(&kg.url("/anything"), headers)).await;
        h.remove("date");
        answers.push((status, h, body));
    }
    for a in &answers {
        assert_eq!(a.0, StatusCode::UNAUTHORIZED);
        assert_eq!(a, &answers[0], "401s differ");
    }
    let v: serde_json::Value = serde_json::from_slice(&answers[0].2).unwrap();
    assert!(v["error"].is_string());
    assert_eq!(
        up.recorded().len(),
        before,
        "a refused request reached the upstream"
    );
    kg.stop().await;
}

#[tokio::test]
async fn a_key_deleted_with_the_cli_is_refused_within_one_second() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    let config = kg.config_path.to_str().unwrap().to_owned();
    let out = keygate_cmd(kg.dir.path(), &[])
        .args([
            "--config",
            &config,
            "keys",
            "create",
            "--name",
            "ci-pipeline",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds the key alone");
    let key = lines[0].to_owned();
    assert!(key.starts_with("sk-") && key.len() == 51);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&key),
        "key printed to stderr"
    );

    let client = ca.client(false);
    let (s, _, _) = send(&client, get(&kg.url("/"), &[("x-api-key", &key)])).await;
    assert_eq!(s, StatusCode::CREATED);

    let list = keygate_cmd(kg.dir.path(), &[])
        .args(["--config", &config, "keys", "list"])
        .output()
        .await
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    let id = list
        .lines()
        .find(|l| l.contains("ci-pipeline"))
        .and_then(|l| l.split_whitespace().next())
        .expect("key listed")
        .to_owned();
    assert!(!list.contains(&key), "keys list shows a key");

    let del = keygate_cmd(kg.dir.path(), &[])
        .args(["--config", &config, "keys", "delete", &id])
        .output()
        .await
        .unwrap();
    assert!(del.status.success());
    let deleted_at = Instant::now();
    loop {
        let (s, _, _) = send(&client, get(&kg.url("/"), &[("x-api-key", &key)])).await;
        if s == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("revocation took effect after {:?}", deleted_at.elapsed());
    kg.stop().await;
}

/// Reads an SSE response frame by frame: (arrival instant, event index) per event.
async fn read_events(mut body: hyper::body::Incoming) -> (Vec<(Instant, usize)>, usize) {
    let mut events = Vec::new();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) else {
            continue;
        };
        frames += 1;
        let now = Instant::now();
        let text = std::str::from_utf8(data).unwrap();
        for line in text.lines() {
            if let Some(i) = line.strip_prefix("data: event ") {
                events.push((now, i.parse().unwrap()));
            }
        }
    }
    (events, frames)
}

#[tokio::test]
async fn sse_events_reach_the_client_before_the_next_is_sent() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "UPSTREAM_KEY")], "").await;
    for h2 in [false, true] {
        up.sse_sent.lock().unwrap().clear();
        let client = ca.client(h2);
        let res = client
            .request(get(
                &kg.url("/sse?n=6&gap_ms=150"),
                &[("x-api-key", &kg.key)],
            ))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert!(res.headers().get("content-encoding").is_none());
        let (events, frames) = read_events(res.into_body()).await;
        let sent = up.sse_sent.lock().unwrap().clone();
        assert_eq!(events.len(), 6);
        assert_eq!(sent.len(), 6);
        assert_eq!(frames, 6, "one event per read");
        let mut delays = Vec::new();
        for (i, (arrived, idx)) in events.iter().enumerate() {
            assert_eq!(*idx, i);
            if let Some(next) = sent.get(i + 1) {
                assert!(
                    arrived < next,
                    "event {i} arrived after event {} was sent",
                    i + 1
                );
            }
            delays.push(arrived.duration_since(sent[i]));
        }
        delays.sort();
        eprintln!(
            "SSE via keygate ({}): per-event delay min {:?} median {:?} max {:?}",
            if h2 { "h2" } else { "h1" },
            delays[0],
            delays[delays.len() / 2],
            delays[delays.len() - 1]
        );
    }
    kg.stop().await;
}

#[tokio::test]
async fn alpn_picks_the_protocol_and_upstream_connections_are_pooled() {
    let ca = TestCa::new();
    let up_h2 = FakeUpstream::start_with(&ca, true).await;
    let up_h1 = FakeUpstream::start_with(&ca, false).await;
    let kg = Keygate::start(
        &ca,
        &[("/two", &up_h2.url(), "K2"), ("/one", &up_h1.url(), "K1")],
        "",
    )
    .await;
    for h2 in [false, true] {
        let client = ca.client(h2);
        for path in ["/two/x", "/one/x", "/two/y", "/one/y"] {
            let res = client
                .request(get(&kg.url(path), &[("x-api-key", &kg.key)]))
                .await
                .unwrap();
            assert_eq!(
                res.version(),
                if h2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                }
            );
            assert_eq!(res.status(), StatusCode::CREATED);
            res.into_body().collect().await.unwrap();
        }
    }
    assert!(up_h2
        .recorded()
        .iter()
        .all(|r| r.version == Version::HTTP_2));
    assert!(up_h1
        .recorded()
        .iter()
        .all(|r| r.version == Version::HTTP_11));
    assert_eq!(up_h2.recorded().len(), 4);
    assert_eq!(up_h1.recorded().len(), 4);
    assert_eq!(
        up_h2.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "h2 upstream connection reused"
    );
    assert_eq!(
        up_h1.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "h1 keep-alive connection reused"
    );
    kg.stop().await;
}

#[tokio::test]
async fn upstream_http2_false_speaks_http1_to_an_h2_upstream() {
    let ca = TestCa::new();
    let up = FakeUpstream::start_with(&ca, true).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "http2 = false\n").await;
    let client = ca.client(true);
    for path in ["/a", "/b"] {
        let res = client
            .request(get(&kg.url(path), &[("x-api-key", &kg.key)]))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        res.into_body().collect().await.unwrap();
    }
    let seen = up.recorded();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.version == Version::HTTP_11));
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "h1 keep-alive connection reused"
    );
    kg.stop().await;
}

#[tokio::test]
async fn unrouted_paths_get_404_and_missing_secrets_503() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/v1", &up.url(), "K")], "").await;
    // A route whose secret was never stored.
    let client = ca.client(false);
    let (s, _, body) = send(
        &client,
        get(&kg.url("/v1beta/x"), &[("x-api-key", &kg.key)]),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());
    let (_, store) = kg.store();
    let org = store.tenant().unwrap().org_id;
    store
        .delete_ai_secret(
            &org,
            keygate::store::SecretRef::Name("K"),
            &keygate::audit::Actor::Keygate,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, _, body) = send(&client, get(&kg.url("/v1/x"), &[("x-api-key", &kg.key)])).await;
        if s == StatusCode::SERVICE_UNAVAILABLE {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], "route /v1 has no credential configured");
            break;
        }
        assert!(Instant::now() < deadline, "deleted secret still used");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let n = up.recorded().len();
    // Put a new value: the next requests use it.
    put_secret(store.as_ref(), "K", "rotated-value-9876");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, _, _) = send(&client, get(&kg.url("/v1/x"), &[("x-api-key", &kg.key)])).await;
        if s == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "new secret not picked up");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let got = up.recorded();
    assert_eq!(got.len(), n + 1, "503s reached the upstream");
    assert_eq!(got[n].headers["authorization"], "Bearer rotated-value-9876");
    kg.stop().await;
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    // A port with nothing listening: bind, note, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let other_ca = TestCa::new();
    let untrusted = FakeUpstream::start(&other_ca).await;
    let kg = Keygate::start(
        &ca,
        &[
            ("/", &up.url(), "K"),
            ("/refused", &format!("https://127.0.0.1:{closed}"), "K"),
            ("/untrusted", &untrusted.url(), "K"),
        ],
        "response_header_timeout = \"400ms\"\n",
    )
    .await;
    let client = ca.client(false);
    let started = Instant::now();
    let (s, _, body) = send(
        &client,
        get(&kg.url("/refused/x"), &[("x-api-key", &kg.key)]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused must fail fast"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"],
        "upstream connection failed"
    );

    let started = Instant::now();
    let (s, _, body) = send(&client, get(&kg.url("/slow"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"],
        "upstream timed out"
    );

    let (s, _, body) = send(
        &client,
        get(&kg.url("/untrusted/x"), &[("x-api-key", &kg.key)]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"],
        "upstream TLS verification failed"
    );
    assert!(
        untrusted.recorded().is_empty(),
        "an unverified upstream got a request"
    );

    // The proxy still works after all that.
    let (s, _, _) = send(&client, get(&kg.url("/fine"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    kg.stop().await;
}

#[tokio::test]
async fn cleartext_http_gets_a_plain_400_and_a_leaked_key_is_flagged() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    for (addr, key) in [
        (kg.proxy, kg.key.clone()),
        (kg.admin, "sk-notvalid".to_owned()),
    ] {
        let answer = cleartext_get(addr, &key).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("content-type: text/plain")
                || answer.contains("Content-Type: text/plain")
        );
        assert!(answer.ends_with("this port speaks HTTPS only; use https://\r\n"));
        assert!(!answer.contains(&key));
    }
    assert!(
        up.recorded().is_empty(),
        "a cleartext request was forwarded"
    );
    let (_, store) = kg.store();
    let org = store.tenant().unwrap().org_id;
    let keys = store
        .list_api_keys(&keygate::store::ListQuery::all(&org, 100))
        .unwrap();
    let flagged = keys.iter().find(|k| k.id == kg.key_id).unwrap();
    assert!(flagged.exposed.is_some(), "leaked key not flagged");
    assert!(keys
        .iter()
        .filter(|k| k.id != kg.key_id)
        .all(|k| k.exposed.is_none()));
    kg.stop().await;
}

#[tokio::test]
async fn admin_listener_answers_healthz_over_tls() {
    let ca = TestCa::new();
    let kg = Keygate::start(&ca, &[], "").await;
    for h2 in [false, true] {
        let (s, h, body) = send(&ca.client(h2), get(&kg.admin_url("/healthz"), &[])).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(body, Bytes::from_static(b"{\"status\":\"ok\"}"));
    }
    kg.stop().await;
}
