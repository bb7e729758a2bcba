//! Stage 5: strip what must not reach the upstream, then add exactly one credential.
//!
//! Removed: the client's credentials of every kind (`Authorization`, `x-api-key`,
//! `x-goog-api-key`, `api-key`, `Proxy-Authorization`, and the route's own credential header),
//! the hop-by-hop headers of RFC 9110 §7.6.1, every header named in `Connection`, and `Host`
//! (the client rewrites it for the upstream). `TE: trailers` is the one `TE` value kept.
//! Then, in order: defaults the client did not send (`anthropic-version`), the credential (or
//! the validated passthrough key), and the route's extra headers.

use http::header;
use hyper::body::Incoming;
use hyper::Request;

use std::sync::Arc;

use super::authenticate::Grant;
use super::credentials::{Credential, Credentials, Resolved};
use super::headers::{prune_trailer_declaration, strip_client_credentials, strip_hop_by_hop};
use crate::config::Route;
use crate::error::ProxyError;

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
    strip_client_credentials(headers, resolved.strip.as_ref());
    prune_trailer_declaration(headers, resolved.strip.as_ref());
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
