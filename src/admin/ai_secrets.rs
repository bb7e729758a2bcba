//! `/v1/ai_secret`: list, create (an existing name is returned unmodified), replace (PUT; an
//! omitted `secret` keeps the stored one), delete by name (JSON body) or id, get, patch
//! (`metadata` deep-merged, `null` means "no change"). The value is never returned: only
//! `preview_secret`.

use http::Method;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::request::{check_name, json_body, required_body, Params};
use super::{ok, Ctx};
use crate::app::AppState;
use crate::error::AdminError;
use crate::secret::Secret;
use crate::store::{
    AiSecretPatch, AiSecretRecord, AiSecretWrite, SecretRef, StoreError, WriteMode,
};
use crate::Body;

/// The wire form of an ai_secret (never the value).
pub fn to_json(s: &AiSecretRecord) -> Value {
    json!({
        "id": s.id,
        "created": s.created,
        "updated_at": s.updated_at,
        "org_id": s.org_id,
        "name": s.name,
        "type": s.secret_type,
        "metadata": s.metadata,
        "preview_secret": s.preview_secret,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteBody {
    name: String,
    #[serde(default, rename = "type")]
    secret_type: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    secret: Option<Secret>,
    #[serde(default)]
    org_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    secret_type: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    secret: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteBody {
    name: String,
    #[serde(default)]
    org_name: Option<String>,
}

/// Routes `/v1/ai_secret[/{id}]`.
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
        (Method::POST, None) => write(ctx, req, WriteMode::CreateOrGet).await,
        (Method::PUT, None) => write(ctx, req, WriteMode::Replace).await,
        (Method::DELETE, None) => {
            let (parts, body) = req.into_parts();
            let b: DeleteBody = required_body(&parts.headers, body).await?;
            ctx.org(b.org_name.as_deref()).await?;
            let by = ctx.actor.clone();
            ctx.by_id(
                "ai_secret",
                b.name,
                move |s, org, name| delete(s, org, SecretRef::Name(name), &by),
                to_json,
            )
            .await
        }
        (Method::GET, Some(id)) => {
            ctx.by_id(
                "ai_secret",
                id,
                |s, org, id| s.store.get_ai_secret(org, id),
                to_json,
            )
            .await
        }
        (Method::PATCH, Some(id)) => patch(ctx, req, id).await,
        (Method::DELETE, Some(id)) => {
            let by = ctx.actor.clone();
            ctx.by_id(
                "ai_secret",
                id,
                move |s, org, id| delete(s, org, SecretRef::Id(id), &by),
                to_json,
            )
            .await
        }
        (_, None) => Err(AdminError::MethodNotAllowed(
            "GET, POST, PUT, DELETE, OPTIONS",
        )),
        (_, Some(_)) => Err(AdminError::MethodNotAllowed("GET, PATCH, DELETE, OPTIONS")),
    }
}

/// The query parameters of the list call, and the one that filters by name.
pub(crate) const LIST_PARAMS: &[&str] = &[
    "limit",
    "starting_after",
    "ending_before",
    "ids",
    "ai_secret_name",
    "org_name",
    "ai_secret_type",
];
pub(crate) const NAME_PARAM: &str = "ai_secret_name";

fn delete(
    s: &AppState,
    org: &str,
    r: SecretRef<'_>,
    by: &crate::audit::Actor,
) -> Result<Option<AiSecretRecord>, StoreError> {
    let rec = s.store.delete_ai_secret(org, r, by)?;
    s.refresh_credentials()?;
    Ok(rec)
}

async fn list(ctx: &Ctx, req: &Request<Incoming>) -> Result<Response<Body>, AdminError> {
    let p = Params::parse(req.uri().query(), LIST_PARAMS)?;
    let org = ctx.org(p.one("org_name")?).await?;
    let q = p.list_query(&org, NAME_PARAM)?;
    let types = p.many("ai_secret_type");
    let found = ctx
        .store(move |s| s.store.list_ai_secrets(&q, &types))
        .await?;
    Ok(ok(
        json!({ "objects": found.iter().map(to_json).collect::<Vec<_>>() }),
    ))
}

pub(crate) fn check_type(t: &Option<String>) -> Result<(), AdminError> {
    match t {
        Some(t) => check_name("type", t),
        None => Ok(()),
    }
}

/// `metadata.additionalHeaders`, when present, follows the rules of `set_headers`: checked
/// here (400 naming the header) and again when the route's credential is built. In a PATCH,
/// `null` entries delete and are not headers.
fn check_metadata(metadata: Option<&Map<String, Value>>) -> Result<(), AdminError> {
    let Some(extra) = metadata.and_then(|m| m.get("additionalHeaders")) else {
        return Ok(());
    };
    if extra.is_null() {
        return Ok(());
    }
    let mut present = extra.clone();
    if let Some(obj) = present.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
    crate::proxy::headers::additional_headers(&present)
        .map(|_| ())
        .map_err(AdminError::BadRequest)
}

async fn write(
    ctx: &Ctx,
    req: Request<Incoming>,
    mode: WriteMode,
) -> Result<Response<Body>, AdminError> {
    let (parts, body) = req.into_parts();
    let b: WriteBody = required_body(&parts.headers, body).await?;
    check_name("name", &b.name)?;
    check_type(&b.secret_type)?;
    check_metadata(b.metadata.as_ref())?;
    let org = ctx.org(b.org_name.as_deref()).await?;
    let w = AiSecretWrite {
        name: b.name,
        secret_type: b.secret_type,
        metadata: b.metadata,
        secret: b.secret,
    };
    let by = ctx.actor.clone();
    let rec = ctx
        .store(move |s| {
            let rec = s.store.write_ai_secret(&org, w, mode, &by)?;
            s.refresh_credentials()?;
            Ok(rec)
        })
        .await?;
    Ok(ok(to_json(&rec)))
}

async fn patch(
    ctx: &Ctx,
    req: Request<Incoming>,
    id: String,
) -> Result<Response<Body>, AdminError> {
    let (parts, body) = req.into_parts();
    let b: Option<PatchBody> = json_body(&parts.headers, body).await?;
    let p = match b {
        None => AiSecretPatch::default(),
        Some(b) => {
            if let Some(n) = &b.name {
                check_name("name", n)?;
            }
            check_type(&b.secret_type)?;
            check_metadata(b.metadata.as_ref())?;
            AiSecretPatch {
                name: b.name,
                secret_type: b.secret_type,
                metadata: b.metadata,
                secret: b.secret,
            }
        }
    };
    let by = ctx.actor.clone();
    let patch = move |s: &AppState, org: &str, id: &str| {
        let rec = s.store.patch_ai_secret(org, id, p, &by)?;
        s.refresh_credentials()?;
        Ok(rec)
    };
    ctx.by_id("ai_secret", id, patch, to_json).await
}
