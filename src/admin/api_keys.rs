//! `/v1/api_key`: list, create (the raw key in this one answer), get, delete.
//!
//! Extension fields: `role` (`"proxy"` by default, or `"admin"`) and `routes` (the route names
//! the key may use; absent or `null`: all) in the create body; `role`, `routes` and `exposed`
//! (when the key was seen over cleartext, or `null`) in every object, with its usage:
//! `last_used` (RFC 3339, or `null`), `request_count` and `rate_limited_count`, as of the last
//! usage flush (`keys.usage_flush_interval`). The official clients ignore fields they do not
//! know.

use http::Method;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::request::{json_body, Params};
use super::{ok, Ctx};
use crate::actions;
use crate::app::AppState;
use crate::config::LimitSpec;
use crate::error::AdminError;
use crate::store::{ApiKeyRecord, Role};
use crate::Body;

/// The wire form of a key record (never the key).
pub fn to_json(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "created": k.created,
        "name": k.name,
        "preview_name": k.preview_name,
        "user_id": k.user_id,
        "org_id": k.org_id,
        "user_email": null,
        "user_given_name": null,
        "user_family_name": null,
        "role": k.role.as_str(),
        "exposed": k.exposed,
        "routes": k.routes,
        "rate_limit": k.limit.map(|l| json!({"per_second": l.per_second(), "burst": l.burst})),
        "last_used": k.last_used,
        "request_count": k.request_count,
        "rate_limited_count": k.rate_limited_count,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    name: String,
    #[serde(default)]
    org_name: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    routes: Option<Vec<String>>,
    #[serde(default)]
    rate_limit: Option<RateLimitBody>,
}

/// The `rate_limit` extension field: a key's own quota.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitBody {
    per_second: f64,
    burst: u32,
}

impl RateLimitBody {
    pub(crate) fn spec(&self) -> Result<LimitSpec, AdminError> {
        Ok(actions::limit_spec(
            "rate_limit",
            self.per_second,
            self.burst,
        )?)
    }
}

/// `PATCH /v1/api_key/{id}` (an extension: the contract has no key update): sets or, with
/// `null`, clears the key's own quota. Takes effect on the key's next request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    rate_limit: Option<RateLimitBody>,
}

/// Routes `/v1/api_key[/{id}]`.
pub async fn handle(
    ctx: &Ctx,
    req: Request<Incoming>,
    id: Option<String>,
) -> Result<Response<Body>, AdminError> {
    if req.method() != Method::GET || id.is_some() {
        Params::parse(req.uri().query(), &[])?; // only lists take query parameters
    }
    match (req.method().clone(), id) {
        (Method::GET, None) => list(ctx, &req).await,
        (Method::POST, None) => create(ctx, req).await,
        (Method::GET, Some(id)) => {
            ctx.by_id(
                "api_key",
                id,
                |s, org, id| s.store.get_api_key(org, id),
                to_json,
            )
            .await
        }
        (Method::PATCH, Some(id)) => {
            let (parts, body) = req.into_parts();
            let b: PatchBody = super::request::required_body(&parts.headers, body).await?;
            let limit = b.rate_limit.as_ref().map(RateLimitBody::spec).transpose()?;
            let by = ctx.principal.key_id();
            let actor = ctx.actor.clone();
            let patch = move |s: &AppState, org: &str, id: &str| {
                let rec = s.store.set_api_key_limit(org, id, limit, &actor)?;
                s.keys_changed()?;
                if let Some(k) = &rec {
                    tracing::info!(key_id = %k.id, by = %by, "key quota changed through the admin API");
                }
                Ok(rec)
            };
            ctx.by_id("api_key", id, patch, to_json).await
        }
        (Method::DELETE, Some(id)) => {
            let by = ctx.principal.key_id();
            let actor = ctx.actor.clone();
            let delete = move |s: &AppState, org: &str, id: &str| {
                let rec = s.store.delete_api_key(Some(org), id, &actor)?;
                s.keys_changed()?;
                if let Some(k) = &rec {
                    tracing::info!(key_id = %k.id, by = %by, "key deleted through the admin API");
                }
                Ok(rec)
            };
            ctx.by_id("api_key", id, delete, to_json).await
        }
        (_, None) => Err(AdminError::MethodNotAllowed("GET, POST, OPTIONS")),
        (_, Some(_)) => Err(AdminError::MethodNotAllowed("GET, PATCH, DELETE, OPTIONS")),
    }
}

/// The query parameters of the list call, and the one that filters by name.
pub(crate) const LIST_PARAMS: &[&str] = &[
    "limit",
    "starting_after",
    "ending_before",
    "ids",
    "api_key_name",
    "org_name",
];
pub(crate) const NAME_PARAM: &str = "api_key_name";

async fn list(ctx: &Ctx, req: &Request<Incoming>) -> Result<Response<Body>, AdminError> {
    let p = Params::parse(req.uri().query(), LIST_PARAMS)?;
    let org = ctx.org(p.one("org_name")?).await?;
    let q = p.list_query(&org, NAME_PARAM)?;
    let keys = ctx.store(move |s| s.store.list_api_keys(&q)).await?;
    Ok(ok(
        json!({ "objects": keys.iter().map(to_json).collect::<Vec<_>>() }),
    ))
}

async fn create(ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, AdminError> {
    let (parts, body) = req.into_parts();
    let b: CreateBody = json_body(&parts.headers, body)
        .await?
        .ok_or_else(|| AdminError::BadRequest("a JSON body with `name` is required".into()))?;
    let role = match b.role.as_deref() {
        None => Role::Proxy,
        Some(r) => Role::parse(r).ok_or_else(|| {
            AdminError::BadRequest(format!("`role` must be \"proxy\" or \"admin\", not {r:?}"))
        })?,
    };
    let limit = b.rate_limit.as_ref().map(RateLimitBody::spec).transpose()?;
    let org = ctx.org(b.org_name.as_deref()).await?;
    let user = ctx.principal.user_id().to_owned();
    let actor = ctx.actor.clone();
    let new = actions::NewKeys {
        name: b.name,
        role,
        routes: b.routes,
        limit,
        count: 1,
    };
    let (key, rec) = ctx
        .act(move |s| {
            let live = s.live();
            let made = actions::create_keys(
                s.store.as_ref(),
                &s.plane.master,
                (&org, &user),
                &live.config.routes,
                new,
                &actor,
            )?;
            s.keys_changed()?;
            made.into_iter()
                .next()
                .ok_or_else(|| actions::ActionError::Invalid("no key was created".into()))
        })
        .await?;
    tracing::info!(key_id = %rec.id, role = rec.role.as_str(), by = %ctx.principal.key_id(), "key created through the admin API");
    let mut v = to_json(&rec);
    v["key"] = Value::String(key.expose().to_owned());
    Ok(ok(v))
}
