//! Reliability battery, second part (reliability.md R2, R7, R8, R11):
//!
//! - R7: SETTINGS and PING floods from a client that does not read the acknowledgements;
//! - R7/R8: a zero-window HTTP/2 client and an HTTP/1.1 client that never reads, in front of an
//!   upstream that would send 512 MiB: the backpressure must reach the upstream;
//! - R2: the upstream dies in the middle of a slow upload;
//! - R11: SIGTERM with an HTTP/2 stream in flight (GOAWAY, the stream finishes, exit 0).
//!
//! keygate runs as a child process where its memory is measured (`/proc/<pid>/status` of the
//! child, not of this test process). Every test takes one process-wide lock and runs on its own
//! runtime, so the tests of this file run one at a time: the memory figures and timings need a
//! quiet process. All traffic is on 127.0.0.1; every loop is bounded in count and time.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::h2raw::*;
use support::harness::*;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` alone (no other test of this file at the same time) on a fresh runtime.
fn run<F: Future<Output = ()>>(f: F) {
    run_serial(&SERIAL, f);
}

const MIB: u64 = 1024 * 1024;

type TestClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    TestBody,
>;

/// A keyed GET; answers (status, body) within 5 s each, or panics saying what was late.
async fn keyed_get(client: &TestClient, url: &str, key: &str) -> (StatusCode, Bytes) {
    let res = within(
        "response headers",
        T5,
        client.request(get(url, &[("x-api-key", key)])),
    )
    .await
    .expect("request");
    let status = res.status();
    let body = within("the response body", T5, res.into_body().collect())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------------
// keygate as a child process
// ---------------------------------------------------------------------------------------------

/// keygate run by its binary, with the test CA's certificate, its store in a temp dir, the
/// secret `K` stored by `keygate secrets put`, and the first admin key (from stdout) as the
/// client's key. The key is never printed.
struct Child {
    kg: KeygateProcess,
    key: String,
    _dir: tempfile::TempDir,
}

impl Child {
    async fn start(ca: &TestCa, routes: &[(&str, &str)], extra: &str) -> Child {
        let dir = tempfile::tempdir().unwrap();
        let routes: Vec<(&str, &str, &str)> = routes.iter().map(|(p, u)| (*p, *u, "K")).collect();
        let text = config_text(ca, dir.path(), &routes, extra);
        let cfg = dir.path().join("keygate.toml");
        std::fs::write(&cfg, text).unwrap();
        let cfg = cfg.to_str().unwrap().to_owned();
        let secret = format!("{UPSTREAM_SECRET}\n");
        let (code, _, err) = cli(
            dir.path(),
            &["--config", &cfg, "secrets", "put", "K"],
            secret.as_bytes(),
            &[],
        )
        .await;
        assert_eq!(code, Some(0), "keygate secrets put: {err}");
        let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
        let key = kg
            .stdout_lines
            .first()
            .cloned()
            .expect("the first admin key on stdout");
        Child { kg, key, _dir: dir }
    }

    fn rss_kib(&self) -> u64 {
        self.kg.rss_kib()
    }

    fn hwm_kib(&self) -> u64 {
        proc_status_kib(self.kg.pid(), "VmHWM:")
    }

    /// User + system CPU time of the process, in clock ticks (USER_HZ, 100 on Linux).
    fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.kg.pid())).unwrap_or_default();
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        f.iter().sum()
    }
}

// ---------------------------------------------------------------------------------------------
// R7: SETTINGS and PING floods
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    Settings,
    Ping,
}

/// What one flood did.
struct FloodOutcome {
    kind: Flood,
    frames: usize,
    /// Frames written while the client read nothing (the first 2 s).
    written_unread: usize,
    /// Frames written in the end, and whether the writer saw an error.
    written: usize,
    write_error: bool,
    acks: usize,
    /// (last stream id, error code) of each GOAWAY.
    goaways: Vec<(u32, u32)>,
    closed: bool,
    /// From the first frame to the last ACK (or the end of the connection).
    took: Duration,
    /// Whether a request on the flooded connection was answered afterwards.
    after: Option<bool>,
}

/// 20,000 SETTINGS or PINGs (and 200,000) fit in the socket buffers here without anything
/// backing up; at 600,000 the PING flood stalls the client's writes (measured: 424,500 and
/// 429,500 written before the client read), so keygate really runs with a peer that does not
/// read.
const FLOOD_FRAMES: usize = 600_000;
const FLOOD_BATCH: usize = 500;

/// Floods one HTTP/2 connection with SETTINGS or PING frames; for the first 2 s the client
/// reads nothing (with a small socket receive buffer, 8 KiB asked, so the acknowledgements back
/// up on keygate's side), then it reads everything. Normal requests on other connections
/// meanwhile must be answered.
async fn flood(
    ca: &TestCa,
    kg: &Child,
    up: &FakeUpstream,
    kind: Flood,
    clients: &[(&str, TestClient)],
) -> FloodOutcome {
    let mut h = H2::open_with(ca, kg.kg.proxy, &[], Some(8 * 1024)).await;
    // The handshake's own SETTINGS ACK may still be on its way: read it first when it is.
    let mut pre = Vec::new();
    let until = Instant::now() + Duration::from_millis(200);
    while let Some(f) = h.next(until).await {
        pre.push((f.0, f.1));
    }
    // Each SETTINGS frame is a real change the server must apply (the initial stream window
    // 65,535 and 65,536 alternately), on a connection without streams; each PING is distinct.
    let one = |i: usize| match kind {
        Flood::Settings => frame(
            T_SETTINGS,
            0,
            0,
            &settings_payload(&[(S_INITIAL_WINDOW_SIZE, 65_535 + (i % 2) as u32)]),
        ),
        Flood::Ping => frame(T_PING, 0, 0, &(i as u64).to_be_bytes()),
    };
    let batches: Vec<Vec<u8>> = (0..FLOOD_FRAMES / FLOOD_BATCH)
        .map(|b| {
            (b * FLOOD_BATCH..(b + 1) * FLOOD_BATCH)
                .flat_map(one)
                .collect()
        })
        .collect();
    let written = Arc::new(AtomicUsize::new(0));
    let mut w = h.w.take().expect("the write half");
    let t = Instant::now();
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            for b in batches {
                match tokio::time::timeout(Duration::from_secs(20), w.write_all(&b)).await {
                    Ok(Ok(())) => {
                        written.fetch_add(FLOOD_BATCH, Ordering::SeqCst);
                    }
                    _ => return (true, w),
                }
            }
            let failed = w.flush().await.is_err();
            (failed, w)
        })
    };

    // 2 s without reading; normal requests on other connections meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, client) in clients {
        let (s, _) = keyed_get(client, &kg.kg.url(&format!("/during-{kind:?}")), &kg.key).await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{kind:?} flood: a {name} request on another connection during the flood"
        );
    }
    tokio::time::sleep_until((t + Duration::from_secs(2)).into()).await;
    let written_unread = written.load(Ordering::SeqCst);

    // Now read everything: count the acknowledgements, note any GOAWAY and the end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut acks, mut goaways, mut closed) = (0usize, Vec::new(), false);
    let want_type = if kind == Flood::Settings {
        T_SETTINGS
    } else {
        T_PING
    };
    let handshake_ack_pending = kind == Flood::Settings
        && !pre
            .iter()
            .any(|(ty, fl)| *ty == T_SETTINGS && fl & ACK != 0);
    let target = FLOOD_FRAMES + usize::from(handshake_ack_pending);
    while acks < target {
        match h.next_or_end(deadline).await {
            Ok((ty, flags, _, p)) => {
                if ty == want_type && flags & ACK != 0 {
                    acks += 1;
                } else if ty == T_GOAWAY {
                    goaways.push(goaway_parts(&p).unwrap_or((u32::MAX, u32::MAX)));
                }
            }
            Err(ended) => {
                closed = ended;
                break;
            }
        }
    }
    let took = t.elapsed();
    let acks = acks.min(FLOOD_FRAMES);
    let (write_error, w) = within("the flood writer to finish", T5, writer)
        .await
        .expect("writer task");
    h.w = Some(w);

    // If the connection is still open: one request on it must still be answered.
    let after = if closed || !goaways.is_empty() {
        None
    } else {
        let path = format!("/after-{kind:?}");
        let block = request_block(&path, &kg.key);
        let ok = h
            .send(&frame(
                T_HEADERS,
                END_HEADERS | DATA_OR_END_STREAM,
                1,
                &block,
            ))
            .await;
        let deadline = Instant::now() + T5;
        let mut answered = false;
        while ok && !answered {
            match h.next(deadline).await {
                Some((T_HEADERS, _, 1, _)) => answered = true,
                Some(_) => {}
                None => break,
            }
        }
        Some(answered && up.recorded().iter().any(|r| r.uri.path() == path))
    };
    FloodOutcome {
        kind,
        frames: FLOOD_FRAMES,
        written_unread,
        written: written.load(Ordering::SeqCst),
        write_error,
        acks,
        goaways,
        closed,
        took,
        after,
    }
}

#[test]
fn r7_settings_and_ping_floods_are_absorbed_with_bounded_memory_and_others_are_served() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Child::start(&ca, &[("/", &up.url())], NO_LIMITS).await;
        let clients = [("h1", ca.client(false)), ("h2", ca.client(true))];
        for (name, client) in &clients {
            let (s, _) = keyed_get(client, &kg.kg.url("/warm"), &kg.key).await;
            assert_eq!(s, StatusCode::CREATED, "{name} warm-up");
        }
        let rss0 = kg.rss_kib();
        let cpu0 = kg.cpu_ticks();
        let mut outcomes = Vec::new();
        for kind in [Flood::Settings, Flood::Ping] {
            let cpu = kg.cpu_ticks();
            let o = flood(&ca, &kg, &up, kind, &clients).await;
            eprintln!(
                "R7 {kind:?} flood: {} of {} frames written while the client read nothing for 2 s, \
                 {} in all (write error: {}); {} ACKs; GOAWAYs (last stream id, code) {:?}; \
                 closed {}; all ACKs read {:?} after the first frame; a request on the flooded \
                 connection afterwards answered: {:?}; keygate CPU {} ticks, RSS {} KiB \
                 (start {rss0}), VmHWM {} KiB",
                o.written_unread,
                o.frames,
                o.written,
                o.write_error,
                o.acks,
                o.goaways,
                o.closed,
                o.took,
                o.after,
                kg.cpu_ticks() - cpu,
                kg.rss_kib(),
                kg.hwm_kib()
            );
            outcomes.push(o);
        }
        // After both floods: normal traffic still served.
        for (name, client) in &clients {
            let (s, _) = keyed_get(client, &kg.kg.url("/after-floods"), &kg.key).await;
            assert_eq!(s, StatusCode::CREATED, "{name} request after the floods");
        }
        let rss1 = kg.rss_kib();
        let hwm = kg.hwm_kib();
        eprintln!(
            "R7 floods: keygate RSS {rss0} -> {rss1} KiB, peak (VmHWM) {hwm} KiB, CPU {} ticks in all",
            kg.cpu_ticks() - cpu0
        );

        // What was observed: keygate keeps up, with no GOAWAY. It reads the next frame only
        // once the previous acknowledgement is queued for writing (h2 holds one pending
        // SETTINGS ACK and one pending PONG at most), so a client that does not read ends up
        // stalling its own writes (the PING flood did, after ~425,000 frames; the SETTINGS flood
        // fit in keygate's socket receive buffer) instead of growing keygate's memory. Every
        // frame is acknowledged once the client reads, and the connection is still usable.
        for o in &outcomes {
            assert!(
                o.goaways.is_empty(),
                "{:?} flood: GOAWAY {:?}",
                o.kind,
                o.goaways
            );
            assert!(!o.closed, "{:?} flood: connection closed", o.kind);
            assert!(!o.write_error, "{:?} flood: writes failed", o.kind);
            assert_eq!(o.written, o.frames, "{:?} flood: frames written", o.kind);
            assert_eq!(o.acks, o.frames, "{:?} flood: acknowledgements", o.kind);
            assert_eq!(
                o.after,
                Some(true),
                "{:?} flood: a request on the flooded connection afterwards",
                o.kind
            );
        }
        assert!(
            hwm < rss0 + 64 * 1024,
            "keygate's peak RSS {hwm} KiB against {rss0} KiB before the floods"
        );
        // The floods themselves never reach the upstream: only the normal requests do.
        let mut paths: Vec<String> = up.recorded().iter().map(|r| r.uri.path().into()).collect();
        paths.sort();
        let mut want = vec![
            "/after-Ping",
            "/after-Settings",
            "/after-floods",
            "/after-floods",
            "/during-Ping",
            "/during-Ping",
            "/during-Settings",
            "/during-Settings",
            "/warm",
            "/warm",
        ];
        want.sort();
        assert_eq!(paths, want, "what the upstream received");
        let (code, _) = kg.kg.terminate().await;
        assert_eq!(code, Some(0), "keygate's exit after the floods");
    });
}

// ---------------------------------------------------------------------------------------------
// R7 zero window / R8 slow read: backpressure reaches the upstream
// ---------------------------------------------------------------------------------------------

/// A socket that counts the bytes the kernel accepted from it.
struct CountingIo {
    inner: TcpStream,
    written: Arc<AtomicU64>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            me.written.fetch_add(*n as u64, Ordering::SeqCst);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

const BIG_TOTAL: u64 = 512 * MIB;
const BIG_CHUNK: usize = 64 * 1024;
static CHUNK: [u8; BIG_CHUNK] = [b'z'; BIG_CHUNK];

/// An upstream whose `…/big` answers 512 MiB, made lazily 64 KiB at a time, and which counts
/// what it managed to send.
struct BigUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Body bytes handed to its HTTP stack.
    body_bytes: Arc<AtomicU64>,
    /// Bytes the kernel accepted on its sockets (TLS included).
    tcp_bytes: Arc<AtomicU64>,
    /// When each response body was dropped, and whether it had been sent whole.
    ended: Arc<Mutex<Vec<(Instant, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BigUpstream {
    fn drop(&mut self) {
        // The connection tasks live in a JoinSet owned by this task: aborting it ends them.
        self.task.abort();
    }
}

/// The producer of one big body; records its end when dropped.
struct Producer {
    left: u64,
    counted: Arc<AtomicU64>,
    ended: Arc<Mutex<Vec<(Instant, bool)>>>,
}

impl Drop for Producer {
    fn drop(&mut self) {
        if let Ok(mut e) = self.ended.lock() {
            e.push((Instant::now(), self.left == 0));
        }
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl BigUpstream {
    async fn start(ca: &TestCa, offer_h2: bool) -> Self {
        let (cert, key) = ca.issue(if offer_h2 { "big-h2" } else { "big-h1" });
        let cfg = keygate::tls::server_config(&cert, &key).expect("upstream TLS");
        let mut cfg = Arc::try_unwrap(cfg).unwrap_or_else(|a| (*a).clone());
        cfg.alpn_protocols = if offer_h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let body_bytes = Arc::new(AtomicU64::new(0));
        let tcp_bytes = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (rq, bb, tb, en) = (
            requests.clone(),
            body_bytes.clone(),
            tcp_bytes.clone(),
            ended.clone(),
        );
        let task = tokio::spawn(async move {
            let mut set = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((tcp, _)) = r else { return };
                        let _ = tcp.set_nodelay(true);
                        let io = CountingIo { inner: tcp, written: tb.clone() };
                        let (acceptor, rq, bb, en) =
                            (acceptor.clone(), rq.clone(), bb.clone(), en.clone());
                        set.spawn(async move {
                            let Ok(tls) = acceptor.accept(io).await else { return };
                            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                                let (rq, bb, en) = (rq.clone(), bb.clone(), en.clone());
                                async move { Ok::<_, Infallible>(big_answer(&req, &rq, bb, en)) }
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                    Some(_) = set.join_next(), if !set.is_empty() => {}
                }
            }
        });
        BigUpstream {
            addr,
            requests,
            body_bytes,
            tcp_bytes,
            ended,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn ended(&self) -> Vec<(Instant, bool)> {
        self.ended.lock().unwrap().clone()
    }
}

fn big_answer(
    req: &Request<hyper::body::Incoming>,
    requests: &AtomicUsize,
    counted: Arc<AtomicU64>,
    ended: Arc<Mutex<Vec<(Instant, bool)>>>,
) -> Response<UpBody> {
    if !req.uri().path().ends_with("/big") {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let producer = Producer {
        left: BIG_TOTAL,
        counted,
        ended,
    };
    let stream = futures_util::stream::unfold(producer, |mut p| async move {
        if p.left == 0 {
            return None;
        }
        let n = p.left.min(BIG_CHUNK as u64) as usize;
        p.left -= n as u64;
        p.counted.fetch_add(n as u64, Ordering::SeqCst);
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&CHUNK[..n]))),
            p,
        ))
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", BIG_TOTAL.to_string())
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// The stalled client's connection, kept open until it goes away.
enum Stalled {
    H2(Box<H2>),
    H1(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A client that stalls a big download.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stall {
    /// HTTP/2 with SETTINGS_INITIAL_WINDOW_SIZE = 0 and never a WINDOW_UPDATE.
    H2ZeroWindow,
    /// HTTP/1.1 that sends its request and never reads.
    H1NoRead,
}

/// One stalled download: what the upstream sent while it was stalled, keygate's RSS growth,
/// and how long after the client left the upstream saw the end.
struct StallFigures {
    upstream: &'static str,
    stall: Stall,
    client_saw: String,
    body_bytes_3s: u64,
    body_bytes_4s: u64,
    tcp_bytes_4s: u64,
    rss_growth_kib: i64,
    cancel_after: Duration,
}

async fn stalled_download(
    ca: &TestCa,
    kg: &Child,
    up: &BigUpstream,
    upstream: &'static str,
    stall: Stall,
) -> StallFigures {
    let path = format!("/{upstream}/big");
    let requests0 = up.requests.load(Ordering::SeqCst);
    let ended0 = up.ended().len();
    let body0 = up.body_bytes.load(Ordering::SeqCst);
    let tcp0 = up.tcp_bytes.load(Ordering::SeqCst);
    let rss0 = kg.rss_kib() as i64;

    // The client asks, then stalls for 4 s; the upstream's counter is sampled at 3 s and 4 s.
    let t = Instant::now();
    let sample_3s = {
        let counted = up.body_bytes.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until((t + Duration::from_secs(3)).into()).await;
            counted.load(Ordering::SeqCst)
        })
    };
    let (mut client_saw, conn) = match stall {
        Stall::H2ZeroWindow => {
            let mut h = H2::open_with(ca, kg.kg.proxy, &[(S_INITIAL_WINDOW_SIZE, 0)], None).await;
            let block = request_block(&path, &kg.key);
            let sent = h
                .send(&frame(
                    T_HEADERS,
                    END_HEADERS | DATA_OR_END_STREAM,
                    1,
                    &block,
                ))
                .await;
            assert!(sent, "{upstream}/{stall:?}: sending the request");
            // Read for 4 s: the response headers may come (they are not flow-controlled),
            // DATA may not (the stream window is 0).
            let deadline = t + Duration::from_secs(4);
            let (mut status, mut data, mut other) = (None, 0usize, Vec::new());
            while let Some((ty, flags, sid, p)) = h.next(deadline).await {
                match (ty, sid) {
                    (T_HEADERS, 1) => status = indexed_status(&p),
                    (T_DATA, 1) => data += p.len(),
                    _ => other.push((ty, flags, sid)),
                }
            }
            assert_eq!(status, Some(200), "{upstream}/{stall:?}: response headers");
            assert_eq!(
                data, 0,
                "{upstream}/{stall:?}: DATA sent into a zero window"
            );
            (
                format!("status {status:?}, {data} DATA bytes, other frames {other:?}"),
                Stalled::H2(Box::new(h)),
            )
        }
        Stall::H1NoRead => {
            let mut c = connect(&connector(ca, b"http/1.1"), kg.kg.proxy, b"http/1.1").await;
            let head = format!(
                "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
                kg.key
            );
            c.write_all(head.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep_until((t + Duration::from_secs(4)).into()).await;
            (String::new(), Stalled::H1(Box::new(c)))
        }
    };
    let body_3s = sample_3s.await.unwrap() - body0;
    let body_4s = up.body_bytes.load(Ordering::SeqCst) - body0;
    let tcp_4s = up.tcp_bytes.load(Ordering::SeqCst) - tcp0;
    let rss_growth = kg.rss_kib() as i64 - rss0;
    assert_eq!(
        up.requests.load(Ordering::SeqCst) - requests0,
        1,
        "{upstream}/{stall:?}: requests at the upstream"
    );
    assert!(
        up.ended().len() == ended0,
        "{upstream}/{stall:?}: the upstream response ended while the client was only slow"
    );

    // What the HTTP/1.1 client had been sent: the head of a 200, at least. Then the client
    // goes away (for HTTP/1.1 with response bytes still unread).
    match conn {
        Stalled::H2(h) => drop(h),
        Stalled::H1(mut c) => {
            let mut got = Vec::new();
            let mut tmp = [0u8; 4096];
            let _ = tokio::time::timeout(T5, async {
                while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 64 * 1024 {
                    match c.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&tmp[..n]),
                    }
                }
            })
            .await;
            let head = String::from_utf8_lossy(&got);
            let status_line = head.lines().next().unwrap_or("").to_owned();
            assert_eq!(
                status_line, "HTTP/1.1 200 OK",
                "{upstream}/{stall:?}: what the client had been sent"
            );
            client_saw = format!("{status_line:?} (read only after the 4 s)");
            drop(c);
        }
    }
    let left = Instant::now();
    assert!(
        wait_until(T5, || up.ended().len() > ended0).await,
        "{upstream}/{stall:?}: the upstream response was not cancelled within 5 s of the client leaving"
    );
    let (at, complete) = up.ended()[ended0];
    assert!(!complete, "{upstream}/{stall:?}: 512 MiB sent whole");
    // Nothing more is made once it is cancelled (kept: an absence is watched over a window).
    let body_end = up.body_bytes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.body_bytes.load(Ordering::SeqCst),
        body_end,
        "{upstream}/{stall:?}: the upstream kept sending after the cancel"
    );
    StallFigures {
        upstream,
        stall,
        client_saw,
        body_bytes_3s: body_3s,
        body_bytes_4s: body_4s,
        tcp_bytes_4s: tcp_4s,
        rss_growth_kib: rss_growth,
        cancel_after: at.saturating_duration_since(left),
    }
}

#[test]
fn r7_r8_zero_window_and_slow_read_push_back_to_the_upstream_and_leaving_cancels_it() {
    run(async {
        let ca = TestCa::new();
        let up_h1 = BigUpstream::start(&ca, false).await;
        let up_h2 = BigUpstream::start(&ca, true).await;
        let kg = Child::start(
            &ca,
            &[("/h1", &up_h1.url()), ("/h2", &up_h2.url())],
            NO_LIMITS,
        )
        .await;
        let rss_start = kg.rss_kib();
        let mut figures = Vec::new();
        for (name, up) in [("h1", &up_h1), ("h2", &up_h2)] {
            for stall in [Stall::H2ZeroWindow, Stall::H1NoRead] {
                let f = stalled_download(&ca, &kg, up, name, stall).await;
                eprintln!(
                    "R7/R8 upstream {name}, client {stall:?}: upstream body bytes {} KiB at 3 s, {} KiB at 4 s \
                     ({} KiB on its sockets); keygate RSS {:+} KiB; cancelled {:?} after the client left; client saw {}",
                    f.body_bytes_3s / 1024,
                    f.body_bytes_4s / 1024,
                    f.tcp_bytes_4s / 1024,
                    f.rss_growth_kib,
                    f.cancel_after,
                    f.client_saw
                );
                figures.push(f);
            }
        }
        let hwm = kg.hwm_kib();
        eprintln!("R7/R8: keygate RSS at start {rss_start} KiB, peak (VmHWM) {hwm} KiB");
        for f in &figures {
            let what = format!("upstream {}, client {:?}", f.upstream, f.stall);
            assert!(
                f.body_bytes_4s < 16 * MIB,
                "{what}: the upstream sent {} bytes into a stalled client",
                f.body_bytes_4s
            );
            assert!(
                f.rss_growth_kib < 32 * 1024,
                "{what}: keygate's RSS grew {} KiB",
                f.rss_growth_kib
            );
            assert!(
                f.body_bytes_4s - f.body_bytes_3s < 2 * MIB,
                "{what}: the upstream still sent {} bytes between 3 s and 4 s",
                f.body_bytes_4s - f.body_bytes_3s
            );
            assert!(
                f.cancel_after < T5,
                "{what}: cancelled after {:?}",
                f.cancel_after
            );
        }
        assert!(
            hwm < rss_start + 64 * 1024,
            "keygate's peak RSS {hwm} KiB against {rss_start} KiB at the start"
        );
        let (code, _) = kg.kg.terminate().await;
        assert_eq!(code, Some(0), "keygate's exit");
    });
}

// ---------------------------------------------------------------------------------------------
// R2: the upstream dies in the middle of an upload
// ---------------------------------------------------------------------------------------------

/// How the dying upstream goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Death {
    /// TCP reset (SO_LINGER 0, then close): no close_notify, no FIN.
    Reset,
    /// TLS close_notify and FIN, without a response.
    Close,
}

/// What the dying upstream saw.
#[derive(Default)]
struct DeathLog {
    /// Each request's path.
    seen: Vec<String>,
    /// Body bytes read before dying, per upload.
    upload_read: Vec<usize>,
}

/// A hand-written HTTP/1.1 upstream: `/ok` answers 200 `ok` (keep-alive); `/die-reset` and
/// `/die-close` read the head and at least 4 KiB of the body (at most 5 s), then die without
/// a word.
struct DyingUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<DeathLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DyingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until `buf` holds `n` bytes; false when the connection ends first.
async fn read_to(tls: &mut UpTls, buf: &mut Vec<u8>, n: usize) -> bool {
    let mut tmp = [0u8; 4096];
    while buf.len() < n {
        match tls.read(&mut tmp).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&tmp[..k]),
        }
    }
    true
}

const DIE_AFTER: usize = 4096;

async fn dying_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    log: Arc<Mutex<DeathLog>>,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = Vec::new();
    loop {
        let Some((path, head_len, cl)) = read_head(&mut tls, &mut buf).await else {
            return;
        };
        buf.drain(..head_len);
        log.lock().unwrap().seen.push(path.clone());
        let death = if path.contains("/die-reset") {
            Some(Death::Reset)
        } else if path.contains("/die-close") {
            Some(Death::Close)
        } else {
            None
        };
        let Some(death) = death else {
            if !read_to(&mut tls, &mut buf, cl).await {
                return;
            }
            buf.drain(..cl);
            let (status, body) = if path.contains("/ok") {
                ("200 OK", "ok")
            } else {
                ("404 Not Found", "")
            };
            let r = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if tls.write_all(r.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            continue;
        };
        // Part of the body (it is sent slowly), then die.
        let _ = tokio::time::timeout(T5, read_to(&mut tls, &mut buf, DIE_AFTER)).await;
        log.lock().unwrap().upload_read.push(buf.len());
        match death {
            Death::Reset => {
                let _ = tls.get_ref().0.set_zero_linger();
                drop(tls);
            }
            Death::Close => {
                let _ = tls.shutdown().await;
                drop(tls);
            }
        }
        return;
    }
}

impl DyingUpstream {
    async fn start(ca: &TestCa) -> Self {
        let log = Arc::new(Mutex::new(DeathLog::default()));
        let l = log.clone();
        let (addr, task) = hand_upstream(ca, "dying", move |acceptor, tcp| {
            dying_conn(acceptor, tcp, l.clone())
        })
        .await;
        DyingUpstream { addr, log, task }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn seen(&self, needle: &str) -> usize {
        let l = self.log.lock().unwrap();
        l.seen.iter().filter(|p| p.contains(needle)).count()
    }
}

/// Sockets of this network namespace in CLOSE_WAIT whose peer is 127.0.0.1:`port` (the other
/// end closed, this end never did).
fn close_wait_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let peer = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&peer.as_str()) && f.get(3) == Some(&"08")
        })
        .count()
}

const UPLOAD_CHUNKS: usize = 10;
const UPLOAD_CHUNK: usize = 1024;

/// A POST of 10 KiB, 1 KiB every 100 ms, with its Content-Length declared.
fn slow_upload(url: &str, key: &str) -> Request<TestBody> {
    let chunks = futures_util::stream::unfold(0usize, |i| async move {
        if i >= UPLOAD_CHUNKS {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let data = Bytes::from(vec![b'p'; UPLOAD_CHUNK]);
        Some((Ok::<_, std::io::Error>(Frame::data(data)), i + 1))
    });
    Request::post(url)
        .header("x-api-key", key)
        .header("content-type", "application/octet-stream")
        .header("content-length", (UPLOAD_CHUNKS * UPLOAD_CHUNK).to_string())
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap()
}

#[test]
fn r2_upstream_dying_mid_upload_is_a_502_once_and_the_next_request_works() {
    run(async {
        let ca = TestCa::new();
        let up = DyingUpstream::start(&ca).await;
        let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
        let mut report = Vec::new();
        for h2 in [false, true] {
            let proto = if h2 { "h2" } else { "h1" };
            let client = ca.client(h2);
            for death in [Death::Reset, Death::Close] {
                let what = format!("client {proto}, upstream {death:?}");
                // A pooled upstream connection first, so the upload goes over a reused one.
                let ok0 = up.seen("/ok");
                let (s, b) = keyed_get(&client, &kg.url("/ok"), &kg.key).await;
                assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]), "{what}: warm-up");
                assert_eq!(up.seen("/ok"), ok0 + 1, "{what}: warm-up at the upstream");

                let path = match death {
                    Death::Reset => "/die-reset",
                    Death::Close => "/die-close",
                };
                let before = up.seen(path);
                let t = Instant::now();
                let outcome = within(
                    "the answer to an upload whose upstream died",
                    Duration::from_secs(10),
                    async {
                        let res = client.request(slow_upload(&kg.url(path), &kg.key)).await?;
                        let status = res.status();
                        let body = res.into_body().collect().await.map(|b| b.to_bytes());
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body.is_ok()))
                    },
                )
                .await;
                let took = t.elapsed();
                let got = match &outcome {
                    Ok((s, whole)) => format!("{s} (body read whole: {whole})"),
                    Err(e) => format!("error: {e}"),
                };
                // An answer must be a 502; an abnormal end is acceptable, a clean 2xx is not.
                if let Ok((s, _)) = &outcome {
                    assert_eq!(
                        *s,
                        StatusCode::BAD_GATEWAY,
                        "{what}: the client was answered {s}"
                    );
                }
                // Long enough for any retry to show up at the upstream (kept: a window for
                // a retry; no signal says none is coming).
                tokio::time::sleep(Duration::from_millis(500)).await;
                let attempts = up.seen(path) - before;
                let read = up.log.lock().unwrap().upload_read.last().copied();
                assert_eq!(
                    attempts, 1,
                    "{what}: the POST reached the upstream {attempts} times"
                );
                assert!(
                    read.is_some_and(|n| n < UPLOAD_CHUNKS * UPLOAD_CHUNK),
                    "{what}: the upstream read {read:?} body bytes before dying"
                );

                // The dead connection is not reused, and none is left half-closed.
                let ok0 = up.seen("/ok");
                let (s, b) = keyed_get(&client, &kg.url("/ok"), &kg.key).await;
                assert_eq!(
                    (s, &b[..]),
                    (StatusCode::OK, &b"ok"[..]),
                    "{what}: next request"
                );
                assert_eq!(
                    up.seen("/ok"),
                    ok0 + 1,
                    "{what}: next request at the upstream"
                );
                let port = up.addr.port();
                assert!(
                    wait_until(Duration::from_secs(3), || close_wait_to(port) == 0).await,
                    "{what}: {} keygate socket(s) to the upstream left in CLOSE_WAIT",
                    close_wait_to(port)
                );
                report.push(format!(
                    "{what}: {got} after {took:?}; upstream read {read:?} body bytes, 1 attempt"
                ));
            }
        }
        for r in &report {
            eprintln!("R2 upload: {r}");
        }
        kg.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// R11: SIGTERM with HTTP/2 streams in flight
// ---------------------------------------------------------------------------------------------

#[test]
fn r11_sigterm_sends_goaway_finishes_h2_streams_in_flight_and_exits_0() {
    run(async {
        let ca = TestCa::new();
        let up = FakeUpstream::start(&ca).await;
        let kg = Child::start(
            &ca,
            &[("/", &up.url())],
            &format!("{NO_LIMITS}[server]\ndrain_timeout = \"10s\"\n"),
        )
        .await;
        let Child {
            kg: mut keygate,
            key,
            _dir,
        } = kg;
        let proxy = keygate.proxy;

        // Two streams in flight, each answered by the upstream 1.5 s after it arrives: one on a
        // connection written by hand, one from hyper's client.
        let mut h = H2::open(&ca, proxy).await;
        let block = request_block("/slow?ms=1500", &key);
        assert!(
            h.send(&frame(
                T_HEADERS,
                END_HEADERS | DATA_OR_END_STREAM,
                1,
                &block
            ))
            .await
        );
        let hyper_req = {
            let client = ca.client(true);
            let url = keygate.url("/slow?ms=1500");
            let key = key.clone();
            tokio::spawn(async move {
                let res = client.request(get(&url, &[("x-api-key", &key)])).await?;
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
            })
        };
        assert!(
            wait_until(T5, || up.recorded().len() == 2).await,
            "both requests reach the upstream"
        );

        let pid = keygate.pid();
        let t = Instant::now();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());

        // New connections are refused once the listener is closed (polled, at most 5 s).
        let refused = tokio::spawn(async move {
            let end = Instant::now() + T5;
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(proxy))
                    .await
                {
                    Ok(Err(_)) => return Some(t.elapsed()),
                    // Accepted before the listener closed: let go at once.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            None
        });

        // The hand-made connection: answer keygate's PINGs, note GOAWAYs, read the response.
        let deadline = t + Duration::from_secs(8);
        let mut goaways = Vec::new();
        let (mut status, mut body, mut complete) = (None, Vec::new(), None);
        let mut pings = 0;
        let closed = loop {
            match h.next_or_end(deadline).await {
                Ok((T_GOAWAY, _, _, p)) => {
                    goaways.push((
                        t.elapsed(),
                        goaway_parts(&p).unwrap_or((u32::MAX, u32::MAX)),
                    ));
                }
                Ok((T_PING, flags, 0, p)) if flags & ACK == 0 => {
                    pings += 1;
                    assert!(h.send(&frame(T_PING, ACK, 0, &p)).await, "PING ACK");
                }
                Ok((T_HEADERS, flags, 1, p)) => {
                    status = indexed_status(&p);
                    if flags & DATA_OR_END_STREAM != 0 {
                        complete = Some(t.elapsed());
                    }
                }
                Ok((T_DATA, flags, 1, p)) => {
                    body.extend_from_slice(&p);
                    if flags & DATA_OR_END_STREAM != 0 {
                        complete = Some(t.elapsed());
                    }
                }
                Ok(_) => {}
                Err(true) => break Some(t.elapsed()),
                Err(false) => break None,
            }
        };
        let hyper_out = within("hyper's request", T5, hyper_req)
            .await
            .expect("task");
        let status_code = within(
            "keygate to exit",
            Duration::from_secs(15),
            keygate.child.wait(),
        )
        .await
        .expect("wait");
        let exited = t.elapsed();
        let refused = refused.await.expect("probe task");
        eprintln!(
            "R11: after SIGTERM: GOAWAYs (at, (last stream id, code)) {goaways:?}; {pings} PING(s) answered; \
             raw stream 1: status {status:?}, body {:?}, complete at {complete:?}; connection closed at {closed:?}; \
             hyper h2 request: {:?}; new connections refused at {refused:?}; exit {:?} at {exited:?}",
            String::from_utf8_lossy(&body),
            hyper_out.as_ref().map(|(s, b)| (*s, b.clone())).map_err(|e| e.to_string()),
            status_code.code()
        );

        assert!(!goaways.is_empty(), "no GOAWAY after SIGTERM");
        assert!(
            goaways.iter().all(|(_, (_, code))| *code == 0),
            "GOAWAY codes other than NO_ERROR: {goaways:?}"
        );
        let complete = complete.expect("the in-flight response on the raw connection finished");
        assert!(
            goaways[0].0 < complete,
            "the GOAWAY came only after the in-flight response"
        );
        let (_, (last_id, _)) = goaways[goaways.len() - 1];
        assert!(
            last_id >= 1,
            "the last GOAWAY's last stream id {last_id} leaves out the stream in flight"
        );
        assert_eq!(status, Some(200), "raw stream 1 status");
        assert_eq!(&body[..], b"late", "raw stream 1 body");
        let closed = closed.expect("keygate closed the raw connection after the response");
        assert!(
            closed >= complete,
            "closed before the response was complete"
        );
        let (s, b) = hyper_out.expect("hyper's in-flight request finished");
        assert_eq!(
            (s, &b[..]),
            (StatusCode::OK, &b"late"[..]),
            "hyper's request"
        );
        assert!(
            refused.is_some(),
            "the listener still accepted 5 s after SIGTERM"
        );
        assert_eq!(status_code.code(), Some(0), "keygate's exit code");
        // Well before the 10 s drain deadline: the connections closed themselves once done.
        assert!(
            exited < Duration::from_secs(8),
            "keygate exited {exited:?} after SIGTERM (drain deadline 10 s)"
        );
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
            vec!["/slow?ms=1500", "/slow?ms=1500"],
            "what the upstream received"
        );
    });
}
