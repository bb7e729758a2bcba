//! Stage 6: send the request upstream over a pooled, verified TLS connection and stream the
//! response back. Bodies are never collected: the request body is the client's `Incoming`,
//! the response body is the upstream's `Incoming`, frame by frame.
//!
//! The upstream connection is HTTP/2 when the upstream offers it by ALPN, else HTTP/1.1
//! keep-alive, with TCP_NODELAY. A response-header timeout bounds the wait (504); a body is never
//! cut for its total duration. If the upstream dies mid-body, the body errors and hyper ends the
//! client's response abnormally (h1: closed without the last chunk; h2: RST_STREAM).

use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::bodies::{BodyOutcome, Capped, IdleGuard};
use super::credentials::Resolved;
use super::headers::{remove_echoes, strip_hop_by_hop};
use crate::config::{Route, UpstreamConfig};
use crate::error::ProxyError;
use crate::tls::TlsError;
use crate::Body;

/// The body of an upstream request: the client's, streamed, or none (validation calls).
pub type UpstreamBody = Either<Capped<Incoming>, Empty<Bytes>>;

/// The pooled upstream client and its timeout.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    response_header_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Upstream {
    /// Builds the client: system roots + the configured CA, h2 and http/1.1 by ALPN.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, TlsError> {
        let tls = crate::tls::upstream_client_config(cfg.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let https = if cfg.http2 {
            https.enable_http1().enable_http2().wrap_connector(http)
        } else {
            https.enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(256)
            // hyper buffers up to 400 KiB per h2 stream by default: with many concurrent
            // uploads that is memory per upload, not flow. 32 KiB keeps a stream busy on
            // loopback and LAN links (16 KiB cost ~15 % of W2 upload rate) and keeps upload
            // memory flat.
            .http2_max_send_buf_size(32 * 1024)
            .http2_initial_stream_window_size(256 * 1024)
            .build(https);
        Ok(Upstream {
            client,
            response_header_timeout: cfg.response_header_timeout,
            body_idle_timeout: cfg.body_idle_timeout,
        })
    }

    /// The one validation call of a passthrough key: `GET <upstream><path>` with the key as
    /// Bearer. Returns the status; the body is read and dropped so the connection is reused.
    pub async fn validate_key(
        &self,
        route: &Route,
        path: &str,
        bearer: HeaderValue,
    ) -> Result<u16, ProxyError> {
        let uri = join_uri(route, path)?;
        let mut req = Request::get(uri)
            .body(Either::Right(Empty::new()))
            .map_err(|e| ProxyError::Internal(format!("building the validation request: {e}")))?;
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, bearer);
        let res = match tokio::time::timeout(self.response_header_timeout, self.client.request(req))
            .await
        {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(res)) => res,
        };
        let status = res.status().as_u16();
        // Bounded: a validation answer is small; a huge one is not worth reading to the end.
        let _ = tokio::time::timeout(self.response_header_timeout, async {
            let mut body = res.into_body();
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, Bytes::len);
                if seen > 1 << 20 {
                    break;
                }
            }
        })
        .await;
        Ok(status)
    }
}

/// Sends `req` to the route's upstream and returns its response, streaming. Response headers
/// and trailers that echo the injected secret are removed (reflection guard).
pub async fn forward(
    up: &Upstream,
    (_, route): (usize, &Route),
    injected: std::sync::Arc<Resolved>,
    mut req: Request<Incoming>,
    (max_body, body_idle): (Option<u64>, Duration),
) -> Result<Response<Body>, ProxyError> {
    let path = forwarded_path(route, req.uri());
    *req.uri_mut() = join_uri(route, path)?;
    // The client picks h1 or h2 per pooled connection; the request itself starts as 1.1.
    *req.version_mut() = Version::HTTP_11;
    let outcome = BodyOutcome::default();
    let strip = injected.strip.clone();
    let req =
        req.map(|b| Either::Left(Capped::new(b, max_body, body_idle, &outcome).stripping(strip)));
    let res = match tokio::time::timeout(up.response_header_timeout, up.client.request(req)).await {
        Err(_) => return Err(ProxyError::UpstreamTimeout),
        // The client's body failed, not the upstream: answer as the client's error.
        Ok(Err(e)) => {
            return Err(outcome
                .client_fault(max_body)
                .unwrap_or_else(|| classify(e)))
        }
        Ok(Ok(res)) => res,
    };
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(secret) = &injected.secret {
        remove_echoes(
            &mut parts.headers,
            secret.expose().as_bytes(),
            &route.name,
            "header",
        );
    }
    parts.version = Version::HTTP_11;
    let body = IdleGuard::new(body, up.body_idle_timeout).guarding(injected);
    Ok(Response::from_parts(parts, Either::Left(body)))
}

/// The path and query to send upstream: the client's, minus the route prefix when the route
/// strips it.
fn forwarded_path<'a>(route: &Route, incoming: &'a Uri) -> std::borrow::Cow<'a, str> {
    let pq = incoming
        .path_and_query()
        .map(PathAndQuery::as_str)
        .unwrap_or("/");
    if !route.strip_prefix {
        return pq.into();
    }
    let rest = pq
        .strip_prefix(route.prefix.trim_end_matches('/'))
        .unwrap_or(pq);
    if rest.starts_with('/') {
        rest.into()
    } else {
        format!("/{rest}").into()
    }
}

fn join_uri(route: &Route, path_and_query: impl AsRef<str>) -> Result<Uri, ProxyError> {
    let pq = path_and_query.as_ref();
    let path_and_query = if route.upstream.base_path.is_empty() {
        PathAndQuery::try_from(pq)
    } else {
        PathAndQuery::try_from(format!("{}{}", route.upstream.base_path, pq))
    }
    .map_err(|e| ProxyError::Internal(format!("building the upstream path: {e}")))?;
    Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::Internal(format!("building the upstream URI: {e}")))
}

/// Sorts a client error into connect / TLS verification / other.
fn classify(e: hyper_util::client::legacy::Error) -> ProxyError {
    if caused_by_tls(&e) {
        ProxyError::UpstreamTls(e)
    } else if e.is_connect() {
        ProxyError::UpstreamConnect(e)
    } else {
        ProxyError::Upstream(e)
    }
}

/// Whether a rustls error is anywhere in the chain. `io::Error` hides the error it wraps from
/// `source()` (it returns the wrapped error's source instead), and the TLS connector wraps
/// rustls' error in two of them, so descend through `get_ref()` there.
fn caused_by_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|i| i as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}
