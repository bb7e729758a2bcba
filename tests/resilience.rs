//! Resilience battery (reliability.md R2, R3, R4, R7, R8 and a leak check): a misbehaving
//! upstream written by hand, raw TLS clients (HTTP/1.1 by hand, HTTP/2 frames by hand) and
//! assertions on what the client got and what the upstream saw.
//!
//! Every test takes one process-wide lock and runs on its own runtime, so the tests of this
//! file run one at a time (the fd and task counts, and the timings, need a quiet process).

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::h2raw::*;
use support::harness::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` alone (no other test of this file at the same time) on a fresh runtime.
fn run<F: Future<Output = ()>>(f: F) {
    run_serial(&SERIAL, f);
}

// ---------------------------------------------------------------------------------------------
// A misbehaving HTTP/1.1 upstream, by hand
// ---------------------------------------------------------------------------------------------

/// What the bad upstream saw: each request (by path) and, for the paths that wait for the
/// other side, when keygate's side of the connection ended.
#[derive(Default)]
struct Log {
    seen: Vec<(String, Instant)>,
    ended: Vec<(String, Instant)>,
    upload_bytes: usize,
}

struct BadUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BadUpstream {
    fn drop(&mut self) {
        // The connection tasks live in a JoinSet owned by this task: aborting it ends them.
        self.task.abort();
    }
}

impl BadUpstream {
    async fn start(ca: &TestCa) -> Self {
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let (addr, task) = hand_upstream(ca, "bad", move |acceptor, tcp| {
            bad_conn(acceptor, tcp, l.clone())
        })
        .await;
        BadUpstream { addr, log, task }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn seen(&self, needle: &str) -> usize {
        let l = self.log.lock().unwrap();
        l.seen.iter().filter(|(p, _)| p.contains(needle)).count()
    }

    fn ended(&self, needle: &str) -> Vec<Instant> {
        let l = self.log.lock().unwrap();
        l.ended
            .iter()
            .filter(|(p, _)| p.contains(needle))
            .map(|(_, t)| *t)
            .collect()
    }
}

/// Reads and drops bytes until the other side is gone (bounded at 15 s).
async fn wait_eof(tls: &mut UpTls) {
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        let mut tmp = [0u8; 4096];
        loop {
            match tls.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

const HEAD_1000: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\n";
const HEAD_SSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

async fn bad_conn(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, log: Arc<Mutex<Log>>) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = Vec::new();
    let end = |log: &Arc<Mutex<Log>>, path: &str| {
        log.lock()
            .unwrap()
            .ended
            .push((path.to_owned(), Instant::now()));
    };
    loop {
        let Some((path, head_len, cl)) = read_head(&mut tls, &mut buf).await else {
            return;
        };
        buf.drain(..head_len);
        log.lock()
            .unwrap()
            .seen
            .push((path.clone(), Instant::now()));
        if path.contains("/ok") {
            while buf.len() < cl {
                let mut tmp = [0u8; 4096];
                match tls.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            buf.drain(..cl);
            let r = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
            if tls.write_all(r).await.is_err() || tls.flush().await.is_err() {
                return;
            }
        } else if path.contains("/close-before-headers") {
            let _ = tls.shutdown().await;
            return;
        } else if path.contains("/cl-cut") {
            let _ = tls.write_all(HEAD_1000).await;
            let _ = tls.write_all(&[b'a'; 100]).await;
            let _ = tls.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tls.shutdown().await;
            return;
        } else if path.contains("/sse-cut") {
            let _ = tls.write_all(HEAD_SSE).await;
            for i in 0..2 {
                let _ = tls
                    .write_all(&chunk(&format!("id: {i}\ndata: event {i}\n\n")))
                    .await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = tls.shutdown().await;
            return;
        } else if path.contains("/post-die") {
            // Read the whole request, then die without a word.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let mut tmp = [0u8; 4096];
                while buf.len() < cl {
                    match tls.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
            })
            .await;
            return;
        } else if path.contains("/stall-headers") || path.contains("/hold") {
            wait_eof(&mut tls).await;
            end(&log, &path);
            return;
        } else if path.contains("/stall-body") {
            let _ = tls.write_all(HEAD_1000).await;
            let _ = tls.write_all(&[b'a'; 100]).await;
            let _ = tls.flush().await;
            wait_eof(&mut tls).await;
            end(&log, &path);
            return;
        } else if path.contains("/upload") {
            log.lock().unwrap().upload_bytes += buf.len();
            let _ = tokio::time::timeout(Duration::from_secs(15), async {
                let mut tmp = [0u8; 4096];
                loop {
                    match tls.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => log.lock().unwrap().upload_bytes += n,
                    }
                }
            })
            .await;
            end(&log, &path);
            return;
        } else if path.contains("/sse-forever") {
            if tls.write_all(HEAD_SSE).await.is_err() {
                end(&log, &path);
                return;
            }
            let started = Instant::now();
            let mut tmp = [0u8; 1024];
            for i in 0.. {
                if started.elapsed() > Duration::from_secs(15) {
                    break;
                }
                let ev = chunk(&format!("data: tick {i}\n\n"));
                if tls.write_all(&ev).await.is_err() || tls.flush().await.is_err() {
                    break;
                }
                tokio::select! {
                    r = tls.read(&mut tmp) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            end(&log, &path);
            return;
        } else {
            let r = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
            if tls.write_all(r).await.is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients (raw TLS and HTTP/2 frames by hand: support/h2raw.rs)
// ---------------------------------------------------------------------------------------------

/// How a response body ended.
#[derive(Debug, PartialEq)]
enum End {
    Clean,
    Abnormal(String),
}

/// Reads a response body to its end: (bytes, how it ended, when it ended).
async fn read_body(body: hyper::body::Incoming) -> (Vec<u8>, End, Instant) {
    let mut body = body;
    let mut data = Vec::new();
    let end = within("the response body to end", T5, async {
        loop {
            match body.frame().await {
                None => return End::Clean,
                Some(Err(e)) => return End::Abnormal(e.to_string()),
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        data.extend_from_slice(d);
                    }
                }
            }
        }
    })
    .await;
    (data, end, Instant::now())
}

fn keyed(method: &str, url: &str, key: &str, body: &'static [u8]) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .body(full(Bytes::from_static(body)))
        .unwrap()
}

async fn status_of(
    client: &hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TestBody,
    >,
    req: Request<TestBody>,
) -> (StatusCode, Bytes, Duration) {
    let t = Instant::now();
    let res = within("a response", T5, client.request(req))
        .await
        .expect("request");
    let status = res.status();
    let body = within("a body", T5, res.into_body().collect())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, body, t.elapsed())
}

// ---------------------------------------------------------------------------------------------
// R2: the upstream dies
// ---------------------------------------------------------------------------------------------

#[test]
fn r2_upstream_death_is_a_502_or_an_abnormal_end_and_post_is_never_retried() {
    run(async {
        let ca = TestCa::new();
        let bad = BadUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/bad", &bad.url(), "K")], NO_LIMITS).await;
        for h2 in [false, true] {
            let proto = if h2 { "h2" } else { "h1" };
            let client = ca.client(h2);
            let healthy = |round: &str| {
                let (client, kg, bad) = (&client, &kg, &bad);
                let round = round.to_owned();
                async move {
                    let before = bad.seen("/ok");
                    let (s, b, _) =
                        status_of(client, keyed("GET", &kg.url("/bad/ok"), &kg.key, b"")).await;
                    assert_eq!(s, StatusCode::OK, "{proto}: request after {round}");
                    assert_eq!(&b[..], b"ok", "{proto}: request after {round}");
                    assert_eq!(bad.seen("/ok"), before + 1, "{proto}: after {round}");
                }
            };
            healthy("nothing").await;

            // (a) Accepted, then closed before any header.
            let before = bad.seen("/close-before-headers");
            let (s, _, took) = status_of(
                &client,
                keyed("GET", &kg.url("/bad/close-before-headers"), &kg.key, b""),
            )
            .await;
            eprintln!("R2 {proto}: close before headers -> {s} in {took:?}");
            assert_eq!(s, StatusCode::BAD_GATEWAY, "{proto}");
            assert!(took < Duration::from_secs(2), "{proto}: 502 took {took:?}");
            assert!(bad.seen("/close-before-headers") > before, "{proto}");
            healthy("close before headers").await;

            // (b) Content-Length: 1000, then closed after 100 bytes.
            let res = within(
                "cl-cut headers",
                T5,
                client.request(keyed("GET", &kg.url("/bad/cl-cut"), &kg.key, b"")),
            )
            .await
            .expect("headers arrive");
            assert_eq!(res.status(), StatusCode::OK, "{proto}");
            let (data, end, _) = read_body(res.into_body()).await;
            eprintln!("R2 {proto}: cl-cut -> {} bytes, {end:?}", data.len());
            assert!(
                matches!(end, End::Abnormal(_)),
                "{proto}: a cut body ended cleanly with {} bytes",
                data.len()
            );
            assert!(data.len() < 1000, "{proto}");
            assert_eq!(bad.seen("/cl-cut"), if h2 { 2 } else { 1 });
            healthy("cl-cut").await;

            // (c) A chunked SSE stream cut mid-stream.
            let res = within(
                "sse-cut headers",
                T5,
                client.request(keyed("GET", &kg.url("/bad/sse-cut"), &kg.key, b"")),
            )
            .await
            .expect("headers arrive");
            assert_eq!(res.status(), StatusCode::OK, "{proto}");
            let (data, end, _) = read_body(res.into_body()).await;
            let text = String::from_utf8_lossy(&data).to_string();
            eprintln!("R2 {proto}: sse-cut -> {:?}, {end:?}", text);
            assert!(text.contains("event 1"), "{proto}: events before the cut");
            assert!(
                matches!(end, End::Abnormal(_)),
                "{proto}: a cut SSE stream ended cleanly"
            );
            healthy("sse-cut").await;

            // (e) A POST whose upstream connection dies: one attempt, never retried.
            let before = bad.seen("/post-die");
            let (s, _, took) = status_of(
                &client,
                keyed("POST", &kg.url("/bad/post-die"), &kg.key, b"{\"n\":1}"),
            )
            .await;
            eprintln!("R2 {proto}: POST to a dying upstream -> {s} in {took:?}");
            assert_eq!(s, StatusCode::BAD_GATEWAY, "{proto}");
            // Kept: a window for a retry to show up; no signal says none is coming.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                bad.seen("/post-die") - before,
                1,
                "{proto}: the POST reached the upstream more than once"
            );
            healthy("post-die").await;
        }
        kg.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// R3: upstream slow or absent
// ---------------------------------------------------------------------------------------------

#[test]
fn r3_refused_is_502_no_headers_is_504_and_a_stalled_body_is_cut_but_sse_is_not() {
    run(async {
        let ca = TestCa::new();
        let bad = BadUpstream::start(&ca).await;
        let up = FakeUpstream::start(&ca).await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let refused = format!("https://127.0.0.1:{closed}");
        let kg = Keygate::start(
            &ca,
            &[
                ("/bad", &bad.url(), "K"),
                ("/refused", &refused, "K"),
                ("/", &up.url(), "K"),
            ],
            &format!(
                "response_header_timeout = \"500ms\"\nbody_idle_timeout = \"400ms\"\n{NO_LIMITS}"
            ),
        )
        .await;
        for h2 in [false, true] {
            let proto = if h2 { "h2" } else { "h1" };
            let client = ca.client(h2);
            // Warm the client's connection to keygate, so timings are keygate's.
            let (s, _, _) = status_of(&client, keyed("GET", &kg.url("/warm"), &kg.key, b"")).await;
            assert_eq!(s, StatusCode::CREATED);

            let (s, _, took) =
                status_of(&client, keyed("GET", &kg.url("/refused/x"), &kg.key, b"")).await;
            eprintln!("R3 {proto}: refused -> {s} in {took:?}");
            assert_eq!(s, StatusCode::BAD_GATEWAY, "{proto}");
            assert!(
                took < Duration::from_secs(1),
                "{proto}: refused took {took:?}"
            );

            let before = bad.seen("/stall-headers");
            let (s, _, took) = status_of(
                &client,
                keyed("GET", &kg.url("/bad/stall-headers"), &kg.key, b""),
            )
            .await;
            let t504 = Instant::now();
            eprintln!("R3 {proto}: no headers -> {s} in {took:?}");
            assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{proto}");
            assert!(
                took >= Duration::from_millis(480) && took < Duration::from_millis(1500),
                "{proto}: 504 after {took:?}, want ~500 ms"
            );
            assert_eq!(bad.seen("/stall-headers") - before, 1, "{proto}");
            // keygate gave up on that upstream connection: no half-open connection left.
            assert!(
                wait_until(Duration::from_secs(1), || bad.ended("/stall-headers").len()
                    > before)
                .await,
                "{proto}: the stalled upstream connection was not closed after the 504"
            );
            let sent = t504 - took;
            let gone = bad.ended("/stall-headers")[before].saturating_duration_since(sent);
            eprintln!("R3 {proto}: stalled upstream connection closed {gone:?} after the request was sent");

            let before = bad.ended("/stall-body").len();
            let t = Instant::now();
            let res = within(
                "stall-body headers",
                T5,
                client.request(keyed("GET", &kg.url("/bad/stall-body"), &kg.key, b"")),
            )
            .await
            .expect("headers arrive");
            assert_eq!(res.status(), StatusCode::OK, "{proto}");
            let (data, end, at) = read_body(res.into_body()).await;
            let cut = at - t;
            eprintln!(
                "R3 {proto}: stalled body -> {} bytes, {end:?}, after {cut:?}",
                data.len()
            );
            assert_eq!(data.len(), 100, "{proto}");
            assert!(
                matches!(end, End::Abnormal(_)),
                "{proto}: a stalled body ended cleanly"
            );
            assert!(
                cut >= Duration::from_millis(380) && cut < Duration::from_millis(2000),
                "{proto}: cut after {cut:?}, want ~400 ms"
            );
            assert!(
                wait_until(Duration::from_secs(1), || bad.ended("/stall-body").len()
                    > before)
                .await,
                "{proto}: the stalled upstream connection was not closed after the cut"
            );

            // Healthy SSE with 150 ms gaps under a 400 ms idle timeout: never cut.
            let res = within(
                "sse headers",
                T5,
                client.request(keyed("GET", &kg.url("/sse?n=6&gap_ms=150"), &kg.key, b"")),
            )
            .await
            .expect("headers arrive");
            assert_eq!(res.status(), StatusCode::OK);
            let (data, end, _) = read_body(res.into_body()).await;
            let text = String::from_utf8_lossy(&data);
            assert_eq!(end, End::Clean, "{proto}: healthy SSE was cut");
            assert_eq!(text.matches("data: event").count(), 6, "{proto}: {text}");
        }
        kg.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// R4: the client goes away
// ---------------------------------------------------------------------------------------------

/// Reports how long after `dropped` the upstream saw the end of the `path` request (index `i`).
async fn cancel_latency(bad: &BadUpstream, path: &str, i: usize, dropped: Instant) -> Duration {
    assert!(
        wait_until(Duration::from_secs(3), || bad.ended(path).len() > i).await,
        "{path}: the upstream request was never cancelled"
    );
    bad.ended(path)[i].saturating_duration_since(dropped)
}

#[test]
fn r4_a_client_that_goes_away_cancels_the_upstream_request() {
    run(async {
        let ca = TestCa::new();
        let bad = BadUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/bad", &bad.url(), "K")], NO_LIMITS).await;
        let tls = connector(&ca, b"http/1.1");
        let limit = Duration::from_millis(500);
        let mut report = Vec::new();

        // h1, waiting for headers.
        let mut c = connect(&tls, kg.proxy, b"http/1.1").await;
        let t = Instant::now();
        let req = format!(
            "GET /bad/hold HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
            kg.key
        );
        c.write_all(req.as_bytes()).await.unwrap();
        assert!(wait_until(T5, || bad.seen("/hold") == 1).await);
        tokio::time::sleep_until((t + Duration::from_millis(200)).into()).await;
        drop(c);
        let dropped = Instant::now();
        let lat = cancel_latency(&bad, "/hold", 0, dropped).await;
        report.push(("h1 waiting for headers", lat));

        // h2, waiting for headers: the response future is dropped (RST_STREAM), the client
        // connection stays.
        let client = ca.client(true);
        let (s, _, _) = status_of(&client, keyed("GET", &kg.url("/bad/ok"), &kg.key, b"")).await;
        assert_eq!(s, StatusCode::OK);
        let c2 = client.clone();
        let url = kg.url("/bad/hold");
        let key = kg.key.clone();
        let task = tokio::spawn(async move {
            let _ = c2.request(keyed("GET", &url, &key, b"")).await;
        });
        assert!(wait_until(T5, || bad.seen("/hold") == 2).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        task.abort();
        let dropped = Instant::now();
        let lat = cancel_latency(&bad, "/hold", 1, dropped).await;
        report.push(("h2 stream reset while waiting", lat));
        drop(client);

        // h1, mid-SSE.
        let mut c = connect(&tls, kg.proxy, b"http/1.1").await;
        let req = format!(
            "GET /bad/sse-forever HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
            kg.key
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        within("the first SSE event", T5, async {
            let mut tmp = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("tick 1") {
                let n = c.read(&mut tmp).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&tmp[..n]);
            }
        })
        .await;
        drop(c);
        let dropped = Instant::now();
        let lat = cancel_latency(&bad, "/sse-forever", 0, dropped).await;
        report.push(("h1 mid-SSE", lat));

        // h1, mid-upload: 16 bytes every 50 ms of a 100,000-byte body, then gone.
        let mut c = connect(&tls, kg.proxy, b"http/1.1").await;
        let req = format!(
            "POST /bad/upload HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\
             content-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n",
            kg.key
        );
        c.write_all(req.as_bytes()).await.unwrap();
        for _ in 0..8 {
            c.write_all(&[b'u'; 16]).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(wait_until(T5, || bad.seen("/upload") == 1).await);
        assert!(
            wait_until(T5, || bad.log.lock().unwrap().upload_bytes > 0).await,
            "the upload was not streamed to the upstream"
        );
        drop(c);
        let dropped = Instant::now();
        let lat = cancel_latency(&bad, "/upload", 0, dropped).await;
        report.push(("h1 mid-upload", lat));
        let uploaded = bad.log.lock().unwrap().upload_bytes;

        for (what, lat) in &report {
            eprintln!("R4: {what}: upstream saw the end {lat:?} after the client left");
        }
        eprintln!("R4: upstream received {uploaded} of the 128 uploaded bytes");
        for (what, lat) in &report {
            assert!(*lat < limit, "R4 {what}: upstream cancelled after {lat:?}");
        }
        assert!(uploaded <= 128);
        kg.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// fd and task leaks
// ---------------------------------------------------------------------------------------------

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits up to 2 s for the fd count to come down to `limit`; returns the last count.
async fn settle_fds(limit: usize) -> usize {
    let mut n = open_fds();
    let end = Instant::now() + Duration::from_secs(2);
    while n > limit && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        n = open_fds();
    }
    n
}

#[test]
fn no_fd_or_task_leak_after_200_mixed_requests_and_stop() {
    run(async {
        let ca = TestCa::new();
        let fds_start = open_fds();
        let tasks_start = alive_tasks();
        let bad = BadUpstream::start(&ca).await;
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(
            &ca,
            &[("/v1", &up.url(), "K"), ("/bad", &bad.url(), "K")],
            NO_LIMITS,
        )
        .await;
        let tls = connector(&ca, b"http/1.1");
        // Warm up every kind once (pools, caches), then take the baseline.
        {
            let client = ca.client(false);
            let (s, _, _) = status_of(&client, keyed("GET", &kg.url("/v1/x"), &kg.key, b"")).await;
            assert_eq!(s, StatusCode::CREATED);
            let (s, _, _) =
                status_of(&client, keyed("GET", &kg.url("/bad/ok"), &kg.key, b"")).await;
            assert_eq!(s, StatusCode::OK);
        }
        // The warm-up client is gone: keygate has closed its side of that connection.
        assert!(
            wait_until(T5, || kg.proxy_connections() == 0).await,
            "the warm-up connection is still open"
        );
        let fds_base = open_fds();
        let tasks_base = alive_tasks();

        let mut counts = [0usize; 5];
        for round in 0..4 {
            let h2 = round % 2 == 1;
            let client = ca.client(h2);
            for i in 0..10 {
                let cases = [
                    (keyed("GET", &kg.url("/v1/x"), &kg.key, b""), 201),
                    (
                        keyed("GET", &kg.url("/v1/x"), "kg-wrong-key-000000000000", b""),
                        401,
                    ),
                    (keyed("GET", &kg.url("/nope"), &kg.key, b""), 404),
                    (
                        keyed("GET", &kg.url("/bad/close-before-headers"), &kg.key, b""),
                        502,
                    ),
                ];
                for (k, (req, want)) in cases.into_iter().enumerate() {
                    let (s, _, _) = status_of(&client, req).await;
                    assert_eq!(s.as_u16(), want, "round {round} #{i}");
                    counts[k] += 1;
                }
            }
            // Ten clients that leave while waiting for the upstream.
            let before = bad.seen("/hold");
            let mut conns = Vec::new();
            for _ in 0..10 {
                let mut c = connect(&tls, kg.proxy, b"http/1.1").await;
                let req = format!(
                    "GET /bad/hold HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
                    kg.key
                );
                c.write_all(req.as_bytes()).await.unwrap();
                conns.push(c);
            }
            let all_seen = wait_until(T5, || bad.seen("/hold") == before + 10).await;
            if !all_seen {
                let mut answers = Vec::new();
                for c in &mut conns {
                    let mut tmp = [0u8; 512];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(200), c.read(&mut tmp)).await
                    {
                        answers.push(
                            String::from_utf8_lossy(&tmp[..n])
                                .lines()
                                .next()
                                .map(str::to_owned),
                        );
                    }
                }
                panic!(
                    "round {round}: {} of 10 waiting requests reached the upstream; answers: {answers:?}",
                    bad.seen("/hold") - before
                );
            }
            drop(conns);
            counts[4] += 10;
        }
        assert_eq!(counts.iter().sum::<usize>(), 200);
        assert!(
            wait_until(T5, || bad.ended("/hold").len() == 40).await,
            "dropped clients' upstream requests were not all cancelled"
        );
        let fds_after = settle_fds(fds_base + 10).await;
        // Waits up to 2 s for the task count to come down (as after the stop, below).
        wait_until(Duration::from_secs(2), || alive_tasks() <= tasks_base + 10).await;
        let tasks_after = alive_tasks();
        eprintln!(
            "leaks: fds start {fds_start}, baseline {fds_base}, after 200 requests {fds_after}; \
             tasks start {tasks_start}, baseline {tasks_base}, after {tasks_after}"
        );
        assert!(
            fds_after <= fds_base + 10,
            "fds {fds_base} -> {fds_after} after 200 requests"
        );
        assert!(
            tasks_after <= tasks_base + 10,
            "tasks {tasks_base} -> {tasks_after} after 200 requests"
        );

        kg.stop().await;
        drop(up);
        drop(bad);
        let fds_end = settle_fds(fds_start + 10).await;
        let end = Instant::now() + Duration::from_secs(2);
        while alive_tasks() > tasks_start + 10 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let tasks_end = alive_tasks();
        eprintln!("leaks: after stop: fds {fds_end} (start {fds_start}), tasks {tasks_end} (start {tasks_start})");
        assert!(
            fds_end <= fds_start + 10,
            "fds {fds_start} -> {fds_end} after stop"
        );
        assert!(
            tasks_end <= tasks_start + 10,
            "tasks {tasks_start} -> {tasks_end} after stop"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// R8: slowloris and slow POST
// ---------------------------------------------------------------------------------------------

#[test]
fn r8_slowloris_connections_are_closed_after_the_header_timeout_and_others_carry_on() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(
            &ca,
            &[("/", &up.url(), "K")],
            &format!("[server]\nheader_read_timeout = \"1s\"\n{NO_LIMITS}"),
        )
        .await;
        let tls = connector(&ca, b"http/1.1");
        let head = format!(
            "GET /loris HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\nx-pad: {}\r\n\r\n",
            kg.key,
            "p".repeat(64)
        );
        let mut attackers = JoinSet::new();
        let connected = Arc::new(AtomicUsize::new(0));
        for _ in 0..50 {
            let (tls, head, addr) = (tls.clone(), head.clone(), kg.proxy);
            let connected = connected.clone();
            attackers.spawn(async move {
                let c = connect(&tls, addr, b"http/1.1").await;
                let t0 = Instant::now();
                connected.fetch_add(1, Ordering::SeqCst);
                let (mut r, mut w) = tokio::io::split(c);
                let writer = tokio::spawn(async move {
                    // Three bytes every 500 ms: 6 bytes/s, never a whole head within 5 s.
                    for part in head.as_bytes().chunks(3).take(10) {
                        if w.write_all(part).await.is_err() || w.flush().await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
                let mut got = Vec::new();
                let closed = tokio::time::timeout(Duration::from_secs(6), async {
                    let mut tmp = [0u8; 1024];
                    loop {
                        match r.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&tmp[..n]),
                        }
                    }
                })
                .await;
                writer.abort();
                (closed.ok().map(|_| t0.elapsed()), got)
            });
        }
        // Normal traffic during the attack: once all 50 slowloris connections are up.
        assert!(
            wait_until(T5, || connected.load(Ordering::SeqCst) == 50).await,
            "the 50 slowloris connections did not all connect"
        );
        let client = ca.client(false);
        for i in 0..5 {
            let (s, _, took) =
                status_of(&client, keyed("GET", &kg.url("/normal"), &kg.key, b"")).await;
            assert_eq!(
                s,
                StatusCode::CREATED,
                "normal request {i} during the attack"
            );
            assert!(
                took < Duration::from_secs(1),
                "normal request {i} took {took:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut times = Vec::new();
        while let Some(r) = attackers.join_next().await {
            let (closed, got) = r.unwrap();
            let t = closed.expect("a slowloris connection was still open after 6 s");
            times.push((
                t,
                String::from_utf8_lossy(&got)
                    .lines()
                    .next()
                    .map(str::to_owned),
            ));
        }
        times.sort_by_key(|(t, _)| *t);
        eprintln!(
            "R8: 50 slowloris connections closed after {:?} .. {:?}; first answer line: {:?}",
            times[0].0, times[49].0, times[0].1
        );
        for (t, _) in &times {
            assert!(
                *t >= Duration::from_millis(800) && *t <= Duration::from_secs(3),
                "slowloris connection closed after {t:?}"
            );
        }
        let paths: Vec<String> = up.recorded().iter().map(|r| r.uri.path().into()).collect();
        assert_eq!(
            paths,
            vec!["/normal"; 5],
            "only the normal requests reach the upstream"
        );
        kg.stop().await;
    });
}

#[test]
fn r8_slow_post_body_that_keeps_flowing_is_not_cut_by_the_header_timeout() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(
            &ca,
            &[("/", &up.url(), "K")],
            &format!("[server]\nheader_read_timeout = \"1s\"\n{NO_LIMITS}"),
        )
        .await;
        let tls = connector(&ca, b"http/1.1");
        let mut c = connect(&tls, kg.proxy, b"http/1.1").await;
        let head = format!(
            "POST /sink HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\ncontent-length: 16\r\n\r\n",
            kg.key
        );
        let t = Instant::now();
        c.write_all(head.as_bytes()).await.unwrap();
        // One byte every 150 ms: 2.4 s of body, well past the 1 s header timeout.
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            c.write_all(b"s")
                .await
                .expect("keygate still reading the body");
            c.flush().await.unwrap();
        }
        let mut got = Vec::new();
        within("the answer to a slow POST", T5, async {
            let mut tmp = [0u8; 2048];
            while !String::from_utf8_lossy(&got).contains("{\"bytes\":") {
                let n = c.read(&mut tmp).await.unwrap_or(0);
                assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&tmp[..n]);
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got).to_string();
        eprintln!(
            "R8: slow POST (16 bytes over 2.4 s) answered after {:?}: {:?}",
            t.elapsed(),
            text.lines().next()
        );
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("{\"bytes\":16}"), "{text}");
        assert_eq!(up.recorded().len(), 1);
        kg.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// R7: HTTP/2 abuse, frames by hand
// ---------------------------------------------------------------------------------------------

#[test]
fn r7_h2_max_concurrent_streams_is_100_and_streams_beyond_are_refused() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
        let mut h = H2::open(&ca, kg.proxy).await;
        let mcs = h
            .server_settings
            .iter()
            .find(|(id, _)| *id == 0x3)
            .map(|(_, v)| *v);
        eprintln!("R7: keygate's SETTINGS: {:?}", h.server_settings);
        assert_eq!(mcs, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");

        // 110 streams that each wait 2 s upstream.
        let block = request_block("/slow?ms=2000", &kg.key);
        let frames: Vec<Vec<u8>> = (0..110u32)
            .map(|i| {
                frame(
                    T_HEADERS,
                    END_HEADERS | DATA_OR_END_STREAM,
                    1 + 2 * i,
                    &block,
                )
            })
            .collect();
        let writer = h.send_in_background(vec![frames.concat()]);
        let deadline = Instant::now() + Duration::from_millis(1500);
        let (mut refused, mut goaway) = (0, None);
        while let Some((ty, _, _, p)) = h.next(deadline).await {
            if ty == T_RST && p.len() == 4 && u32::from_be_bytes([p[0], p[1], p[2], p[3]]) == 7 {
                refused += 1;
            }
            if ty == T_GOAWAY {
                goaway = Some(p);
            }
        }
        let reached = up.recorded().len();
        eprintln!(
            "R7: 110 concurrent streams: {refused} refused (REFUSED_STREAM), {reached} reached the upstream, goaway {goaway:?}"
        );
        writer.abort();
        assert!(refused >= 10, "only {refused} of 110 streams refused");
        assert!(reached <= 100, "{reached} streams reached the upstream");
        kg.stop().await;
    });
}

#[test]
fn r7_h2_rapid_reset_gets_goaway_and_few_requests_reach_the_upstream() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
        let mut h = H2::open(&ca, kg.proxy).await;
        let block = request_block("/rapid", &kg.key);
        let mut chunks = Vec::new();
        for batch in 0..10u32 {
            let mut b = Vec::new();
            for i in 0..100u32 {
                let sid = 1 + 2 * (batch * 100 + i);
                b.extend(frame(
                    T_HEADERS,
                    END_HEADERS | DATA_OR_END_STREAM,
                    sid,
                    &block,
                ));
                b.extend(frame(T_RST, 0, sid, &8u32.to_be_bytes()));
            }
            chunks.push(b);
        }
        let t = Instant::now();
        let writer = h.send_in_background(chunks);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut goaway = None;
        let closed;
        loop {
            match h.next(deadline).await {
                None => {
                    closed = Instant::now() < deadline;
                    break;
                }
                Some((T_GOAWAY, _, _, p)) => {
                    goaway = Some((t.elapsed(), p));
                }
                Some(_) => {}
            }
        }
        let (sent, _) = writer.await.unwrap_or((0, false));
        // Kept: a window for late arrivals upstream; no signal says none is coming.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reached = up.recorded().len();
        let code = goaway
            .as_ref()
            .filter(|(_, p)| p.len() >= 8)
            .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        eprintln!(
            "R7 rapid reset: wrote {sent} bytes of 1000 HEADERS+RST pairs; GOAWAY after {:?} with code {code:?}; closed {closed}; {reached} requests reached the upstream",
            goaway.as_ref().map(|(t, _)| *t)
        );
        assert!(
            goaway.is_some() || closed,
            "no GOAWAY and the connection stayed open"
        );
        assert!(
            reached < 100,
            "{reached} of 1000 reset streams reached the upstream"
        );
        kg.stop().await;
    });
}

#[test]
fn r7_h2_continuation_flood_is_ended_with_goaway() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
        let rss_before = proc_status_kib(std::process::id(), "VmRSS:");
        let mut h = H2::open(&ca, kg.proxy).await;
        // One header whose value is 4 MiB long, sent as HEADERS without END_HEADERS and then
        // 256 CONTINUATION frames of 16 KiB, none with END_HEADERS.
        let mut block = request_block("/flood", &kg.key);
        block.push(0x00);
        hpack_int(&mut block, 7, "x-flood".len());
        block.extend_from_slice(b"x-flood");
        hpack_int(&mut block, 7, 4 << 20);
        let mut chunks = vec![frame(T_HEADERS, DATA_OR_END_STREAM, 1, &block)];
        let filler = vec![b'f'; 16384];
        for _ in 0..256 {
            chunks.push(frame(T_CONTINUATION, 0, 1, &filler));
        }
        let t = Instant::now();
        let writer = h.send_in_background(chunks);
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut goaway = None;
        let mut closed = None;
        let mut other = Vec::new();
        loop {
            match h.next(deadline).await {
                None => {
                    if Instant::now() < deadline {
                        closed = Some(t.elapsed());
                    }
                    break;
                }
                Some((T_GOAWAY, _, _, p)) => goaway = Some((t.elapsed(), p)),
                Some((ty, _, sid, _)) => other.push((ty, sid)),
            }
        }
        writer.abort();
        let rss_after = proc_status_kib(std::process::id(), "VmRSS:");
        let code = goaway
            .as_ref()
            .filter(|(_, p)| p.len() >= 8)
            .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        eprintln!(
            "R7 CONTINUATION flood: GOAWAY after {:?} code {code:?}; closed after {closed:?}; other frames {other:?}; RSS {rss_before} -> {rss_after} KiB",
            goaway.as_ref().map(|(t, _)| *t)
        );
        assert!(
            goaway.is_some() || closed.is_some(),
            "a 4 MiB header block in CONTINUATION frames neither got a GOAWAY nor closed the connection"
        );
        assert!(
            up.recorded().is_empty(),
            "the flooded request reached the upstream"
        );
        assert!(
            rss_after < rss_before + 64 * 1024,
            "RSS grew {rss_before} -> {rss_after} KiB"
        );
        kg.stop().await;
    });
}
