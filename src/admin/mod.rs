//! The control plane: `/healthz`, and the admin API (`/v1/api_key`, `/v1/ai_secret`,
//! `/v1/env_var`) with the Braintrust wire contract, so the official clients work unmodified.
//!
//! ```text
//!  OPTIONS /v1/...    ─▶ CORS preflight answer, no key needed (only /v1/... is cross-origin)
//!  /healthz           ─▶ 200, no key needed
//!  /, /ui/*           ─▶ the settings page (static; it signs in with an admin key itself)
//!  /readyz, /metrics  ─▶ no key needed
//!  anything else      ─▶ key ─▶ 401 (same body as the proxy's) / role admin? ─▶ 403
//!                     ─▶ route by path and method ─▶ 404 / 405
//!                     ─▶ resource handler ─▶ one store transaction ─▶ JSON
//! ```
//!
//! After a write, what the data plane caches is brought up to date before the answer goes out:
//! a deleted key is refused on the very next request, a changed secret is used by it.

pub mod ai_secrets;
pub mod api_keys;
pub mod audit;
pub mod env_vars;
mod ops;
pub mod request;
mod ui;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::app::AppState;
use crate::audit::Actor;
use crate::error::{json_response, AdminError};
use crate::keycache::LookupError;
use crate::store::{Principal, Role, StoreError};
use crate::Body;

/// Serves one admin request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let mut info = crate::access::AccessInfo {
        route: Some("admin".into()),
        ..Default::default()
    };
    // Only the admin API answers cross-origin: it needs a key. The ops endpoints, the page and
    // everything else stay same-origin, so no web page the operator visits can read them.
    let api = is_api_path(req.uri().path());
    let mut res = if req.method() == Method::OPTIONS && api {
        preflight(&req)
    } else {
        match route(state.clone(), req, peer, &mut info).await {
            Ok(res) => res,
            Err(e) => {
                if matches!(e, AdminError::RateLimited(_)) {
                    state.plane.metrics.refused(if info.authenticated {
                        crate::metrics::Refusal::Admin
                    } else {
                        crate::metrics::Refusal::AuthFailures
                    });
                }
                e.into_response()
            }
        }
    };
    res.extensions_mut().insert(info);
    if api {
        res.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    res
}

/// Whether `path` is under the admin API (`/v1/...`), the one part served cross-origin.
fn is_api_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// What a handler gets: the shared state and the authenticated admin.
pub struct Ctx {
    pub state: Arc<AppState>,
    pub principal: Principal,
    /// The admin key as the audit trail names it (id and preview).
    pub actor: Actor,
}

impl Ctx {
    /// Runs a store operation off the async threads.
    pub async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, AdminError> {
        self.blocking(f).await
    }

    /// Runs a shared action ([`crate::actions`]) off the async threads.
    pub async fn act<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> Result<T, crate::actions::ActionError> + Send + 'static,
    ) -> Result<T, AdminError> {
        self.blocking(f).await
    }

    async fn blocking<T: Send + 'static, E: Into<AdminError> + Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> Result<T, E> + Send + 'static,
    ) -> Result<T, AdminError> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| AdminError::Internal(format!("store task failed: {e}")))?
            .map_err(Into::into)
    }

    /// Runs `f(state, org_id, id)` for the caller's org and answers with the object it returns
    /// as `to_json` renders it, or a 404 naming `what`.
    pub async fn by_id<T: Send + 'static>(
        &self,
        what: &str,
        id: String,
        f: impl FnOnce(&AppState, &str, &str) -> Result<Option<T>, StoreError> + Send + 'static,
        to_json: fn(&T) -> serde_json::Value,
    ) -> Result<Response<Body>, AdminError> {
        let org = self.principal.org_id().to_owned();
        match self.store(move |s| f(s, &org, &id)).await? {
            Some(obj) => Ok(ok(to_json(&obj))),
            None => Err(AdminError::NotFound(format!("{what} not found"))),
        }
    }

    /// The org an `org_name` names, which must be the caller's; the caller's when absent.
    pub async fn org(&self, org_name: Option<&str>) -> Result<String, AdminError> {
        let Some(name) = org_name else {
            return Ok(self.principal.org_id().to_owned());
        };
        let owned = name.to_owned();
        let found = self.store(move |s| s.store.org_id_by_name(&owned)).await?;
        match found {
            Some(id) if id == self.principal.org_id() => Ok(id),
            _ => Err(AdminError::BadRequest(format!("unknown org_name {name:?}"))),
        }
    }
}

/// A 200 JSON answer.
pub fn ok(v: serde_json::Value) -> Response<Body> {
    json_response(StatusCode::OK, Bytes::from(v.to_string()))
}

async fn route(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: IpAddr,
    info: &mut crate::access::AccessInfo,
) -> Result<Response<Body>, AdminError> {
    let path = req.uri().path();
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    if path == "/healthz" {
        return match *req.method() {
            Method::GET | Method::HEAD => Ok(json_response(
                StatusCode::OK,
                Bytes::from_static(br#"{"status":"ok"}"#),
            )),
            _ => Err(AdminError::MethodNotAllowed("GET, HEAD")),
        };
    }
    if let Some(page) = ui::serve(&req, path) {
        return page;
    }
    match path {
        "/readyz" => return only_get(&req).map(|()| ops::readyz(&state)),
        "/metrics" => return only_get(&req).map(|()| ops::metrics(&state)),
        _ => {}
    }
    let (principal, actor, ratelimit) = authenticate(&state, req.headers(), peer, info).await?;
    if path == "/-/reload" {
        let mut res = ops::reload(&state, &req, actor).await?;
        res.headers_mut().insert("ratelimit", ratelimit);
        return Ok(res);
    }
    let Some((resource, id)) = api_path(path) else {
        return Err(no_endpoint(&req));
    };
    let id = id.map(request::parse_id).transpose()?;
    let ctx = Ctx {
        state,
        principal,
        actor,
    };
    let mut res = match resource {
        Some("api_key") => api_keys::handle(&ctx, req, id).await,
        Some("audit") => audit::handle(&ctx, req, id).await,
        Some("ai_secret") => ai_secrets::handle(&ctx, req, id).await,
        Some("env_var") => env_vars::handle(&ctx, req, id).await,
        _ => Err(no_endpoint(&req)),
    }?;
    res.headers_mut().insert("ratelimit", ratelimit);
    Ok(res)
}

/// `/v1/RESOURCE[/ID]` (with or without a trailing `/`) split into resource and id; `None` for
/// any other shape.
pub fn api_path(path: &str) -> Option<(Option<&str>, Option<&str>)> {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let (v1, resource, id) = (parts.next(), parts.next(), parts.next());
    (v1 == Some("v1") && !id.is_some_and(|i| i.contains('/'))).then_some((resource, id))
}

fn no_endpoint(req: &Request<Incoming>) -> AdminError {
    AdminError::NoEndpoint(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// The admin key of the request, and the `RateLimit` value of its admission. Failed attempts
/// count against the peer's allowance, as on the proxy listener.
async fn authenticate(
    state: &AppState,
    headers: &http::HeaderMap,
    peer: IpAddr,
    info: &mut crate::access::AccessInfo,
) -> Result<(Principal, Actor, HeaderValue), AdminError> {
    let live = state.live();
    let presented = crate::proxy::authenticate::presented_key(headers);
    if let Some(l) = live.limits.ip_blocked(peer) {
        // As on the proxy listener: a key cached as valid is never refused by the throttle.
        if presented.and_then(|k| state.plane.keys.cached(k)).is_none() {
            return Err(AdminError::RateLimited(l));
        }
    }
    let found = match presented {
        None => Ok(None),
        Some(key) => state.plane.keys.authenticate(key).await,
    };
    let principal = match found {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(match live.limits.auth_failed(peer) {
                Some(l) => AdminError::RateLimited(l),
                None => AdminError::Unauthorized,
            })
        }
        Err(LookupError::Stale) => return Err(AdminError::StoreUnavailable),
        Err(LookupError::Store(e)) => {
            tracing::error!(error = %e, "key lookup failed");
            return Err(AdminError::StoreUnavailable);
        }
    };
    info.authenticated = true;
    info.key_uid = Some(principal.key_uid);
    let track = live.config.keys.track_usage;
    if principal.role() != Role::Admin {
        if track {
            state.plane.usage.note(principal.key_uid, false);
        }
        return Err(AdminError::Forbidden);
    }
    let admitted = live.limits.check_admin(principal.key_uid);
    if track {
        state.plane.usage.note(principal.key_uid, admitted.is_err());
    }
    let ratelimit = admitted
        .map(|a| crate::error::admission_header(&a))
        .map_err(AdminError::RateLimited)?;
    // The preview is what every key list shows: the audit trail names the key by it and its
    // id, never by more of the key.
    let preview = presented.map_or_else(String::new, |k| {
        crate::crypto::key_preview(&crate::secret::Secret::new(k.to_owned()))
    });
    let actor = Actor::key_from(&principal, preview);
    Ok((principal, actor, ratelimit))
}

/// The CORS preflight answer. Auth travels in a header, never a cookie, so allowing any origin
/// opens no cross-site request forgery: a page still needs the key to do anything.
fn preflight(req: &Request<Incoming>) -> Response<Body> {
    let mut res = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        Bytes::new(),
    )));
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    let requested = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .all(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).is_ok())
            })
        })
        .cloned();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        requested.unwrap_or(HeaderValue::from_static(
            "authorization, content-type, x-api-key",
        )),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static("access-control-request-headers"),
    );
    res
}

/// GET and HEAD only.
fn only_get(req: &Request<Incoming>) -> Result<(), AdminError> {
    match *req.method() {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(AdminError::MethodNotAllowed("GET, HEAD")),
    }
}
