//! The data plane: one request, top to bottom.
//!
//! ```text
//! client ─TLS─▶ route ─▶ authenticate ─▶ limit ─▶ inject ─▶ forward ─▶ upstream
//!                404   401/403/429/502/503  429      503      502/504
//! ```
//!
//! Each stage is a function of its own file; `handle` always answers, errors become responses
//! in [`ProxyError::into_response`].

pub mod authenticate;
pub mod credentials;
pub mod forward;
pub mod inject;
pub mod limit;
pub mod passthrough;
pub mod routes;

use std::net::IpAddr;

use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::app::AppState;
use crate::error::ProxyError;
use crate::Body;

/// Serves one proxied request from `peer`.
pub async fn handle(state: &AppState, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    match pipeline(state, req, peer).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn pipeline(
    state: &AppState,
    mut req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<Body>, ProxyError> {
    let host = routes::request_host(req.uri(), req.headers());
    let route = state
        .routes
        .select(host, req.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    let grant = authenticate::authenticate(state, route, req.headers(), peer).await?;
    let ratelimit = limit::limit(&state.limits, route, &grant)?;
    let added = inject::inject(&state.credentials, route, grant, &mut req)?;
    let mut res = forward::forward(&state.upstream, route, added.secret.as_ref(), req).await?;
    res.headers_mut().insert("ratelimit", ratelimit);
    Ok(res)
}
