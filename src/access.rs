//! The access log: one line per request, written when its response body ends (or the client
//! goes away), so that bytes and duration are the whole exchange's.
//!
//! Target `keygate::access` at INFO: `KEYGATE_LOG=warn` (or `keygate::access=off`) turns it
//! off, and then no line is built. Fields: method, path (without the query string, which may
//! carry credentials), plane, route, key id (never the key), status, response body bytes,
//! duration, time to the upstream's response head, and whether the body ended completely.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// What a handler knows about its request, carried to the log line in response extensions.
#[derive(Debug, Clone, Default)]
pub struct AccessInfo {
    /// The route's name (proxy) or "admin".
    pub route: Option<std::sync::Arc<str>>,
    /// The key's id (a UUID), when a keygate key authenticated.
    pub key_uid: Option<u128>,
    /// Whether the request authenticated (a keygate key or a passthrough key).
    pub authenticated: bool,
    /// Time to the upstream's response head, when the request reached the upstream.
    pub upstream: Option<Duration>,
}

/// The request side of a log line, taken before the handler consumes the request.
pub struct Pending {
    pub started: Instant,
    pub method: http::Method,
    pub path: String,
    pub plane: &'static str,
}

impl Pending {
    /// Captures the request line, if the access log is on.
    pub fn capture(
        req: &http::Request<hyper::body::Incoming>,
        plane: &'static str,
    ) -> Option<Self> {
        if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
            return None;
        }
        Some(Pending {
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().chars().take(256).collect(),
            plane,
        })
    }
}

/// A response body that counts what it sends and logs the exchange when it ends or is dropped.
pub struct LoggedBody<B> {
    inner: B,
    log: Option<Line>,
    /// Marks the connection busy until the response has been sent (or dropped); see
    /// `server::Activity`. Carried here because this is the one wrapper every response has.
    _active: crate::server::Active,
}

struct Line {
    pending: Pending,
    info: AccessInfo,
    status: u16,
    bytes: u64,
    complete: bool,
}

impl<B: HttpBody> LoggedBody<B> {
    /// Wraps `inner`, holding `active` until it is dropped; without `pending` (log off) it
    /// only passes frames through.
    pub fn new(
        inner: B,
        pending: Option<Pending>,
        info: AccessInfo,
        status: u16,
        active: crate::server::Active,
    ) -> Self {
        let complete = inner.is_end_stream();
        LoggedBody {
            log: pending.map(|pending| Line {
                pending,
                info,
                status,
                bytes: 0,
                complete,
            }),
            inner,
            _active: active,
        }
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        if let Some(l) = self.log.take() {
            let key_id = l.info.key_uid.map(|u| uuid::Uuid::from_u128(u).to_string());
            tracing::info!(
                target: "keygate::access",
                method = %l.pending.method,
                path = %l.pending.path,
                plane = l.pending.plane,
                route = l.info.route.as_deref().unwrap_or("-"),
                key_id = key_id.as_deref().unwrap_or("-"),
                status = l.status,
                bytes = l.bytes,
                duration_ms = millis(l.pending.started.elapsed()),
                upstream_ms = l.info.upstream.map(millis),
                complete = l.complete,
            );
        }
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl<B> HttpBody for LoggedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = this.inner.is_end_stream();
        if let Some(l) = this.log.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    l.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                    // hyper stops polling a body that says it has ended.
                    l.complete = ended;
                }
                Poll::Ready(None) => l.complete = true,
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
