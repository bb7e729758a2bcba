//! `/v1/env_var`: list, create (an existing name for the same object is returned unmodified),
//! replace (PUT), get, patch (`name` required, even unchanged), delete. Values are sealed at
//! rest and never returned; `used` is the time of last use or `null`.

use http::Method;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::request::{check_name, required_body, Params};
use super::{ok, Ctx};
use crate::app::AppState;
use crate::error::AdminError;
use crate::secret::Secret;
use crate::store::{EnvVarFilter, EnvVarRecord, EnvVarWrite, ObjectType, WriteMode};
use crate::Body;

/// The wire form of an env var (never the value).
pub fn to_json(e: &EnvVarRecord) -> Value {
    json!({
        "id": e.id,
        "object_type": e.object_type.as_str(),
        "object_id": e.object_id,
        "name": e.name,
        "created": e.created,
        "used": e.used,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteBody {
    object_type: String,
    object_id: String,
    name: String,
    #[serde(default)]
    value: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    name: String,
    #[serde(default)]
    value: Option<Secret>,
}

/// Routes `/v1/env_var[/{id}]`.
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
        (Method::GET, Some(id)) => {
            ctx.by_id(
                "env_var",
                id,
                |s, org, id| s.store.get_env_var(org, id),
                to_json,
            )
            .await
        }
        (Method::PATCH, Some(id)) => {
            let (parts, body) = req.into_parts();
            let b: PatchBody = required_body(&parts.headers, body).await?;
            check_env_name(&b.name)?;
            check_value(&b.value)?;
            let by = ctx.actor.clone();
            let patch = move |s: &AppState, org: &str, id: &str| {
                let rec = s.store.patch_env_var(org, id, &b.name, b.value, &by)?;
                s.refresh_credentials()?;
                Ok(rec)
            };
            ctx.by_id("env_var", id, patch, to_json).await
        }
        (Method::DELETE, Some(id)) => {
            let by = ctx.actor.clone();
            let delete = move |s: &AppState, org: &str, id: &str| {
                let rec = s.store.delete_env_var(org, id, &by)?;
                s.refresh_credentials()?;
                Ok(rec)
            };
            ctx.by_id("env_var", id, delete, to_json).await
        }
        (_, None) => Err(AdminError::MethodNotAllowed("GET, POST, PUT, OPTIONS")),
        (_, Some(_)) => Err(AdminError::MethodNotAllowed("GET, PATCH, DELETE, OPTIONS")),
    }
}

pub(crate) fn object_type(v: &str) -> Result<ObjectType, AdminError> {
    ObjectType::parse(v).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "`object_type` must be \"organization\", \"project\" or \"function\", not {v:?}"
        ))
    })
}

/// An env var name goes into a process environment: no `=` and no NUL there.
pub(crate) fn check_env_name(name: &str) -> Result<(), AdminError> {
    check_name("name", name)?;
    if name.contains('=') {
        return Err(AdminError::BadRequest("`name` must not contain `=`".into()));
    }
    Ok(())
}

pub(crate) fn check_value(v: &Option<Secret>) -> Result<(), AdminError> {
    if v.as_ref().is_some_and(|v| v.expose().contains('\0')) {
        return Err(AdminError::BadRequest(
            "`value` must not contain NUL characters".into(),
        ));
    }
    Ok(())
}

/// The query parameters of the list call, and the one that filters by name.
pub(crate) const LIST_PARAMS: &[&str] = &[
    "limit",
    "starting_after",
    "ending_before",
    "ids",
    "env_var_name",
    "object_type",
    "object_id",
];
pub(crate) const NAME_PARAM: &str = "env_var_name";

async fn list(ctx: &Ctx, req: &Request<Incoming>) -> Result<Response<Body>, AdminError> {
    let p = Params::parse(req.uri().query(), LIST_PARAMS)?;
    let q = p.list_query(ctx.principal.org_id(), NAME_PARAM)?;
    let f = EnvVarFilter {
        object_type: p.one("object_type")?.map(object_type).transpose()?,
        object_id: p.one("object_id")?.map(str::to_owned),
    };
    let found = ctx.store(move |s| s.store.list_env_vars(&q, &f)).await?;
    Ok(ok(
        json!({ "objects": found.iter().map(to_json).collect::<Vec<_>>() }),
    ))
}

async fn write(
    ctx: &Ctx,
    req: Request<Incoming>,
    mode: WriteMode,
) -> Result<Response<Body>, AdminError> {
    let (parts, body) = req.into_parts();
    let b: WriteBody = required_body(&parts.headers, body).await?;
    let ot = object_type(&b.object_type)?;
    check_name("object_id", &b.object_id)?;
    check_env_name(&b.name)?;
    check_value(&b.value)?;
    let org = ctx.principal.org_id().to_owned();
    let w = EnvVarWrite {
        object_type: ot,
        object_id: b.object_id,
        name: b.name,
        value: b.value,
    };
    let by = ctx.actor.clone();
    let rec = ctx
        .store(move |s| {
            let rec = s.store.write_env_var(&org, w, mode, &by)?;
            s.refresh_credentials()?;
            Ok(rec)
        })
        .await?;
    Ok(ok(to_json(&rec)))
}
