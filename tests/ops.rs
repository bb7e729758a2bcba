//! Operations: hot reload (admin call, SIGHUP, `keygate reload`), `/metrics`, `/readyz`,
//! the access log, and graceful shutdown on SIGTERM.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use support::harness::{wait_until, wait_until_async};
use support::*;

/// A TLS connection to `port` offering only `alpn`.
async fn tls_to(
    ca: &TestCa,
    port: u16,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_to(ca, port, alpn)
        .await
        .expect("TLS connection to keygate")
}

/// Like [`tls_to`], with the handshake's failure as an error.
async fn try_tls_to(
    ca: &TestCa,
    port: u16,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    support::h2raw::connector(ca, alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One raw HTTP/1.1 keep-alive connection over TLS, to prove a connection survives.
async fn raw_h1(ca: &TestCa, port: u16) -> H1Sender {
    h1_over(tls_to(ca, port, b"http/1.1").await).await
}

type H1Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/1.1 client connection over `tls`, driven in the background.
async fn h1_over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> H1Sender {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn raw_get(send: &mut H1Sender, path: &str, key: &str) -> StatusCode {
    send.ready().await.expect("connection still open");
    let req = http::Request::get(path)
        .header("host", "localhost")
        .header("x-api-key", key)
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = send
        .send_request(req)
        .await
        .expect("request on the same connection");
    let status = res.status();
    res.into_body().collect().await.unwrap();
    status
}

fn write_routes(kg: &Keygate, ca: &TestCa, routes: &[(&str, &str, &str)], extra: &str) {
    let text = config_text(ca, kg.config_path.parent().unwrap(), routes, extra);
    std::fs::write(&kg.config_path, text).unwrap();
}

#[tokio::test]
async fn reload_applies_routes_and_limits_without_dropping_connections() {
    let ca = TestCa::new();
    let up_a = FakeUpstream::start(&ca).await;
    let up_b = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up_a.url(), "K")], "").await;
    let (admin_key, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);

    // A connection opened before the reload, and a stream in flight across it.
    let mut conn = raw_h1(&ca, kg.proxy.port()).await;
    assert_eq!(
        raw_get(&mut conn, "/a/one", &kg.key).await,
        StatusCode::CREATED
    );
    let sse = {
        let client = client.clone();
        let url = kg.url("/sse?n=6&gap_ms=100");
        let key = kg.key.clone();
        tokio::spawn(async move {
            let res = client
                .request(get(&url, &[("x-api-key", &key)]))
                .await
                .unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                String::from_utf8_lossy(&body).matches("data: ").count(),
            )
        })
    };
    // The stream is in flight: it reached the upstream before the reload.
    assert!(
        wait_until(Duration::from_secs(5), || up_a.has("/sse")).await,
        "the stream did not reach the upstream"
    );
    let (s, _, _) = send(&client, get(&kg.url("/b/x"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(up_b.recorded().is_empty(), "no /b route before the reload");

    // New route /b, and a default quota of 1/s burst 2.
    write_routes(
        &kg,
        &ca,
        &[("/", &up_a.url(), "K"), ("/b", &up_b.url(), "K")],
        "[limits]\ndefault = { per_second = 1, burst = 2 }\n",
    );
    let (status, _, body) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/-/reload"),
        Some(&admin_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "applied");
    assert_eq!(body["generation"], 1);

    // The old connection carries on; the new route and quota apply.
    assert_eq!(
        raw_get(&mut conn, "/b/two", &kg.key).await,
        StatusCode::CREATED
    );
    let before_b = up_b.recorded().len();
    assert_eq!(
        before_b, 1,
        "the request after the reload reached the new upstream"
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(raw_get(&mut conn, "/b/x", &kg.key).await);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        3,
        "burst 2 (one already used) then 429: {statuses:?}"
    );
    let (status, events) = sse.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        events, 6,
        "the stream in flight across the reload ended whole"
    );

    // A bad file: refused, the old config stays and says why.
    std::fs::write(
        &kg.config_path,
        std::fs::read_to_string(&kg.config_path).unwrap() + "\n[limits]\nbogus = 1\n",
    )
    .unwrap();
    let (status, _, body) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/-/reload"),
        Some(&admin_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limits"), "{body}");
    let (status, _, body) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/-/reload"),
        Some(&admin_key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["generation"], 1);
    assert!(body["last_error"].as_str().is_some(), "{body}");
    let (status, _, ready) = admin_call(&client, "GET", &kg.admin_url("/readyz"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        ready["config"]["last_reload_error"].as_str().is_some(),
        "{ready}"
    );
    let (s, _, _) = send(
        &client,
        get(&kg.url("/a/still"), &[("x-api-key", &admin_key)]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "the running config still serves");

    // A proxy key may not reload.
    let (status, _, _) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/-/reload"),
        Some(&kg.key),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    kg.stop().await;
}

#[tokio::test]
async fn metrics_and_readyz_report_without_keys_or_secrets() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/v1", &up.url(), "K")], "").await;
    let client = ca.client(false);
    for _ in 0..3 {
        let (s, _, _) = send(&client, get(&kg.url("/v1/x"), &[("x-api-key", &kg.key)])).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let bad = "sk-000000000000000000000000000000000000000000000000";
    let (s, _, _) = send(&client, get(&kg.url("/v1/x"), &[("x-api-key", bad)])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&client, get(&kg.url("/nowhere"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (status, headers, body) = send(&client, get(&kg.admin_url("/metrics"), &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    let route = "/v1";
    for line in [
        format!("keygate_requests_total{{route=\"{route}\",code=\"201\"}} 3"),
        format!("keygate_requests_total{{route=\"{route}\",code=\"401\"}} 1"),
        "keygate_requests_total{route=\"(none)\",code=\"404\"} 1".to_string(),
        format!("keygate_upstream_response_seconds_count{{route=\"{route}\"}} 3"),
        "keygate_key_cache_misses_total 2".to_string(),
        "keygate_config_generation 0".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
    assert!(text.contains("keygate_connections{listener=\"proxy\"} "));
    assert!(text.contains("keygate_key_cache_hits_total 2"), "{text}");
    for needle in [kg.key.as_str(), &kg.key[3..], bad, UPSTREAM_SECRET] {
        assert!(!text.contains(needle), "a key or secret in /metrics");
    }

    let (status, _, ready) = admin_call(&client, "GET", &kg.admin_url("/readyz"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["key_store"]["ok"], true);
    // The certificate check reads the loaded certificate's expiry, not a constant.
    assert_eq!(ready["checks"]["certificates"]["ok"], true);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expires = ready["checks"]["certificates"]["expires_unix"]
        .as_i64()
        .expect("the certificate's expiry");
    assert!(expires > now, "{ready}");
    kg.stop().await;
}

/// A config for a child keygate in `dir` (dev certificates there, store there).
fn child_config(ca: &TestCa, routes: &[(&str, &str)], extra: &str) -> String {
    let mut t = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [upstream]\nca_file = {ca:?}\n{extra}\n",
        ca = ca.ca_file,
    );
    for (prefix, upstream) in routes {
        t.push_str(&format!(
            "[[route]]\nprefix = {prefix:?}\nupstream = {upstream:?}\ninject = {{ ai_secret = \"UPSTREAM_KEY\" }}\n"
        ));
    }
    t
}

#[tokio::test]
async fn sighup_and_keygate_reload_apply_the_file_and_sigterm_drains() {
    let ca = TestCa::new();
    let up_a = FakeUpstream::start(&ca).await;
    let up_b = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, child_config(&ca, &[("/", &up_a.url())], "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let (code, _, err) = cli(
        dir.path(),
        &["--config", &cfg, "secrets", "put", "UPSTREAM_KEY"],
        b"up-secret\n",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let key = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    let (s, _, _) = send(&client, get(&kg.url("/b/x"), &[("x-api-key", &key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(up_b.recorded().is_empty());

    // SIGHUP: the file is read again.
    std::fs::write(
        &cfg,
        child_config(&ca, &[("/", &up_a.url()), ("/b", &up_b.url())], ""),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &kg.pid().to_string()])
        .status()
        .unwrap();
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, _, _) = send(&client, get(&kg.url("/b/x"), &[("x-api-key", &key)])).await;
        assert_eq!(s, StatusCode::CREATED);
        if !up_b.recorded().is_empty() {
            ok = true;
            break;
        }
    }
    assert!(ok, "route /b did not appear after SIGHUP");

    // `keygate reload` refuses a bad file without signalling, and signals for a good one.
    std::fs::write(&cfg, "[listen]\nproxy = 5\n").unwrap();
    let (code, _, err) = cli(dir.path(), &["--config", &cfg, "reload"], b"", &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("listen.proxy"), "{err}");
    std::fs::write(
        &cfg,
        child_config(&ca, &[("/c", &up_b.url())], "").replace(
            "prefix = \"/c\"\n",
            "prefix = \"/c\"\nstrip_prefix = true\n",
        ),
    )
    .unwrap();
    let (code, _, err) = cli(dir.path(), &["--config", &cfg, "reload"], b"", &[]).await;
    assert_eq!(code, Some(0), "{err}");
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, _, _) = send(&client, get(&kg.url("/x"), &[("x-api-key", &key)])).await;
        if s == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
    }
    assert!(gone, "route / still served after `keygate reload`");

    // SIGTERM with a request in flight: it finishes, new connections are refused, exit 0.
    let slow = {
        let client = client.clone();
        let url = kg.url("/c/slow?ms=1500");
        let key = key.clone();
        tokio::spawn(async move {
            let res = client.request(get(&url, &[("x-api-key", &key)])).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        })
    };
    // In flight: the upstream has it (it answers after 1.5 s).
    assert!(
        wait_until(Duration::from_secs(5), || up_b.has("/slow")).await,
        "the slow request did not reach the upstream"
    );
    let proxy = kg.proxy;
    std::process::Command::new("kill")
        .args(["-TERM", &kg.pid().to_string()])
        .status()
        .unwrap();
    // Polled: a connect accepted before the listener closed is let go at once.
    let refused = || async {
        let connect = tokio::net::TcpStream::connect(proxy);
        matches!(
            tokio::time::timeout(Duration::from_millis(500), connect).await,
            Ok(Err(_))
        )
    };
    assert!(
        wait_until_async(Duration::from_secs(5), refused).await,
        "the listener still accepts 5 s after SIGTERM"
    );
    let (status, body) = slow.await.unwrap().expect("the in-flight request finished");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"late");
    let (code, log) = kg.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !dir.path().join("data/keygate.pid").exists(),
        "pid file left behind"
    );
    assert!(!log.contains("up-secret"));
}

#[tokio::test]
async fn uri_and_body_caps_and_the_body_idle_timeout() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "K")],
        "body_idle_timeout = \"400ms\"\n[server]\nmax_body_size = 1000\nmax_uri_length = 1024\n",
    )
    .await;
    let client = ca.client(false);
    let key = kg.key.clone();

    // 414 for a long target, 413 for a declared body over the cap: neither goes upstream.
    let long = format!("/x?{}", "a".repeat(1100));
    let (s, _, _) = send(&client, get(&kg.url(&long), &[("x-api-key", &key)])).await;
    assert_eq!(s, StatusCode::URI_TOO_LONG);
    let req = http::Request::post(kg.url("/upload"))
        .header("x-api-key", &key)
        .body(full(vec![b'x'; 2000]))
        .unwrap();
    let (s, _, body) = send(&client, req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body:?}");
    assert!(
        up.recorded().is_empty(),
        "an over-cap request reached the upstream"
    );

    // A streamed body (no Content-Length) over the cap is cut: the upstream never gets it whole.
    let chunks = futures_util::stream::iter((0..4).map(|_| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'y';
            400
        ])))
    }));
    let req = http::Request::post(kg.url("/upload"))
        .header("x-api-key", &key)
        .body(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(chunks),
        ))
        .unwrap();
    let streamed = client_trusting(&ca.ca_file, false);
    let outcome = streamed.request(req).await;
    if let Ok(res) = outcome {
        assert!(
            res.status().is_server_error() || res.status().is_client_error(),
            "a cut body was answered {}",
            res.status()
        );
    }
    assert!(
        up.recorded().iter().all(|r| r.body.len() <= 1000),
        "the upstream got more than the cap"
    );

    // Events 100 ms apart pass a 400 ms idle timeout, however many; a 700 ms stall is cut.
    let res = client
        .request(get(&kg.url("/sse?n=8&gap_ms=100"), &[("x-api-key", &key)]))
        .await
        .unwrap();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("a healthy stream is not cut");
    assert_eq!(
        String::from_utf8_lossy(&body.to_bytes())
            .matches("data: ")
            .count(),
        8
    );
    let res = client
        .request(get(&kg.url("/sse?n=3&gap_ms=700"), &[("x-api-key", &key)]))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    let mut cut = false;
    while let Some(f) = body.frame().await {
        if f.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "a stalled body ended cleanly instead of abnormally");
    kg.stop().await;
}

#[tokio::test]
async fn requests_in_flight_returns_to_zero_when_a_client_goes_away() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let client = ca.client(false);
    let gauge = |text: &str| -> String {
        text.lines()
            .find(|l| l.starts_with("keygate_requests_in_flight "))
            .unwrap_or_default()
            .to_string()
    };
    let scrape = || async {
        let (_, _, body) = send(&ca.client(false), get(&kg.admin_url("/metrics"), &[])).await;
        String::from_utf8(body.to_vec()).unwrap()
    };
    let task = {
        let url = kg.url("/slow?ms=3000");
        let key = kg.key.clone();
        tokio::spawn(async move { client.request(get(&url, &[("x-api-key", &key)])).await })
    };
    // The handler is running: the upstream has the request (and answers after 3 s).
    assert!(
        wait_until(Duration::from_secs(5), || up.has("/slow")).await,
        "the slow request did not reach the upstream"
    );
    assert_eq!(gauge(&scrape().await), "keygate_requests_in_flight 1");
    task.abort();
    let mut last = String::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = gauge(&scrape().await);
        if last == "keygate_requests_in_flight 0" {
            break;
        }
    }
    assert_eq!(
        last, "keygate_requests_in_flight 0",
        "the gauge leaked a dropped request"
    );
    kg.stop().await;
}

#[tokio::test]
async fn sigterm_ends_long_streams_at_the_drain_deadline_and_exits_0() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        child_config(
            &ca,
            &[("/", &up.url())],
            "[server]\ndrain_timeout = \"1s\"\n",
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let (code, _, err) = cli(
        dir.path(),
        &["--config", &cfg, "secrets", "put", "UPSTREAM_KEY"],
        b"up-secret\n",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let mut kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let key = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    // A 10 s stream, far longer than the 1 s drain deadline.
    let res = client
        .request(get(
            &kg.url("/sse?n=100&gap_ms=100"),
            &[("x-api-key", &key)],
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    let reader = tokio::spawn(async move {
        let mut body = res.into_body();
        let (mut events, mut clean) = (0, false);
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    events += usize::from(f.data_ref().is_some());
                    counted.store(events, Ordering::SeqCst);
                }
                Some(Err(_)) => break,
                None => {
                    clean = true;
                    break;
                }
            }
        }
        (events, clean, std::time::Instant::now())
    });
    // The stream flows: the client has events before the signal.
    let flowing = || received.load(Ordering::SeqCst) >= 2;
    assert!(
        wait_until(Duration::from_secs(5), flowing).await,
        "no events before SIGTERM"
    );
    let sent = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &kg.pid().to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), kg.child.wait())
        .await
        .expect("keygate exits after the drain deadline")
        .unwrap();
    let exited = sent.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        exited >= Duration::from_millis(900) && exited < Duration::from_secs(4),
        "exited {exited:?} after SIGTERM with a 1 s drain deadline"
    );
    let (events, clean, ended) = reader.await.unwrap();
    assert!(
        !clean,
        "a stream cut at the deadline ended like a complete one"
    );
    assert!(events < 100, "the stream was not cut ({events} events)");
    let cut = ended.duration_since(sent);
    assert!(
        cut < Duration::from_secs(4),
        "stream ended {cut:?} after SIGTERM"
    );
    eprintln!("drain: exit {exited:?} after SIGTERM, stream cut after {events} events at {cut:?}");
}

/// `server.idle_timeout`: a connection with no request in progress is closed once the timeout
/// passes (h2 with GOAWAY, which hyper's client reports as a clean end), while a stream that
/// lasts longer than the timeout is never cut by it.
#[tokio::test]
async fn idle_connections_are_closed_and_long_streams_are_not() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "[server]\nidle_timeout = \"1s\"\nheader_read_timeout = \"10s\"\n",
    )
    .await;
    let port = kg.proxy.port();

    // h2: an SSE stream of 2.4 s (longer than the idle timeout) is delivered whole, then the
    // idle connection is closed about 1 s after it ended.
    let tls = tls_to(&ca, port, b"h2").await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(async move {
        let r = conn.await;
        (r.is_ok(), std::time::Instant::now())
    });
    let req = http::Request::get("/sse?n=6&gap_ms=400")
        .header("x-api-key", &kg.key)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.expect("h2 request");
    assert_eq!(res.status(), StatusCode::OK);
    let body = res
        .into_body()
        .collect()
        .await
        .expect("whole SSE stream")
        .to_bytes();
    let ended = std::time::Instant::now();
    assert_eq!(
        body.windows(6).filter(|w| w == b"data: ").count(),
        6,
        "every event arrived"
    );
    let (clean, at) = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("idle h2 connection closed within 5 s")
        .unwrap();
    let after = at - ended;
    assert!(clean, "h2 connection ended with GOAWAY, not an error");
    assert!(
        after >= Duration::from_millis(900),
        "closed only after the idle timeout, not while busy (closed {after:?} after the stream)"
    );
    println!("h2: idle connection closed {after:?} after its 2.4 s stream ended");

    // h1: header_read_timeout is 10 s here, so a close near 1 s is the idle timeout's doing.
    let mut tls = tls_to(&ca, port, b"http/1.1").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "GET /x HTTP/1.1\r\nhost: localhost\r\nx-api-key: {}\r\n\r\n",
        kg.key
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let sent = std::time::Instant::now();
    let eof = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "idle h1 connection closed within 5 s");
    let after = sent.elapsed();
    assert!(
        got.starts_with(b"HTTP/1.1 201"),
        "the request was answered first"
    );
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "h1 closed by the idle timeout ({after:?})"
    );
    println!("h1: idle connection closed {after:?} after its request");
    let paths: Vec<String> = up
        .recorded()
        .iter()
        .map(|r| {
            r.uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        paths,
        ["/sse?n=6&gap_ms=400", "/x"],
        "each request reached the upstream once"
    );
    kg.stop().await;
}

/// R9: beyond `server.max_connections`, a new connection is closed at accept (its TLS
/// handshake fails), while the connections already open carry on; a freed slot is usable again.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_open_ones_carry_on() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "[server]\nmax_connections = 3\n",
    )
    .await;
    let port = kg.proxy.port();
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut send = raw_h1(&ca, port).await;
        assert_eq!(
            raw_get(&mut send, "/before", &kg.key).await,
            StatusCode::CREATED
        );
        open.push(send);
    }
    for i in 0..3 {
        let refused =
            tokio::time::timeout(Duration::from_secs(5), try_tls_to(&ca, port, b"http/1.1"))
                .await
                .expect("the refusal is prompt");
        assert!(
            refused.is_err(),
            "connection {} beyond the cap of 3 was served",
            i + 4
        );
    }
    for send in &mut open {
        assert_eq!(
            raw_get(send, "/during", &kg.key).await,
            StatusCode::CREATED,
            "open connections carry on"
        );
    }
    // Closing one frees its slot (the permit comes back when the connection task ends).
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(tls) = try_tls_to(&ca, port, b"http/1.1").await {
            again = Some(tls);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tls = again.expect("a slot freed by a closed connection is usable again within 2 s");
    let mut send = h1_over(tls).await;
    assert_eq!(
        raw_get(&mut send, "/after", &kg.key).await,
        StatusCode::CREATED
    );
    let paths: Vec<String> = up
        .recorded()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert_eq!(paths.iter().filter(|p| *p == "/before").count(), 3);
    assert_eq!(paths.iter().filter(|p| *p == "/during").count(), 3);
    assert_eq!(paths.iter().filter(|p| *p == "/after").count(), 1);
    kg.stop().await;
}

/// Two servers on one SQLite store: `keygate reload` with each one's config signals that one.
/// (Before, both wrote `keygate.pid` and the last one started took every reload.)
#[tokio::test]
async fn keygate_reload_finds_its_own_server_when_two_share_a_store() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let mut cfgs = Vec::new();
    for name in ["a", "b"] {
        let text = child_config(&ca, &[("/", &up.url())], "").replace(
            "admin = \"127.0.0.1:0\"",
            &format!("admin = \"127.0.0.1:{}\"", free_port()),
        );
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        cfgs.push(cfg.to_str().unwrap().to_owned());
    }
    let (code, _, err) = cli(
        dir.path(),
        &["--config", &cfgs[0], "secrets", "put", "UPSTREAM_KEY"],
        b"up-secret\n",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let a = KeygateProcess::serve(dir.path(), &["--config", &cfgs[0]], &[]).await;
    let b = KeygateProcess::serve(dir.path(), &["--config", &cfgs[1]], &[]).await;
    let key = a.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    let generation = |port: u16| {
        let (client, key) = (client.clone(), key.clone());
        async move {
            let url = format!("https://127.0.0.1:{port}/-/reload");
            let (s, _, v) = admin_call(&client, "GET", &url, Some(&key), None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["generation"].as_u64().unwrap()
        }
    };
    let (code, _, err) = cli(dir.path(), &["--config", &cfgs[0], "reload"], b"", &[]).await;
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while generation(a.admin.port()).await == 0 {
        assert!(std::time::Instant::now() < deadline, "a did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        generation(b.admin.port()).await,
        0,
        "b reloaded for a's config"
    );
    let (code, _, err) = cli(dir.path(), &["--config", &cfgs[1], "reload"], b"", &[]).await;
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while generation(b.admin.port()).await == 0 {
        assert!(std::time::Instant::now() < deadline, "b did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(generation(a.admin.port()).await, 1);
    let (code, log) = b.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        dir.path()
            .join(format!("data/keygate-{}.pid", a.admin.port()))
            .exists(),
        "b's exit removed a's pid file"
    );
    let (code, log) = a.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}
