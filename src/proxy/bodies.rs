//! Body wrappers on the way through: a cap on request bodies of unknown length, and an idle
//! timeout on upstream response bodies. Both also pass trailers through the header rules of
//! [`super::headers`]: a request trailer loses the client's credentials, a response trailer
//! that echoes the injected secret is dropped.
//!
//! Both end the body with an error, never with a clean end: hyper then ends the other side
//! abnormally (h1: connection closed without the last chunk; h2: RST_STREAM), so a cut body is
//! never mistaken for a complete one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::credentials::Resolved;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a body was cut.
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("request body over the {0}-byte cap")]
    TooLarge(u64),
    #[error("upstream body idle for {0:?}")]
    Idle(Duration),
    /// The client's own body failed: bad chunked framing, or the client went away mid-body.
    #[error("the client's request body is malformed or incomplete")]
    ClientBody(#[source] BoxError),
    /// The client sent no body data for this long while the upstream waited for it.
    #[error("request body idle for {0:?}")]
    ClientIdle(Duration),
}

/// A request body that errors once more than `max` bytes went through (for bodies without a
/// `Content-Length`; a declared length over the cap is refused with 413 before this).
pub struct Capped<B> {
    inner: B,
    max: Option<u64>,
    seen: u64,
    failed: Arc<AtomicU8>,
    idle: Duration,
    /// Runs only while the upstream side waits on the client: started when a poll first finds
    /// no data (created then, the first time), never while nobody polls (upstream backpressure).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    /// The route's own credential header, stripped from trailers as from headers.
    route_header: Option<HeaderName>,
}

/// What became of a request body, readable after the upstream request failed (over h2 the
/// body's own error does not travel back in the request's error).
#[derive(Clone, Default)]
pub struct BodyOutcome(Arc<AtomicU8>);

const FAILED_CLIENT: u8 = 1;
const FAILED_TOO_LARGE: u8 = 2;
const FAILED_IDLE: u8 = 3;

impl BodyOutcome {
    /// The 4xx the client's body deserves, if the body is what failed.
    pub fn client_fault(&self, max: Option<u64>) -> Option<crate::error::ProxyError> {
        match self.0.load(Ordering::Acquire) {
            FAILED_CLIENT => Some(crate::error::ProxyError::BadRequestBody),
            FAILED_TOO_LARGE => Some(crate::error::ProxyError::BodyTooLarge(max.unwrap_or(0))),
            FAILED_IDLE => Some(crate::error::ProxyError::BodyTimeout),
            _ => None,
        }
    }
}

impl<B> Capped<B> {
    /// `max`: the byte cap; `idle`: how long the client may leave the upstream waiting for
    /// the next piece of body.
    pub fn new(inner: B, max: Option<u64>, idle: Duration, outcome: &BodyOutcome) -> Self {
        Capped {
            inner,
            max,
            seen: 0,
            failed: outcome.0.clone(),
            idle,
            timer: None,
            waiting: false,
            route_header: None,
        }
    }

    /// Also strips `name` (the route's own credential header) from the body's trailers.
    pub fn stripping(mut self, name: Option<HeaderName>) -> Self {
        self.route_header = name;
        self
    }
}

impl<B> HttpBody for Capped<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed.store(FAILED_CLIENT, Ordering::Release);
                return Poll::Ready(Some(Err(Box::new(Cut::ClientBody(e.into())))));
            }
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                let idle = self.idle;
                let deadline = tokio::time::Instant::now() + idle;
                let start = !std::mem::replace(&mut self.waiting, true);
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if start {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    self.failed.store(FAILED_IDLE, Ordering::Release);
                    return Poll::Ready(Some(Err(Box::new(Cut::ClientIdle(idle)))));
                }
                return Poll::Pending;
            }
        };
        // Data came: the next wait starts a fresh clock.
        self.waiting = false;
        let polled = match polled.into_trailers() {
            Ok(mut trailers) => {
                super::headers::filter_request_trailers(&mut trailers, self.route_header.as_ref());
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            Err(frame) => frame,
        };
        if let (Some(max), Some(d)) = (self.max, polled.data_ref()) {
            self.seen += d.len() as u64;
            if self.seen > max {
                self.failed.store(FAILED_TOO_LARGE, Ordering::Release);
                return Poll::Ready(Some(Err(Box::new(Cut::TooLarge(max)))));
            }
        }
        Poll::Ready(Some(Ok(polled)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream response body that errors when no frame arrives for `idle`. Each frame
/// restarts the clock, so a stream with regular events (SSE) is never cut, however long it
/// lasts; a stalled one is.
pub struct IdleGuard<B> {
    inner: B,
    idle: Duration,
    /// Runs only while the client side waits on the upstream: started when a poll first finds
    /// no frame (created then, the first time). A small response whose frames are ready never
    /// reads the clock or touches the timer wheel.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    /// What the route injected, for the reflection guard on trailers.
    injected: Option<Arc<Resolved>>,
}

impl<B> IdleGuard<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleGuard {
            inner,
            idle,
            timer: None,
            waiting: false,
            injected: None,
        }
    }

    /// Drops trailers that echo the secret `injected` carries.
    pub fn guarding(mut self, injected: Arc<Resolved>) -> Self {
        self.injected = Some(injected);
        self
    }
}

impl<B> HttpBody for IdleGuard<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                // A frame came: the next wait starts a fresh clock.
                self.waiting = false;
                match f.into_trailers() {
                    Ok(mut trailers) => {
                        let (secret, route) = match &self.injected {
                            Some(r) => {
                                (r.secret.as_ref().map(|s| s.expose().as_bytes()), &*r.route)
                            }
                            None => (None, ""),
                        };
                        super::headers::filter_response_trailers(&mut trailers, secret, route);
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    Err(f) => Poll::Ready(Some(Ok(f))),
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = self.idle;
                let start = !std::mem::replace(&mut self.waiting, true);
                let timer = match &mut self.timer {
                    Some(t) => {
                        if start {
                            t.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        t
                    }
                    slot @ None => slot.insert(Box::pin(tokio::time::sleep(idle))),
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(?idle, "upstream response body stalled; cutting it");
                        Poll::Ready(Some(Err(Box::new(Cut::Idle(idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn stream(
        rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin>
    {
        StreamBody::new(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
        })))
    }

    #[tokio::test(start_paused = true)]
    async fn regular_frames_are_never_cut_and_a_stall_is() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut body = IdleGuard::new(stream(rx), Duration::from_secs(10));
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(9)).await;
            tx.send(Bytes::from_static(b"data: x\n\n")).await.unwrap();
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.data_ref().unwrap().len(), 9);
        }
        // 180 s of stream so far; now it stalls.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_body_that_stalls_is_cut_and_a_slow_one_is_not() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outcome = BodyOutcome::default();
        let mut body = Capped::new(stream(rx), None, Duration::from_secs(5), &outcome);
        for _ in 0..10 {
            let send = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                send.send(Bytes::from_static(b"x")).await.unwrap();
            });
            assert!(
                body.frame().await.unwrap().is_ok(),
                "a byte every 4 s was cut"
            );
        }
        // Nobody polls for a long while (upstream backpressure): that is not the client's idle
        // time. Data already sent by then is read without a cut.
        tokio::time::advance(Duration::from_secs(30)).await;
        let send = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            send.send(Bytes::from_static(b"x")).await.unwrap();
        });
        assert!(
            body.frame().await.unwrap().is_ok(),
            "cut for the upstream's pause"
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        assert!(matches!(
            outcome.client_fault(None),
            Some(crate::error::ProxyError::BodyTimeout)
        ));
        drop(tx);
    }

    #[tokio::test]
    async fn the_cap_errors_past_max() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outcome = BodyOutcome::default();
        let mut body = Capped::new(stream(rx), Some(10), Duration::from_secs(60), &outcome);
        tx.send(Bytes::from_static(b"123456")).await.unwrap();
        tx.send(Bytes::from_static(b"7890")).await.unwrap();
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("10-byte cap"), "{err}");
        assert!(matches!(
            outcome.client_fault(Some(10)),
            Some(crate::error::ProxyError::BodyTooLarge(10))
        ));
    }
}
