//! Stage 3: strip what must not reach the upstream, then add exactly one credential.
//!
//! Removed: the client's credentials of every kind (`Authorization`, `x-api-key`,
//! `x-goog-api-key`, `api-key`, `Proxy-Authorization`, and the route's own credential header),
//! the hop-by-hop headers of RFC 9110 §7.6.1, every header named in `Connection`, and `Host`
//! (the client rewrites it for the upstream). `TE: trailers` is the one `TE` value kept.
//! Then, in order: defaults the client did not send (`anthropic-version`), the credential (or
//! the validated passthrough key), and the route's extra headers.

use http::header::{self, HeaderMap, HeaderName};
use hyper::body::Incoming;
use hyper::Request;

use std::sync::Arc;

use super::authenticate::Grant;
use super::credentials::{Credential, Credentials, Resolved};
use crate::config::Route;
use crate::error::ProxyError;

/// Hop-by-hop headers, never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers and the headers `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        // By bytes, not `to_str`: a value with a non-ASCII byte must not hide the names in it.
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Credential headers of every kind keygate injects: the client's own are always removed.
const CLIENT_CREDENTIALS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-goog-api-key"),
    HeaderName::from_static("api-key"),
];

/// Strips the request's own credentials and hop-by-hop headers and adds what the route adds.
/// Returns the route's additions (the forward stage needs the secret for its reflection guard).
pub fn inject(
    credentials: &Credentials,
    (index, route): (usize, &Route),
    grant: Grant,
    req: &mut Request<Incoming>,
) -> Result<Arc<Resolved>, ProxyError> {
    let Credential::Ready(resolved) = credentials.get(index) else {
        return Err(ProxyError::NoCredential {
            route: route.name.to_string(),
        });
    };
    let headers = req.headers_mut();
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    headers.remove(header::TE);
    if keep_te {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
    for name in &CLIENT_CREDENTIALS {
        headers.remove(name);
    }
    if let Some(name) = &resolved.strip {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    for (name, value) in &resolved.defaults {
        if !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    for (name, value) in &resolved.credential {
        headers.insert(name.clone(), value.clone());
    }
    if let Grant::Passthrough { bearer, .. } = grant {
        headers.insert(header::AUTHORIZATION, bearer);
    }
    for (name, value) in &resolved.extra {
        headers.insert(name.clone(), value.clone());
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_are_honoured_even_next_to_non_ascii_bytes() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret-hop, \xff\xfe, keep-alive").unwrap(),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }
    use http::HeaderValue;

    #[test]
    fn connection_named_and_hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("x-foo, Authorization, keep-alive"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }
}
