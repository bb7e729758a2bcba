//! `GET /v1/audit` (an extension of the contract): the audit trail of the caller's org, newest
//! first, paged like the other lists (`limit`, `starting_after`, `ending_before`). Admin keys
//! only, as every `/v1` endpoint. Events carry no key, secret or env var value; their MACs
//! stay in the store (`keygate audit verify` checks them).

use http::Method;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;

use super::request::Params;
use super::{ok, Ctx};
use crate::error::AdminError;
use crate::store::AuditQuery;
use crate::Body;

/// The query parameters of the list.
const LIST_PARAMS: &[&str] = &["limit", "starting_after", "ending_before"];

/// Routes `/v1/audit`.
pub async fn handle(
    ctx: &Ctx,
    req: Request<Incoming>,
    id: Option<String>,
) -> Result<Response<Body>, AdminError> {
    if id.is_some() {
        return Err(AdminError::NoEndpoint(
            "no such endpoint: audit events are listed, not fetched one by one".into(),
        ));
    }
    if req.method() != Method::GET {
        return Err(AdminError::MethodNotAllowed("GET, OPTIONS"));
    }
    let (page, limit) = Params::parse(req.uri().query(), LIST_PARAMS)?.page()?;
    let q = AuditQuery {
        org_id: ctx.principal.org_id().to_owned(),
        page,
        limit,
    };
    let events = ctx.store(move |s| s.store.audit_events(&q)).await?;
    Ok(ok(json!({
        "objects": events.iter().map(|e| e.to_json()).collect::<Vec<_>>()
    })))
}
