//! Errors that become responses: `ProxyError` for the data plane, with its ONE mapping to a
//! status and a JSON body. A new variant must be placed in the `match` below (no `_` arm).
//!
//! Bodies of 5xx answers say nothing about internals; the log line carries the source chain.
//! Bodies and log lines never carry a key or a secret.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::proxy::limit::{Admitted, Refused};
use crate::Body;

/// Everything that can stop a proxied request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Missing, malformed, unknown or revoked key: one answer for all of them.
    #[error("unauthorized")]
    Unauthorized,
    /// The key store could not be read for longer than the staleness bound: fail closed.
    #[error("key store unavailable beyond the staleness bound")]
    StoreUnavailable,
    /// No route matches the path.
    #[error("no route matches the request path")]
    NoRoute,
    /// The key is valid but may not use this route.
    #[error("key may not use route {route}")]
    Forbidden { route: String },
    /// Over a rate limit (the key's, the route's, or the IP's for failed authentication).
    #[error("rate limit exceeded")]
    RateLimited(crate::proxy::limit::Refused),
    /// A passthrough key could not be validated: the upstream failed, not the key.
    #[error("passthrough key validation failed")]
    PassthroughValidation,
    /// The route's credential does not exist (yet).
    #[error("route {route} has no credential configured")]
    NoCredential { route: String },
    /// The upstream could not be reached (refused, DNS, TCP).
    #[error("upstream connection failed")]
    UpstreamConnect(#[source] hyper_util::client::legacy::Error),
    /// The upstream's certificate did not verify.
    #[error("upstream TLS verification failed")]
    UpstreamTls(#[source] hyper_util::client::legacy::Error),
    /// No response headers within the configured timeout.
    #[error("upstream sent no response headers in time")]
    UpstreamTimeout,
    /// Any other failure talking to the upstream.
    #[error("upstream request failed")]
    Upstream(#[source] hyper_util::client::legacy::Error),
    /// The request target is longer than `server.max_uri_length`.
    #[error("request URI too long")]
    UriTooLong(usize),
    /// The request path cannot be normalised safely (climbs above the root, encoded slash, …).
    #[error("bad request path: {0}")]
    BadPath(#[from] crate::proxy::path::PathError),
    /// The body is larger than `server.max_body_size` (declared, or found while streaming).
    #[error("request body too large")]
    BodyTooLarge(u64),
    /// The client left the upstream waiting for body data longer than the idle timeout.
    #[error("request body timed out")]
    BodyTimeout,
    /// The client's body broke off or had bad framing while it was being forwarded.
    #[error("malformed or incomplete request body")]
    BadRequestBody,
    /// A bug or an impossible state; details only in the log.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The one 401 body, byte for byte the same whatever the reason.
pub(crate) const UNAUTHORIZED_BODY: &str =
    r#"{"error":"unauthorized: send a valid keygate key in x-api-key or Authorization: Bearer"}"#;

impl ProxyError {
    /// The response this error becomes, after logging it at the level it deserves.
    pub fn into_response(self) -> Response<Body> {
        let (status, message): (StatusCode, std::borrow::Cow<'static, str>) = match &self {
            ProxyError::Unauthorized => {
                return unauthorized();
            }
            ProxyError::StoreUnavailable => {
                tracing::error!(error = %self, "failing closed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "key store unavailable: try again when it is back".into(),
                )
            }
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no route matches this path".into()),
            ProxyError::Forbidden { route } => (
                StatusCode::FORBIDDEN,
                format!("this key may not use route {route}").into(),
            ),
            ProxyError::RateLimited(l) => return rate_limited(l),
            ProxyError::PassthroughValidation => (
                StatusCode::BAD_GATEWAY,
                "the upstream could not validate the key".into(),
            ),
            ProxyError::NoCredential { route } => {
                tracing::warn!(route = %route, "request refused: route has no credential configured");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("route {route} has no credential configured").into(),
                )
            }
            ProxyError::UpstreamConnect(e) => {
                tracing::warn!(error = %chain(e), "upstream connection failed");
                (StatusCode::BAD_GATEWAY, "upstream connection failed".into())
            }
            ProxyError::UpstreamTls(e) => {
                tracing::error!(error = %chain(e), "upstream TLS verification failed");
                (
                    StatusCode::BAD_GATEWAY,
                    "upstream TLS verification failed".into(),
                )
            }
            ProxyError::UpstreamTimeout => {
                tracing::warn!("upstream sent no response headers within the timeout");
                (StatusCode::GATEWAY_TIMEOUT, "upstream timed out".into())
            }
            ProxyError::Upstream(e) => {
                tracing::warn!(error = %chain(e), "upstream request failed");
                (StatusCode::BAD_GATEWAY, "upstream request failed".into())
            }
            ProxyError::BadPath(why) => (StatusCode::BAD_REQUEST, why.to_string().into()),
            ProxyError::UriTooLong(max) => (
                StatusCode::URI_TOO_LONG,
                format!("request URI longer than {max} bytes").into(),
            ),
            ProxyError::BodyTooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {max} bytes").into(),
            ),
            ProxyError::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "the request body stopped arriving".into(),
            ),
            ProxyError::BadRequestBody => (
                StatusCode::BAD_REQUEST,
                "the request body is malformed or incomplete".into(),
            ),
            ProxyError::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        error_response(status, &message)
    }
}

/// The one 401 answer, with the challenge RFC 9110 §11.6.1 requires. `Bearer` names the
/// `Authorization` form; `x-api-key` works too, as the body says.
fn unauthorized() -> Response<Body> {
    let mut res = json_response(
        StatusCode::UNAUTHORIZED,
        Bytes::from_static(UNAUTHORIZED_BODY.as_bytes()),
    );
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"keygate\""),
    );
    res
}

/// The 429 answer: JSON error, `Retry-After`, `RateLimit-Policy` and `RateLimit`.
pub fn rate_limited(l: &Refused) -> Response<Body> {
    let mut res = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        Bytes::from_static(br#"{"error":"rate limit exceeded"}"#),
    );
    let h = res.headers_mut();
    for (name, value) in refusal_headers(l) {
        h.insert(name, value);
    }
    res
}

/// The headers of a refusal, from its numbers, whichever limiter refused: `Retry-After`,
/// `RateLimit` (`"policy";r=0;t=RETRY`) and `RateLimit-Policy` (`"policy";q=BURST;w=WINDOW`).
pub fn refusal_headers(l: &Refused) -> [(header::HeaderName, HeaderValue); 3] {
    [
        (header::RETRY_AFTER, HeaderValue::from(l.retry_after)),
        (
            header::HeaderName::from_static("ratelimit"),
            ratelimit_value(l.policy, 0, l.retry_after),
        ),
        (
            header::HeaderName::from_static("ratelimit-policy"),
            policy_value(l.policy, l.spec),
        ),
    ]
}

/// The `RateLimit` value of an admitted answer: `"policy";r=REMAINING;t=RESET`.
pub fn admission_header(a: &Admitted) -> HeaderValue {
    ratelimit_value(a.policy, a.remaining, a.reset)
}

/// `"policy";r=R;t=T` (draft-ietf-httpapi-ratelimit-headers, structured field form).
fn ratelimit_value(policy: &str, remaining: u32, reset: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{policy}\";r={remaining};t={reset}"))
        .unwrap_or(HeaderValue::from_static("\"default\";r=0;t=1"))
}

/// `"policy";q=BURST;w=WINDOW`, the window being the time to earn the whole burst back.
fn policy_value(policy: &str, spec: crate::config::LimitSpec) -> HeaderValue {
    let window = (f64::from(spec.burst) / spec.per_second()).ceil().max(1.0) as u64;
    HeaderValue::from_str(&format!("\"{policy}\";q={};w={window}", spec.burst))
        .unwrap_or(HeaderValue::from_static("\"default\";q=1;w=1"))
}

/// A JSON `{"error": message}` response.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
    json_response(status, Bytes::from(body))
}

/// A JSON response with the given body.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Either::Right(Full::new(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An error and its sources on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Everything that can stop an admin API call. Bodies say what is wrong with the request;
/// 5xx bodies say nothing about internals.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No valid key: the same 401 as the proxy's.
    #[error("unauthorized")]
    Unauthorized,
    /// A valid key without the admin role.
    #[error("forbidden")]
    Forbidden,
    /// The request is wrong; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// No object with that id (or name).
    #[error("{0}")]
    NotFound(String),
    /// No such endpoint.
    #[error("{0}")]
    NoEndpoint(String),
    /// The path exists, the method does not; carries the `Allow` value.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// The body is larger than the cap (bytes).
    #[error("body too large")]
    PayloadTooLarge(usize),
    /// The key store is unreadable beyond the staleness bound.
    #[error("key store unavailable")]
    StoreUnavailable,
    /// Over the admin API rate limit, or the IP's failed-authentication allowance.
    #[error("rate limit exceeded")]
    RateLimited(crate::proxy::limit::Refused),
    /// A bug or a store failure; details only in the log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for AdminError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Conflict(msg) => AdminError::BadRequest(msg),
            StoreError::Unavailable(detail) => {
                tracing::error!(detail = %detail, "key store unavailable");
                AdminError::StoreUnavailable
            }
            StoreError::UnknownCursor(id) => {
                AdminError::BadRequest(format!("pagination cursor {id} names no object"))
            }
            other => AdminError::Internal(other.to_string()),
        }
    }
}

impl From<crate::actions::ActionError> for AdminError {
    fn from(e: crate::actions::ActionError) -> Self {
        use crate::actions::ActionError;
        match e {
            ActionError::Invalid(msg) => AdminError::BadRequest(msg),
            ActionError::NotFound(msg) => AdminError::NotFound(msg),
            ActionError::Store(e) => e.into(),
            ActionError::Read(e) => AdminError::Internal(e.to_string()),
        }
    }
}

impl AdminError {
    /// The response this error becomes, after logging it at the level it deserves.
    pub fn into_response(self) -> Response<Body> {
        let (status, message): (StatusCode, std::borrow::Cow<'_, str>) = match &self {
            AdminError::Unauthorized => {
                return unauthorized();
            }
            AdminError::Forbidden => (
                StatusCode::FORBIDDEN,
                "this key has the proxy role; the admin API needs a key with the admin role".into(),
            ),
            AdminError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.as_str().into()),
            AdminError::NotFound(m) | AdminError::NoEndpoint(m) => {
                (StatusCode::NOT_FOUND, m.as_str().into())
            }
            AdminError::MethodNotAllowed(allow) => {
                let mut res = error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("method not allowed here; allowed: {allow}"),
                );
                res.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                return res;
            }
            AdminError::PayloadTooLarge(cap) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {cap} bytes").into(),
            ),
            AdminError::RateLimited(l) => return rate_limited(l),
            AdminError::StoreUnavailable => {
                tracing::error!("admin API failing closed: key store unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "key store unavailable: try again when it is back".into(),
                )
            }
            AdminError::Internal(detail) => {
                tracing::error!(detail = %detail, "admin API internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        error_response(status, &message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitSpec;

    /// The header bytes are the ones the in-process limiter always sent; both backends answer
    /// through these two functions.
    #[test]
    fn rate_limit_headers_from_numbers() {
        let spec = LimitSpec::new(0.2, 2).unwrap();
        let refused = Refused {
            policy: "default",
            spec,
            retry_after: 5,
        };
        let res = rate_limited(&refused);
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = res.headers();
        assert_eq!(h["retry-after"], "5");
        assert_eq!(h["ratelimit-policy"], "\"default\";q=2;w=10");
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=5");
        let admitted = Admitted::with("key", LimitSpec::new(100.0, 50).unwrap(), 49);
        assert_eq!(admission_header(&admitted), "\"key\";r=49;t=1");
        let full = Admitted::with("route", LimitSpec::new(0.5, 1).unwrap(), 0);
        assert_eq!(admission_header(&full), "\"route\";r=0;t=2");
        // A window under a second is reported as one.
        let fast = Refused::after(
            "admin",
            LimitSpec::new(1000.0, 5).unwrap(),
            std::time::Duration::from_millis(1),
        );
        let [retry, _, policy] = refusal_headers(&fast);
        assert_eq!(retry.1, "1");
        assert_eq!(policy.1, "\"admin\";q=5;w=1");
    }
}
