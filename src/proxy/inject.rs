//! Stage 3: strip what must not reach the upstream, then add exactly one credential.
//!
//! Removed: `x-api-key`, the client's `Authorization` and `Proxy-Authorization`, the hop-by-hop
//! headers of RFC 9110 §7.6.1, every header named in `Connection`, and `Host` (the client
//! rewrites it for the upstream). `TE: trailers` is the one `TE` value kept.

use http::header::{self, HeaderMap, HeaderName};
use hyper::body::Incoming;
use hyper::Request;

use super::credentials::{Credential, Credentials};
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
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Strips the request's own credentials and hop-by-hop headers and sets the route's credential.
pub fn inject(
    credentials: &Credentials,
    (index, route): (usize, &Route),
    req: &mut Request<Incoming>,
) -> Result<(), ProxyError> {
    let Credential::Ready(value) = credentials.get(index) else {
        return Err(ProxyError::NoCredential {
            route: route.prefix.clone(),
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
    headers.remove(super::authenticate::X_API_KEY);
    headers.remove(header::HOST);
    headers.insert(header::AUTHORIZATION, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
