//! The data plane: one request, top to bottom.
//!
//! ```text
//! client ─TLS─▶ path ─▶ route ─▶ authenticate ─▶ limit ─▶ inject ─▶ forward ─▶ upstream
//!               400     404   401/403/429/502/503  429      503      502/504
//! ```
//!
//! Each stage is a function of its own file; `handle` always answers, errors become responses
//! in [`ProxyError::into_response`].

pub mod authenticate;
pub mod bodies;
pub mod credentials;
pub mod forward;
pub mod headers;
pub mod inject;
pub mod limit;
pub mod passthrough;
pub mod path;
pub mod routes;

use std::net::IpAddr;

use hyper::body::Incoming;
use hyper::{Request, Response};

use std::time::Instant;

use crate::access::AccessInfo;
use std::sync::Arc;

use crate::app::Live;
use crate::crypto::MasterKey;
use crate::error::ProxyError;
use crate::keycache::KeyCache;
use crate::metrics::{Metrics, Refusal, NO_ROUTE};
use crate::Body;

/// What the data plane uses besides the config snapshot ([`Live`]): the key cache, the
/// passthrough verdicts, the master key (for passthrough key digests) and the metrics.
#[derive(Clone)]
pub struct DataPlane {
    pub keys: Arc<KeyCache>,
    pub passthrough: Arc<passthrough::PassthroughCache>,
    pub master: Arc<MasterKey>,
    pub metrics: Arc<Metrics>,
    /// Key usage not yet flushed to the store.
    pub usage: Arc<crate::usage::Usage>,
}

/// Serves one proxied request from `peer` on the config snapshot `live` (a reload meanwhile
/// does not change it). The response carries an [`AccessInfo`] in its extensions for the
/// access log.
pub async fn handle(
    plane: &DataPlane,
    live: &Live,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Body> {
    let mut info = AccessInfo::default();
    let mut res = match pipeline(plane, live, req, peer, &mut info).await {
        Ok(res) => res,
        Err(e) => {
            match &e {
                ProxyError::RateLimited(_) if info.authenticated => {
                    plane.metrics.refused(Refusal::Proxy)
                }
                ProxyError::RateLimited(_) => plane.metrics.refused(Refusal::AuthFailures),
                _ => {}
            }
            e.into_response()
        }
    };
    plane.metrics.request(
        info.route.as_deref().unwrap_or(NO_ROUTE),
        res.status().as_u16(),
        info.upstream,
    );
    res.extensions_mut().insert(info);
    res
}

async fn pipeline(
    plane: &DataPlane,
    live: &Live,
    mut req: Request<Incoming>,
    peer: IpAddr,
    info: &mut AccessInfo,
) -> Result<Response<Body>, ProxyError> {
    let server = &live.config.server;
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > server.max_uri_length {
        return Err(ProxyError::UriTooLong(server.max_uri_length));
    }
    if let Some(max) = server.max_body_size {
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(ProxyError::BodyTooLarge(max));
        }
    }
    // From here on the path is the normalised one: the route is chosen by it and the
    // upstream gets exactly it.
    if let Some(normal) = path::normalize(req.uri().path(), server.allow_encoded_slashes)? {
        *req.uri_mut() = path::with_path(req.uri(), &normal)?;
    }
    let host = routes::request_host(req.uri(), req.headers());
    let route = live
        .routes
        .select(host, req.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    info.route = Some(route.1.name.clone());
    let verifiers = authenticate::Verifiers {
        keys: &plane.keys,
        passthrough: &plane.passthrough,
        master: &plane.master,
        upstream: &live.upstream,
        limits: &live.limits,
    };
    let grant = authenticate::authenticate(&verifiers, route, req.headers(), peer).await?;
    info.authenticated = true;
    if let authenticate::Grant::Key(p) = &grant {
        info.key_uid = Some(p.key_uid);
    }
    let admitted = limit::limit(live.quotas.as_ref(), route, &grant).await;
    if let (authenticate::Grant::Key(p), true) = (&grant, live.config.keys.track_usage) {
        plane.usage.note(
            p.key_uid,
            matches!(admitted, Err(ProxyError::RateLimited(_))),
        );
    }
    let admitted = admitted?;
    let added = inject::inject(&live.credentials, route, grant, &mut req)?;
    let sent = Instant::now();
    let forwarded = forward::forward(
        &live.upstream,
        route,
        added,
        req,
        (server.max_body_size, server.body_idle_timeout),
    )
    .await;
    info.upstream = Some(sent.elapsed());
    let mut res = forwarded?;
    res.headers_mut()
        .insert("ratelimit", crate::error::admission_header(&admitted));
    Ok(res)
}

#[cfg(test)]
mod future_size {
    use super::*;

    fn size_of_future<'a, F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'a DataPlane, &'a Live, Request<Incoming>, IpAddr) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every request's future is moved into a box (see `server.rs`): a memcpy of its whole
    /// size per request, whatever path the request takes. Rare paths with large futures (the
    /// passthrough validation call) are boxed where they are awaited so that they do not size
    /// it; 5,088 bytes before they were, 1,984 after (debug build). The bound leaves room for
    /// compiler versions, not for another inline path of kilobytes.
    #[test]
    fn the_request_future_stays_small() {
        let size = size_of_future(handle);
        assert!(
            size <= 3 * 1024,
            "the proxy's request future is {size} bytes"
        );
    }
}
