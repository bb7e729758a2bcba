//! The control plane listener. For now: `/healthz`. The admin API (`/v1/api_key`,
//! `/v1/ai_secret`, `/v1/env_var`) is built here next.

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::app::AppState;
use crate::error::{error_response, json_response};
use crate::Body;

/// Serves one admin request.
pub async fn handle(_state: &AppState, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
        }
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}
