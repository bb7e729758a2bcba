//! Stage 4: send the request upstream over a pooled, verified TLS connection and stream the
//! response back. Bodies are never collected: the request body is the client's `Incoming`,
//! the response body is the upstream's `Incoming`, frame by frame.
//!
//! The upstream connection is HTTP/2 when the upstream offers it by ALPN, else HTTP/1.1
//! keep-alive, with TCP_NODELAY. A response-header timeout bounds the wait (504); a body is never
//! cut for its total duration. If the upstream dies mid-body, the body errors and hyper ends the
//! client's response abnormally (h1: closed without the last chunk; h2: RST_STREAM).

use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::inject::strip_hop_by_hop;
use crate::config::{Route, UpstreamConfig};
use crate::error::ProxyError;
use crate::tls::TlsError;
use crate::Body;

/// The pooled upstream client and its timeout.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    response_header_timeout: Duration,
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
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Upstream {
            client,
            response_header_timeout: cfg.response_header_timeout,
        })
    }
}

/// Sends `req` to the route's upstream and returns its response, streaming.
pub async fn forward(
    up: &Upstream,
    (_, route): (usize, &Route),
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    *req.uri_mut() = upstream_uri(route, req.uri())?;
    // The client picks h1 or h2 per pooled connection; the request itself starts as 1.1.
    *req.version_mut() = Version::HTTP_11;
    let res = match tokio::time::timeout(up.response_header_timeout, up.client.request(req)).await {
        Err(_) => return Err(ProxyError::UpstreamTimeout),
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(res)) => res,
    };
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, Either::Left(body)))
}

fn upstream_uri(route: &Route, incoming: &Uri) -> Result<Uri, ProxyError> {
    let pq = incoming
        .path_and_query()
        .map(PathAndQuery::as_str)
        .unwrap_or("/");
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
