//! Pieces of the battery tests (`resilience.rs`, `battery.rs`, `hostile.rs`): one test at a
//! time on its own runtime, bounded waits, and a hand-written TLS upstream whose connections a
//! test drives byte by byte.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::TestCa;

/// Rate limits out of the way: these tests are about connections, not quotas.
pub const NO_LIMITS: &str = "[limits]\ndefault = { per_second = 100000, burst = 100000 }\n\
                             auth_failures = { per_second = 100000, burst = 100000 }\n";

pub const T5: Duration = Duration::from_secs(5);

/// Runs `f` holding `serial` (no other test of the file at the same time: fd and task counts
/// and timings need a quiet process), on a fresh two-thread runtime.
pub fn run_serial<F: Future<Output = ()>>(serial: &Mutex<()>, f: F) {
    let _one_at_a_time = serial.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

/// `f`'s outcome, or a panic naming `what` after `d`.
pub async fn within<F: Future>(what: &str, d: Duration, f: F) -> F::Output {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome within {d:?}"))
}

/// Polls `cond` every 5 ms until it holds or `d` passes; returns whether it held.
pub async fn wait_until(d: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + d;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`wait_until`], for a condition that has to await something (a connect, a scrape).
pub async fn wait_until_async<F, Fut>(d: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + d;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server side of a hand-driven upstream connection.
pub type UpTls = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS listener on 127.0.0.1:0 (certificate from `ca`, ALPN http/1.1) that hands each TCP
/// connection to `conn` with the acceptor; returns its address and the accept task (abort it
/// to end the listener and every connection).
pub async fn hand_upstream<F, Fut>(
    ca: &TestCa,
    label: &str,
    conn: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio_rustls::TlsAcceptor, TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (cert, key) = ca.issue(label);
    let cfg = keygate::tls::server_config(&cert, &key).expect("upstream TLS");
    let mut cfg = Arc::try_unwrap(cfg).unwrap_or_else(|a| (*a).clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        // The connection tasks live in this JoinSet: aborting the accept task ends them.
        let mut set = JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((tcp, _)) = r else { return };
                    let _ = tcp.set_nodelay(true);
                    set.spawn(conn(acceptor.clone(), tcp));
                }
                Some(_) = set.join_next(), if !set.is_empty() => {}
            }
        }
    });
    (addr, task)
}

/// Reads one request head into `buf`; returns (path, head length, content-length). None when
/// the connection ends first or the head is not complete within 64 KiB.
pub async fn read_head(tls: &mut UpTls, buf: &mut Vec<u8>) -> Option<(String, usize, usize)> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            let cl = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            return Some((path, i + 4, cl));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        match tls.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}
