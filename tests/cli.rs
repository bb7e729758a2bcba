//! keygate as a user runs it: the binary as a child process, on a fresh directory, with the
//! CLI, at trace log level, and with bad input.

mod support;

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::io::AsyncWriteExt;

/// A config for a child keygate in `dir`: ephemeral ports, generated dev certificates, default
/// relative store paths, one route to `upstream` trusting `ca`.
fn child_config(ca: &TestCa, upstream: &str, extra: &str) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [upstream]\nca_file = {ca:?}\n{extra}\n\
         [[route]]\nprefix = \"/\"\nupstream = {upstream:?}\ninject = {{ ai_secret = \"UPSTREAM_KEY\" }}\n",
        ca = ca.ca_file,
    )
}

#[tokio::test]
async fn fresh_directory_end_to_end_at_trace_level_leaks_nothing() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    // The default config location: no --config needed.
    std::fs::write(
        dir.path().join("config/keygate.toml"),
        child_config(&ca, &up.url(), ""),
    )
    .unwrap();
    let env = [("KEYGATE_LOG", "trace")];
    let kg = KeygateProcess::serve(dir.path(), &[], &env).await;

    // First start: dev CA and certificate, master key 0600, store, and one admin key on stdout.
    let certs = dir.path().join("certs");
    for f in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
        assert!(certs.join(f).exists(), "{f} not generated");
    }
    let master_file = dir.path().join("data/master.key");
    let master_hex = std::fs::read_to_string(&master_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(master_hex.len(), 64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&master_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(dir.path().join("data/keygate.db").exists());
    assert_eq!(kg.stdout_lines.len(), 1, "stdout: {:?}", kg.stdout_lines);
    let admin_key = kg.stdout_lines[0].clone();
    assert!(admin_key.starts_with("sk-") && admin_key.len() == 51);
    assert!(
        kg.stderr.lock().unwrap().contains("certs/ca.pem"),
        "CA path to trust not printed"
    );

    // The CLI, on the same store while the server runs.
    let (code, key, err) = cli(
        dir.path(),
        &["keys", "create", "--name", "ci-pipeline"],
        b"",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let key = key.trim().to_owned();
    let secret = "sk-upstream-VALUE-a1b2c3d4e5";
    let (code, out, err) = cli(
        dir.path(),
        &["secrets", "put", "UPSTREAM_KEY", "--type", "openai"],
        format!("{secret}\n").as_bytes(),
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.is_empty());
    assert!(!err.contains(secret));
    let (_, list, _) = cli(dir.path(), &["secrets", "list"], b"", &[]).await;
    assert!(
        list.contains("UPSTREAM_KEY") && list.contains("****d4e5"),
        "{list}"
    );
    assert!(!list.contains(secret));

    // Calls through the proxy: the stored secret (without the newline) is injected.
    let client = client_trusting(&certs.join("ca.pem"), false);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, _, _) = send(&client, get(&kg.url("/v1/models"), &[("x-api-key", &key)])).await;
        if s == StatusCode::CREATED {
            break;
        }
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 'no credential yet' is expected"
        );
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = up.recorded().pop().unwrap();
    assert_eq!(
        got.headers["authorization"],
        format!("Bearer {secret}").as_str()
    );
    // Refused ones, and a cleartext one with a valid key.
    let (s, _, _) = send(&client, get(&kg.url("/x"), &[("x-api-key", "sk-nope")])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let h2 = client_trusting(&certs.join("ca.pem"), true);
    let (s, _, _) = send(
        &h2,
        get(
            &kg.url("/y"),
            &[("authorization", &format!("Bearer {admin_key}"))],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    {
        use tokio::io::AsyncReadExt;
        let mut tcp = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
        tcp.write_all(format!("GET / HTTP/1.1\r\nx-api-key: {key}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut s = String::new();
        let _ = tcp.read_to_string(&mut s).await;
        assert!(s.starts_with("HTTP/1.1 400"));
    }
    let (_, list, _) = cli(dir.path(), &["keys", "list"], b"", &[]).await;
    let line = list.lines().find(|l| l.contains("ci-pipeline")).unwrap();
    assert!(line.contains("yes, at"), "exposed flag not shown: {line}");

    let (code, log) = kg.terminate().await;
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert!(
        log.lines().count() > 50,
        "trace logging produced too little to be a real check"
    );
    for (what, needle) in [
        ("proxy key", key.as_str()),
        ("admin key", admin_key.as_str()),
        ("upstream secret", secret),
        ("master key", master_hex.as_str()),
        ("proxy key body", &key[3..]),
        ("secret tail", &secret[12..]),
    ] {
        assert!(!log.contains(needle), "the {what} appears in the log");
    }
    assert!(log.contains("flagged as exposed"), "leak event not logged");
    // One access line per request, with the key's id (never the key), route, status and sizes.
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("keygate::access"))
        .collect();
    assert!(
        access.iter().any(|l| l.contains("plane=\"proxy\"")
            && l.contains("status=201")
            && l.contains("key_id=")
            && !l.contains("key_id=\"-\"")
            && l.contains("bytes=")
            && l.contains("upstream_ms=")
            && l.contains("complete=true")),
        "no complete proxy access line in:\n{}",
        access.join("\n")
    );
}

#[tokio::test]
async fn a_large_upload_streams_through_with_flat_memory() {
    const TOTAL: usize = 256 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, child_config(&ca, &up.url(), "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let (code, _, err) = cli(
        dir.path(),
        &["--config", &cfg, "secrets", "put", "UPSTREAM_KEY"],
        b"up-secret-value\n",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let key = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    // Warm up: one small request, then take the baseline.
    let (s, _, _) = send(&client, get(&kg.url("/warm"), &[("x-api-key", &key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    let baseline = kg.rss_kib();

    let stream = futures_util::stream::iter((0..TOTAL / CHUNK).map(|i| {
        let chunk = bytes::Bytes::from(vec![(i % 251) as u8; CHUNK]);
        Ok::<_, std::io::Error>(Frame::data(chunk))
    }));
    let req = Request::post(kg.url("/sink"))
        .header("x-api-key", &key)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let pid = kg.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..2400 {
            peak = peak.max(proc_status_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        peak
    });
    let started = Instant::now();
    let (s, _, body) = send(&client, req).await;
    let took = started.elapsed();
    sampler.abort();
    let peak_during = kg.rss_kib().max(baseline);
    assert_eq!(s, http::StatusCode::OK, "{body:?}");
    assert_eq!(body, format!("{{\"bytes\":{TOTAL}}}"));
    let hwm = proc_status_kib(pid, "VmHWM:");
    eprintln!(
        "256 MiB upload through keygate in {took:?}: RSS baseline {baseline} KiB, after {peak_during} KiB, high-water mark {hwm} KiB"
    );
    // Buffering even a tenth of the body would show; 48 MiB allows for allocator and TLS
    // buffers across both legs.
    assert!(
        hwm < baseline + 48 * 1024,
        "RSS grew from {baseline} KiB to {hwm} KiB"
    );
    let _ = kg.terminate().await;
}

#[tokio::test]
async fn bad_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\ninject = { ai_secret = \"K\" }\n", "route[0].upstream"),
        ("[listen]\nproxy = \"localhost\"\n", "listen.proxy"),
        ("[upstream]\nresponse_header_timeout = \"forever\"\n", "upstream.response_header_timeout"),
        ("[store]\nunknown_field = 1\n", "unknown_field"),
        ("[[route]\n", "syntax"),
    ];
    for (text, field) in cases {
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, text).unwrap();
        let p = f.to_str().unwrap();
        let (code, _, err) = cli(dir.path(), &["check-config", p], b"", &[]).await;
        assert_eq!(code, Some(1), "check-config {text:?}: {err}");
        assert!(
            err.contains(field),
            "error for {text:?} does not name {field}: {err}"
        );
        let (code, _, err) = cli(dir.path(), &["--config", p, "serve"], b"", &[]).await;
        assert_eq!(code, Some(1), "serve {text:?}: {err}");
        assert!(err.contains(field), "{err}");
    }
    let (code, _, err) = cli(dir.path(), &["--config", "missing.toml", "serve"], b"", &[]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("missing.toml"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "a bad config must not create a store"
    );
    // And a good one is accepted.
    std::fs::write(
        dir.path().join("ok.toml"),
        "[listen]\nproxy = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(dir.path(), &["check-config", "ok.toml"], b"", &[]).await;
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test]
async fn a_wrong_or_corrupt_master_key_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, _, err) = cli(
        d,
        &["secrets", "put", "S", "--type", "openai"],
        b"first-value-0001",
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let good = std::fs::read_to_string(d.join("data/master.key")).unwrap();

    // A different key from the environment: refused before anything is read or written.
    let other = "ab".repeat(32);
    let (code, _, err) = cli(
        d,
        &["secrets", "put", "S"],
        b"second-value-0002",
        &[("KEYGATE_MASTER_KEY", &other)],
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("master key does not match"), "{err}");
    assert!(!err.contains(&other));
    // A malformed env value.
    let (code, _, err) = cli(d, &["keys", "list"], b"", &[("KEYGATE_MASTER_KEY", "xyz")]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("KEYGATE_MASTER_KEY must be exactly 64 hex"),
        "{err}"
    );
    // The same key through the environment works.
    let (code, _, err) = cli(
        d,
        &["secrets", "list"],
        b"",
        &[("KEYGATE_MASTER_KEY", good.trim())],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    // A corrupt key file.
    std::fs::write(d.join("data/master.key"), "0123 not hex\n").unwrap();
    let (code, _, err) = cli(d, &["secrets", "list"], b"", &[]).await;
    assert_eq!(code, Some(1), "a panic exits 101: {err}");
    assert!(
        err.contains("master.key") && err.contains("corrupt"),
        "{err}"
    );
    // A missing key file next to an existing store: a new key would not fit; refused.
    std::fs::remove_file(d.join("data/master.key")).unwrap();
    let (code, _, err) = cli(d, &["secrets", "list"], b"", &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("master key does not match"), "{err}");
    // Put the right key back: the first value is still there and untouched.
    std::fs::write(d.join("data/master.key"), &good).unwrap();
    let (code, list, _) = cli(d, &["secrets", "list"], b"", &[]).await;
    assert_eq!(code, Some(0));
    assert!(list.contains("****0001"), "{list}");
}

#[tokio::test]
async fn secrets_put_refuses_empty_and_multi_line_values() {
    let dir = tempfile::tempdir().unwrap();
    for input in [&b""[..], b"\n", b"line1\nline2\n"] {
        let (code, _, err) = cli(dir.path(), &["secrets", "put", "S"], input, &[]).await;
        assert_eq!(code, Some(1), "{input:?}: {err}");
    }
    let (_, list, _) = cli(dir.path(), &["secrets", "list"], b"", &[]).await;
    assert!(!list.contains(" S"), "{list}");
}

#[tokio::test]
async fn upstream_tls_failure_is_logged_as_such() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let up = FakeUpstream::start(&other).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, child_config(&ca, &up.url(), "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    cli(
        dir.path(),
        &["--config", &cfg, "secrets", "put", "UPSTREAM_KEY"],
        b"value-1234",
        &[],
    )
    .await;
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let key = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    let (s, _, _) = send(&client, get(&kg.url("/"), &[("x-api-key", &key)])).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(up.recorded().is_empty());
    let (_, log) = kg.terminate().await;
    assert!(log.contains("upstream TLS verification failed"), "{log}");
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "{log}"
    );
}
