//! The accept loop shared by both listeners: connection cap, plain-HTTP detection, TLS, then
//! HTTP/1.1 or HTTP/2 by ALPN, and graceful shutdown.
//!
//! ```text
//!  accept ─▶ over the connection cap? ──yes──▶ close
//!    │ TCP_NODELAY
//!  peek 1st byte (within header_read_timeout)
//!    ├─ 0x16 (TLS handshake) ─▶ TLS accept ─▶ ALPN h2 ? http2 : http1 ─▶ service
//!    ├─ ASCII letter (a cleartext request) ─▶ read its head, note a leaked key, answer a
//!    │                                         plain-text 400 "HTTPS only", close
//!    └─ anything else ─▶ close
//!  shutdown signal ─▶ stop accepting; each connection: graceful_shutdown (h1 finishes the
//!                     in-flight request, h2 sends GOAWAY) ─▶ the app waits up to the drain
//!                     deadline for all connection permits to come back
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
// hyper-util's trait for "a connection that can finish gracefully", implemented for hyper's
// h1 and h2 connections; `drive` needs only that, plus the idle timer and lingering close
// that `hyper_util::server::graceful::GracefulShutdown` does not do.
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;

use crate::access::LoggedBody;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::Body;

type Logged = LoggedBody<Body>;

/// The application behind a listener: all the accept loop asks of it. `app.rs` implements it
/// for the proxy and the admin plane; this file knows nothing else about them.
pub trait Serve: Clone + Send + Sync + 'static {
    /// Which plane this is (metrics label, access log).
    fn plane(&self) -> Plane;
    /// The TLS acceptor and config for a connection arriving now.
    fn settings(&self) -> (tokio_rustls::TlsAcceptor, Arc<Config>);
    /// Answers one request; errors are answers too.
    fn call(
        &self,
        req: Request<Incoming>,
        peer: std::net::IpAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
    /// A key seen in a cleartext request on this listener's port.
    fn cleartext_key(&self, key: Secret, peer: std::net::IpAddr)
        -> impl Future<Output = ()> + Send;
    /// The metrics the accept loop counts into.
    fn metrics(&self) -> &Metrics;
}

/// Which plane a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Proxy,
    Admin,
}

impl Plane {
    pub fn name(self) -> &'static str {
        match self {
            Plane::Proxy => "proxy",
            Plane::Admin => "admin",
        }
    }
}

/// Counts a request in `keygate_requests_in_flight` while its handler runs.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn enter(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Counts an open connection in `keygate_connections` while it lives.
struct ConnGauge<A: Serve>(A);

impl<A: Serve> Drop for ConnGauge<A> {
    fn drop(&mut self) {
        self.0.metrics().connections[self.0.plane() as usize].dec();
    }
}

/// Whether a connection has a request in progress, and since when it has had none: the
/// idle timeout closes a connection idle for `server.idle_timeout`. A request counts until its
/// response body has been sent or dropped, so a long SSE stream keeps its connection busy.
struct Activity {
    busy: AtomicUsize,
    /// When the last request ended, in milliseconds since `epoch`.
    last_ms: AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        })
    }

    /// When the connection becomes idle enough to close, if it has no request in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<tokio::time::Instant> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Acquire)) + idle)
    }
}

/// One request in progress on a connection (see `Activity`).
pub struct Active(Arc<Activity>);

impl Active {
    fn enter(a: &Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::AcqRel);
        Active(a.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = a.epoch.elapsed().as_millis() as u64;
        a.last_ms.fetch_max(ms, Ordering::AcqRel);
        a.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The longest cleartext request head read to look for a leaked key.
const CLEARTEXT_HEAD_MAX: usize = 16 * 1024;
const CLEARTEXT_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 43\r\nConnection: close\r\n\r\nthis port speaks HTTPS only; use https://\r\n";

/// Accepts connections for `app` until `shutdown` turns true.
pub async fn accept_loop<A: Serve>(
    listener: TcpListener,
    app: A,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let plane = app.plane();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::server::signalled(&mut shutdown) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(?plane, "connection cap reached; refusing a connection");
            drop(tcp);
            continue;
        };
        app.metrics().connections[plane as usize].inc();
        let conn = Conn {
            app: app.clone(),
            shutdown: shutdown.clone(),
            _permit: ConnSlot {
                _permit: permit,
                _gauge: ConnGauge(app.clone()),
            },
        };
        tokio::spawn(conn.serve(tcp, peer));
    }
}

struct Conn<A: Serve> {
    app: A,
    shutdown: watch::Receiver<bool>,
    _permit: ConnSlot<A>,
}

/// What a connection holds while it lives: its place under the connection cap, and its
/// count in the connections gauge.
struct ConnSlot<A: Serve> {
    _permit: OwnedSemaphorePermit,
    _gauge: ConnGauge<A>,
}

impl<A: Serve> Conn<A> {
    /// One connection, from the first byte to the end. Each phase runs in its own boxed
    /// future: an async fn's state is as large as its largest phase, and this one lives as
    /// long as the connection, so an idle keep-alive connection should not carry the
    /// cleartext answer's read buffers or the TLS handshake's state.
    async fn serve(self, tcp: TcpStream, peer: SocketAddr) {
        // The config and certificate of the moment the connection arrived.
        let (acceptor, config) = self.app.settings();
        let timeout = config.server.header_read_timeout;
        let _ = tcp.set_nodelay(true);
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] != 0x16 {
            if first[0].is_ascii_alphabetic() {
                Box::pin(answer_cleartext(tcp, peer, &self.app, &config.server)).await;
            }
            return;
        }
        let accept = Box::pin(tokio::time::timeout(timeout, acceptor.accept(tcp)));
        // Not held for the connection's lifetime: each request loads the config of its moment.
        drop(config);
        let tls = match accept.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                self.app.metrics().tls_handshake_failures.inc();
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                self.app.metrics().tls_handshake_failures.inc();
                return;
            }
        };
        self.serve_http(tls, peer).await;
    }

    /// Builds the hyper connection for the negotiated protocol on the heap, and returns a
    /// small future that drives it. Built in a plain function, not an async one: an async
    /// body would keep the TLS stream, the `TokioIo` around it and the connection that owns it
    /// as three separate slots of its state (moved-from locals are not reused), for as long
    /// as the connection lives.
    fn serve_http(
        self,
        tls: TlsStream<TcpStream>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let (_, config) = self.app.settings();
        let server = &config.server;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let app = self.app.clone();
        let plane = app.plane();
        let activity = Activity::new();
        let idle = Idle {
            activity: activity.clone(),
            timeout: server.idle_timeout,
        };
        // Each request's future is boxed: hyper keeps a slot of the service future's size for
        // the whole connection, so an unboxed pipeline future (several KiB) would be memory
        // held by every idle keep-alive connection. One allocation per request is cheaper.
        // hyper enforces the header count on h1 only (and h2's size cap below); h2 requests
        // are counted here, so both protocols answer 431 alike.
        let max_headers = h2.then_some(server.max_headers);
        let svc = service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let active = Active::enter(&activity);
            let fut: Pin<Box<dyn Future<Output = Result<Response<Logged>, Infallible>> + Send>> =
                Box::pin(async move {
                    let pending = crate::access::Pending::capture(&req, plane.name());
                    // A guard, not a decrement after the await: a client that goes away drops
                    // this future mid-way.
                    let in_flight = (plane == Plane::Proxy).then(|| InFlight::enter(app.metrics()));
                    let res = if max_headers.is_some_and(|max| req.headers().len() > max) {
                        crate::error::error_response(
                            hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "too many request headers",
                        )
                    } else {
                        app.call(req, peer.ip()).await
                    };
                    drop(in_flight);
                    let (mut parts, body) = res.into_parts();
                    let info = parts
                        .extensions
                        .remove::<crate::access::AccessInfo>()
                        .unwrap_or_default();
                    let status = parts.status.as_u16();
                    Ok(Response::from_parts(
                        parts,
                        LoggedBody::new(body, pending, info, status, active),
                    ))
                });
            fut
        });
        let shutdown = self.shutdown.clone();
        if h2 {
            let io = TokioIo::new(tls);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(100)
                .max_pending_accept_reset_streams(20)
                // Per-stream buffers: 64 KiB send buffer, 256 KiB receive window (hyper: 400 KiB
                // and 1 MiB), so memory stays bounded per stream under many slow streams.
                .max_send_buf_size(64 * 1024)
                .initial_stream_window_size(256 * 1024)
                // The same bound as h1's head buffer (16 KiB): over it, h2 answers 431.
                .max_header_list_size(MAX_HEAD as u32)
                // Dead peers (a vanished laptop, a dropped NAT entry) are found by PING and
                // closed, instead of holding their streams and buffers forever.
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .serve_connection(io, svc);
            Box::pin(drive(
                Box::pin(conn),
                shutdown,
                idle,
                peer,
                self._permit,
                None,
            ))
        } else {
            let (back, returned) = tokio::sync::oneshot::channel();
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(server.header_read_timeout)
                .max_headers(server.max_headers)
                // The read buffer grows with a fast sender up to this (hyper: ~400 KiB), per
                // connection, and it also caps a request head. 16 KiB: W2 (64 slow uploads)
                // held 307 KiB per upload with 64 KiB here and in the upstream send buffer,
                // 130 KiB with 16 KiB here and 32 KiB there, at the same upload rate.
                .max_buf_size(MAX_HEAD)
                .keep_alive(true)
                .serve_connection(TokioIo::new(Handback::new(tls, back)), svc);
            Box::pin(drive(
                Box::pin(conn),
                shutdown,
                idle,
                peer,
                self._permit,
                Some(returned),
            ))
        }
    }
}

/// The idle timeout of one connection.
struct Idle {
    activity: Arc<Activity>,
    timeout: Duration,
}

/// Drives `conn` to its end. On shutdown, or once it has had no request in progress for the
/// idle timeout, asks it to finish gracefully (h2: GOAWAY) and waits for that. An h1
/// connection's stream comes back through `returned` once hyper is done with it, for a
/// lingering close.
async fn drive<C: GracefulConnection<Error = hyper::Error> + ?Sized, A: Serve>(
    mut conn: Pin<Box<C>>,
    mut shutdown: watch::Receiver<bool>,
    idle: Idle,
    peer: SocketAddr,
    _permit: ConnSlot<A>,
    returned: Option<tokio::sync::oneshot::Receiver<Box<TlsStream<TcpStream>>>>,
) {
    // Re-armed rather than reset per request: it wakes at most once per idle period, and on
    // waking it looks at when the last request ended.
    let timer = tokio::time::sleep(idle.timeout);
    tokio::pin!(timer);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = signalled(&mut shutdown) => {
                conn.as_mut().graceful_shutdown();
                break conn.as_mut().await;
            }
            _ = timer.as_mut() => {
                let now = tokio::time::Instant::now();
                match idle.activity.idle_deadline(idle.timeout) {
                    Some(at) if at <= now => {
                        tracing::debug!(%peer, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                        // A shutdown signal during this wait needs nothing more: the
                        // connection is already finishing.
                        break conn.as_mut().await;
                    }
                    Some(at) => timer.as_mut().reset(at),
                    // Busy: look again after one more period.
                    None => timer.as_mut().reset(now + idle.timeout),
                }
            }
        }
    };
    if let Err(e) = &result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(conn);
    if let Some(returned) = returned {
        if !*shutdown.borrow() {
            // Boxed: this future lives as long as the connection, and inline the lingering
            // phase (the TLS stream and a read buffer) would be memory held by every idle
            // connection (W6 measured 26.9 KiB per idle connection with it inline, not 16).
            Box::pin(async move {
                if let Ok(stream) = returned.await {
                    lingering_close(stream).await;
                }
            })
            .await;
        }
    }
}

/// The longest request head (h1 read buffer, h2 header list).
const MAX_HEAD: usize = 16 * 1024;

/// A lingering close, as nginx does it: send our side's end (TLS close_notify, TCP FIN), then
/// read and discard what the client still sends, for a bounded time. Closing a socket with
/// unread data makes the kernel send a reset, which can destroy an answer (a 431 to a client
/// still writing its 64 KiB header) before the client has read it.
async fn lingering_close(mut stream: Box<TlsStream<TcpStream>>) {
    const TOTAL: Duration = Duration::from_secs(2);
    const QUIET: Duration = Duration::from_millis(500);
    const MAX_DISCARD: usize = 1 << 20;
    let _ = tokio::time::timeout(TOTAL, async {
        let _ = tokio::time::timeout(QUIET, stream.shutdown()).await;
        let mut sink = [0u8; 4096];
        let mut discarded = 0usize;
        while discarded < MAX_DISCARD {
            match tokio::time::timeout(QUIET, stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => discarded += n,
                _ => break,
            }
        }
    })
    .await;
}

/// An h1 connection's TLS stream, handed back through a channel when hyper drops it, so that
/// the connection can still be closed with a lingering close.
struct Handback {
    io: Option<TlsStream<TcpStream>>,
    /// Carries a box: the channel's shared slot is sized for what it carries, and lives as long
    /// as the connection (a TLS stream inline there is over a KiB per idle connection).
    back: Option<tokio::sync::oneshot::Sender<Box<TlsStream<TcpStream>>>>,
}

impl Handback {
    fn new(
        io: TlsStream<TcpStream>,
        back: tokio::sync::oneshot::Sender<Box<TlsStream<TcpStream>>>,
    ) -> Self {
        Handback {
            io: Some(io),
            back: Some(back),
        }
    }

    /// Polls `f` on the stream (which is there until `Drop` hands it back).
    fn poll_io<R>(
        self: Pin<&mut Self>,
        f: impl FnOnce(Pin<&mut TlsStream<TcpStream>>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match self.get_mut().io.as_mut() {
            Some(io) => f(Pin::new(io)),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl Drop for Handback {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let _ = back.send(Box::new(io));
        }
    }
}

impl tokio::io::AsyncRead for Handback {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.poll_io(|io| io.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Handback {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_io(|io| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_io(|io| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_io(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_io(|io| io.poll_shutdown(cx))
    }
}

/// A cleartext HTTP request reached a TLS port: answer in plain text and never forward it.
/// A valid key in it has leaked onto the network, so it is flagged (or revoked).
async fn answer_cleartext<A: Serve>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    app: &A,
    server: &ServerConfig,
) {
    let plane = app.plane();
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(server.header_read_timeout, async {
        let mut buf = [0u8; 2048];
        while head.len() < CLEARTEXT_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = read;
    app.metrics().cleartext_attempts.inc();
    tracing::warn!(%peer, ?plane, "cleartext HTTP request on a TLS port refused");
    if let Some(key) = key_in_head(&head) {
        app.cleartext_key(key, peer.ip()).await;
    }
    let _ = tcp.write_all(CLEARTEXT_ANSWER).await;
    let _ = tcp.shutdown().await;
    // Drain what the client still sends for a moment, so closing does not reset the
    // connection before the client has read the answer.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 64 * 1024 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// The key in a cleartext request head, if it carries one.
pub(crate) fn key_in_head(head: &[u8]) -> Option<crate::secret::Secret> {
    let (_, headers) = parse_head(head);
    crate::proxy::authenticate::presented_key(&headers)
        .map(|k| crate::secret::Secret::new(k.to_owned()))
}

/// The request target and the header lines of a (possibly partial) HTTP/1 request head: every
/// complete header line that is a valid name and value, in order.
pub(crate) fn parse_head(head: &[u8]) -> (Option<String>, http::HeaderMap) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    // A partial head still has complete header lines worth looking at.
    let _ = req.parse(head);
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter().take_while(|h| !h.name.is_empty()) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    (req.path.map(str::to_owned), map)
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_answer_length_is_right() {
        let text = std::str::from_utf8(CLEARTEXT_ANSWER).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body.len(), 43);
    }

    #[test]
    fn keys_are_found_in_cleartext_heads() {
        let k = key_in_head(b"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: sk-abc\r\n\r\n").unwrap();
        assert_eq!(k.expose(), "sk-abc");
        let k = key_in_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer sk-def\r\n").unwrap();
        assert_eq!(k.expose(), "sk-def");
        assert!(key_in_head(b"GET / HTTP/1.1\r\n\r\n").is_none());
        assert!(key_in_head(b"\x00\x01garbage").is_none());
    }
}
