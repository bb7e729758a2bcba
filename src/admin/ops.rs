//! Operations endpoints of the admin listener: `/readyz` and `/metrics` (no key needed: they
//! carry no key, secret or client-chosen text), and `/-/reload` (admin key).

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::app::AppState;
use crate::error::{json_response, AdminError};
use crate::metrics::Snapshot;
use crate::Body;

/// 200 when keygate can serve: the key store was read within the staleness bound (so the key
/// list is fresh) and the listener certificate has not expired; else 503 with the reasons.
pub fn readyz(state: &AppState) -> Response<Body> {
    let live = state.live();
    let staleness = state.plane.keys.staleness();
    let bound = live.config.keys.staleness_bound;
    let store_ok = staleness <= bound;
    let store = state.store.describe();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // The certificate was read when it was loaded; a file it could not be read from (never
    // the case for one that loaded) counts as not ok.
    let cert_ok = live.cert_not_after.is_some_and(|t| t > now);
    let reload = state
        .reload_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let body = json!({
        "status": if store_ok && cert_ok { "ready" } else { "not ready" },
        "checks": {
            "key_store": {
                "ok": store_ok,
                "backend": store.backend,
                "notifications": store.notifications,
                "last_error": *state.store_error.lock().unwrap_or_else(|p| p.into_inner()),
                "last_read_seconds_ago": (staleness.as_secs_f64() * 1000.0).round() / 1000.0,
                "bound_seconds": bound.as_secs_f64(),
            },
            "certificates": {
                "ok": cert_ok,
                "expires_unix": live.cert_not_after,
            },
        },
        // Not a readiness check: while Redis is away each instance limits on its own. The
        // Redis URL is not shown (it may hold a password).
        "limits": {
            "backend": if state.fleet.is_some() { "redis" } else { "local" },
            "degraded": state.fleet.as_ref().is_some_and(|f| f.degraded()),
        },
        "config": {
            "generation": live.generation,
            "routes": live.config.routes.len(),
            "last_reload_error": reload.error,
            "needs_restart": reload.needs_restart,
        },
    });
    let status = if store_ok && cert_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, Bytes::from(body.to_string()))
}

/// The Prometheus text exposition (format 0.0.4, written by `prometheus-client`).
pub fn metrics(state: &AppState) -> Response<Body> {
    let live = state.live();
    let (hits, misses) = state.plane.keys.stats();
    let text = state.plane.metrics.render(&Snapshot {
        key_cache_entries: state.plane.keys.len(),
        key_cache_hits: hits,
        key_cache_misses: misses,
        key_store_staleness: state.plane.keys.staleness(),
        limiter_tracked: live.limits.tracked(),
        config_generation: live.generation,
    });
    let mut res = Response::new(Body::Right(http_body_util::Full::new(Bytes::from(text))));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    res
}

/// `GET /-/reload`: the outcome of the last reload. `POST /-/reload`: reload now (as SIGHUP
/// does); 200 when applied, 422 with the reason when the file was refused.
pub async fn reload(
    state: &AppState,
    req: &Request<Incoming>,
    actor: crate::audit::Actor,
) -> Result<Response<Body>, AdminError> {
    let outcome = match *req.method() {
        Method::GET | Method::HEAD => None,
        Method::POST => Some(state.reload_by(actor).await),
        _ => return Err(AdminError::MethodNotAllowed("GET, HEAD, POST")),
    };
    let status = state
        .reload_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let generation = state.live().generation;
    let (code, body) = match outcome {
        Some(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "error": format!("config reload refused, the running config stays: {e}"),
                "generation": generation,
            }),
        ),
        _ => (
            StatusCode::OK,
            json!({
                "status": if outcome.is_some() { "applied" } else if status.error.is_some() { "last reload refused" } else { "ok" },
                "generation": generation,
                "last_attempt_unix": status.attempted_at,
                "last_error": status.error,
                "needs_restart": status.needs_restart,
            }),
        ),
    };
    Ok(json_response(code, Bytes::from(body.to_string())))
}
