//! The upstream fixture of the side-by-side benchmark (`benches/compare.py`): a small, fast
//! HTTP server that every tier (direct, keygate, nginx, HAProxy) forwards to. It listens with
//! TLS (HTTP/1.1 and HTTP/2 by ALPN, certificate issued from keygate's development CA in
//! `--certs`) and, optionally, in cleartext (HTTP/1.1 only), with TCP_NODELAY on every
//! connection.
//!
//! Paths:
//! - any GET: `200 hello, world\n`;
//! - `POST /upload[?rate=BYTES_PER_SEC]`: reads the body frame by frame, throttled to that rate
//!   when given, and answers with the byte count;
//! - `GET /sse?n=N&gap_ms=G`: `text/event-stream`, N events G ms apart, each
//!   `data: SEQ SEND_NS\n\n` in its own frame, where SEND_NS is CLOCK_MONOTONIC in nanoseconds
//!   read right before the frame is handed to hyper;
//! - `GET /whoami`: the `authorization` header it received and whether `x-api-key` arrived
//!   (the harness checks each proxy's header rewriting with it once before measuring).
//!
//! ```text
//! cargo run --release --example bench-upstream -- --tls 127.0.0.1:9543 \
//!     [--plain 127.0.0.1:9080] --certs DIR [--threads N]
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type FixtureBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Bounds on what a request may ask for, so that a bad query cannot tie the fixture up.
const MAX_EVENTS: u64 = 1_000_000;
const MAX_GAP_MS: u64 = 60_000;
const MAX_UPLOAD: u64 = 1 << 30;

struct Args {
    tls: Option<String>,
    plain: Option<String>,
    certs: std::path::PathBuf,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut out = Args {
        tls: None,
        plain: None,
        certs: std::path::PathBuf::from("certs"),
        threads: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--tls" => out.tls = Some(value()?),
            "--plain" => out.plain = Some(value()?),
            "--certs" => out.certs = value()?.into(),
            "--threads" => {
                out.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?;
                if !(1..=64).contains(&out.threads) {
                    return Err("--threads must be between 1 and 64".into());
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if out.tls.is_none() && out.plain.is_none() {
        return Err("give --tls ADDR and/or --plain ADDR".into());
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut tasks = Vec::new();
    if let Some(addr) = &args.tls {
        let certs = &args.certs;
        let ca_cert = std::fs::read_to_string(certs.join("ca.pem"))
            .map_err(|e| format!("{}/ca.pem: {e}", certs.display()))?;
        let ca_key = std::fs::read_to_string(certs.join("ca-key.pem"))
            .map_err(|e| format!("{}/ca-key.pem: {e}", certs.display()))?;
        let ca = keygate::tls::Ca::from_pem(&ca_cert, &ca_key)?;
        let (cert_pem, key_pem) = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let dir =
            std::env::temp_dir().join(format!("keygate-bench-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), cert_pem)?;
        std::fs::write(dir.join("key.pem"), key_pem)?;
        let tls = keygate::tls::server_config(&dir.join("cert.pem"), &dir.join("key.pem"));
        let _ = std::fs::remove_dir_all(&dir);
        let acceptor = Arc::new(tokio_rustls::TlsAcceptor::from(tls?));
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "bench-upstream: tls listening on https://{}",
            listener.local_addr()?
        );
        tasks.push(tokio::spawn(accept_tls(listener, acceptor)));
    }
    if let Some(addr) = &args.plain {
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "bench-upstream: plain listening on http://{}",
            listener.local_addr()?
        );
        tasks.push(tokio::spawn(accept_plain(listener)));
    }
    eprintln!("bench-upstream: ready");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Accept errors (out of file descriptors, a reset before accept) are logged and survived.
async fn accept_or_pause(listener: &TcpListener) -> Option<tokio::net::TcpStream> {
    match listener.accept().await {
        Ok((tcp, _)) => {
            let _ = tcp.set_nodelay(true);
            Some(tcp)
        }
        Err(e) => {
            eprintln!("bench-upstream: accept: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

async fn accept_tls(listener: TcpListener, acceptor: Arc<tokio_rustls::TlsAcceptor>) {
    loop {
        let Some(tcp) = accept_or_pause(&listener).await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(answer(req).await) },
                );
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn accept_plain(listener: TcpListener) {
    loop {
        let Some(tcp) = accept_or_pause(&listener).await else {
            continue;
        };
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(answer(req).await) },
                );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// The value of query parameter `name`, parsed as a number.
fn query_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<FixtureBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn answer(req: Request<Incoming>) -> Response<FixtureBody> {
    match req.uri().path() {
        "/upload" => upload(req).await,
        "/sse" => sse(&req),
        "/whoami" => {
            let auth = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let key = if req.headers().contains_key("x-api-key") {
                "present"
            } else {
                "absent"
            };
            text(
                StatusCode::OK,
                format!("authorization={auth}\nx-api-key={key}\n"),
            )
        }
        _ => text(StatusCode::OK, Bytes::from_static(b"hello, world\n")),
    }
}

async fn upload(req: Request<Incoming>) -> Response<FixtureBody> {
    let rate = query_u64(&req, "rate").filter(|r| *r > 0);
    let start = Instant::now();
    let mut body = req.into_body();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("body error: {e}\n")),
        };
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
        }
        if total > MAX_UPLOAD {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "upload over 1 GiB\n");
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    text(StatusCode::OK, format!("{total}\n"))
}

fn sse(req: &Request<Incoming>) -> Response<FixtureBody> {
    let n = query_u64(req, "n").unwrap_or(10).min(MAX_EVENTS);
    let gap = Duration::from_millis(query_u64(req, "gap_ms").unwrap_or(10).min(MAX_GAP_MS));
    let stream = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let frame = Frame::data(Bytes::from(format!("data: {i} {}\n\n", monotonic_ns())));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp
}
