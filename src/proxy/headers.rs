//! The header rules, in one place: what never crosses keygate (hop-by-hop headers, the
//! client's credentials), what a route or a secret may add (`set_headers`,
//! `metadata.additionalHeaders`), and what a trailer may carry. Headers and trailers go
//! through the same rules in both directions:
//!
//! ```text
//!  request headers   ─▶ hop-by-hop + client credentials removed ─▶ credential added
//!  request trailers  ─▶ hop-by-hop + client credentials + fields a trailer may not carry removed
//!  response headers  ─▶ hop-by-hop removed, any value echoing the injected secret removed
//!  response trailers ─▶ the same, plus fields a trailer may not carry
//! ```

use http::header::{self, HeaderMap, HeaderName};
use http::HeaderValue;

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

/// Credential headers of every kind keygate injects: the client's own are always removed.
pub const CLIENT_CREDENTIALS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-goog-api-key"),
    HeaderName::from_static("api-key"),
];

/// Besides the hop-by-hop ones, the names that frame or route a message: nothing keygate adds
/// may carry them (a `content-length` would truncate the body, a `host` would re-route it,
/// `expect` would stall it).
const FRAMING: [HeaderName; 5] = [
    header::HOST,
    header::TE,
    header::TRAILER,
    header::CONTENT_LENGTH,
    header::EXPECT,
];

/// Fields a trailer must not carry (RFC 9110 §6.5.1: framing, routing, request modifiers,
/// authentication, content description), dropped from trailers in both directions.
const NOT_IN_TRAILERS: [HeaderName; 20] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::WWW_AUTHENTICATE,
    header::PROXY_AUTHENTICATE,
    header::COOKIE,
    header::SET_COOKIE,
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::TE,
    header::EXPECT,
    header::MAX_FORWARDS,
    header::RANGE,
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::LOCATION,
];

/// The header names listed in every `list` field (`Connection`, `Trailer`): by bytes, not
/// `to_str`, so that a value with a non-ASCII byte cannot hide the names in it.
fn named_in(headers: &HeaderMap, list: HeaderName) -> Vec<HeaderName> {
    headers
        .get_all(list)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

/// Removes hop-by-hop headers and the headers `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = named_in(headers, header::CONNECTION);
    remove_where(headers, |n| HOP_BY_HOP.contains(n) || named.contains(n));
}

/// Removes the client's credentials (every kind, and the route's own credential header).
pub fn strip_client_credentials(headers: &mut HeaderMap, route_header: Option<&HeaderName>) {
    remove_where(headers, |n| {
        CLIENT_CREDENTIALS.contains(n) || route_header.is_some_and(|r| r == n)
    });
}

/// Removes every header whose name `doomed` picks. One pass over the names present (a request
/// has a handful, and usually none to remove) instead of a hashed lookup for each name that
/// could be: this runs on every request and response, both ways.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let found: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// A request trailer section on its way upstream: what a header section loses, and what no
/// trailer may carry.
pub fn filter_request_trailers(trailers: &mut HeaderMap, route_header: Option<&HeaderName>) {
    strip_hop_by_hop(trailers);
    strip_client_credentials(trailers, route_header);
    for name in &NOT_IN_TRAILERS {
        trailers.remove(name);
    }
}

/// Drops from a request's `Trailer` declaration the names [`filter_request_trailers`] removes,
/// so the upstream is not told to expect them.
pub fn prune_trailer_declaration(headers: &mut HeaderMap, route_header: Option<&HeaderName>) {
    if !headers.contains_key(header::TRAILER) {
        return;
    }
    let kept: Vec<HeaderName> = named_in(headers, header::TRAILER)
        .into_iter()
        .filter(|n| {
            !HOP_BY_HOP.contains(n)
                && !CLIENT_CREDENTIALS.contains(n)
                && !NOT_IN_TRAILERS.contains(n)
                && Some(n) != route_header
        })
        .collect();
    headers.remove(header::TRAILER);
    if kept.is_empty() {
        return;
    }
    let list = kept
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&list) {
        headers.insert(header::TRAILER, v);
    }
}

/// A response trailer section on its way to the client: hop-by-hop and trailer-forbidden
/// fields removed, and every field echoing `secret`.
pub fn filter_response_trailers(trailers: &mut HeaderMap, secret: Option<&[u8]>, route: &str) {
    strip_hop_by_hop(trailers);
    for name in &NOT_IN_TRAILERS {
        trailers.remove(name);
    }
    if let Some(secret) = secret {
        remove_echoes(trailers, secret, route, "trailer");
    }
}

/// Removes every field whose value contains `needle`, and says so (never with the value).
/// `section` is "header" or "trailer", for the log.
pub fn remove_echoes(headers: &mut HeaderMap, needle: &[u8], route: &str, section: &str) {
    if needle.is_empty() {
        return;
    }
    let finder = memchr::memmem::Finder::new(needle);
    let echoed: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, v)| finder.find(v.as_bytes()).is_some())
        .map(|(k, _)| k.clone())
        .collect();
    for name in echoed {
        headers.remove(&name);
        tracing::warn!(route = %route, %section, field = %name,
            "upstream response echoed the injected secret; field removed");
    }
}

/// The name of a header keygate adds to every request of a route (`set_headers`,
/// `metadata.additionalHeaders`), or why it may not be added. The value is checked when it is
/// known, with [`added_value`].
pub fn added_name(name: &str) -> Result<HeaderName, String> {
    let h = credential_name(name)?;
    if CLIENT_CREDENTIALS.contains(&h) {
        return Err(format!(
            "{name:?} is a credential header; the route's credential is injected from its ai_secret"
        ));
    }
    Ok(h)
}

/// The value of an added header as a sensitive header value, or why it is not one (control
/// characters, line breaks). Never names the value.
pub fn added_value(value: &str) -> Result<HeaderValue, &'static str> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| "value holds characters not allowed in an HTTP header")?;
    v.set_sensitive(true);
    Ok(v)
}

/// The header a route injects its credential in (`inject.header`): any valid name that does
/// not frame or route the message.
pub fn credential_name(name: &str) -> Result<HeaderName, String> {
    let h = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if HOP_BY_HOP.contains(&h) || FRAMING.contains(&h) {
        return Err(format!(
            "{name:?} is a framing or hop-by-hop header and cannot be set"
        ));
    }
    Ok(h)
}

/// Checks a `metadata.additionalHeaders` object: every entry a string value under an
/// allowed name, no name twice. Returns the headers, or why not (naming the header).
pub fn additional_headers(
    obj: &serde_json::Value,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let Some(map) = obj.as_object() else {
        return Err(
            "metadata.additionalHeaders must be an object of header names to strings".into(),
        );
    };
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(map.len());
    for (k, v) in map {
        let name = added_name(k).map_err(|why| format!("metadata.additionalHeaders: {why}"))?;
        let Some(s) = v.as_str() else {
            return Err(format!(
                "metadata.additionalHeaders.{name}: must be a string"
            ));
        };
        let value =
            added_value(s).map_err(|why| format!("metadata.additionalHeaders.{name}: {why}"))?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(format!(
                "metadata.additionalHeaders names {name} more than once"
            ));
        }
        out.push((name, value));
    }
    Ok(out)
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

    #[test]
    fn added_headers_may_not_frame_route_or_authenticate() {
        for bad in [
            "host",
            "Connection",
            "upgrade",
            "te",
            "trailer",
            "expect",
            "proxy-authorization",
            "x-api-key",
            "Authorization",
            "transfer-encoding",
            "content-length",
            "keep-alive",
            "api-key",
            "x-goog-api-key",
            "bad name",
            "",
        ] {
            let err = added_name(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!(added_name("x-team").unwrap(), "x-team");
        assert!(added_value("a\r\nb").is_err());
        assert!(added_value("ok value").unwrap().is_sensitive());
        // A route may still choose where its own credential goes.
        assert!(credential_name("x-api-key").is_ok());
        assert!(credential_name("content-length").is_err());
    }

    #[test]
    fn additional_headers_are_checked_whole() {
        let ok = serde_json::json!({"x-a": "1", "x-b": "2"});
        assert_eq!(additional_headers(&ok).unwrap().len(), 2);
        let twice = serde_json::json!({"X-A": "1", "x-a": "2"});
        assert!(additional_headers(&twice)
            .unwrap_err()
            .contains("more than once"));
        let number = serde_json::json!({"x-a": 1});
        assert!(additional_headers(&number).unwrap_err().contains("x-a"));
        let host = serde_json::json!({"host": "evil"});
        assert!(additional_headers(&host).unwrap_err().contains("\"host\""));
        assert!(additional_headers(&serde_json::json!(["x"])).is_err());
    }

    #[test]
    fn trailers_lose_credentials_and_echoes() {
        let mut t = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "sk-client"),
            ("authorization", "Bearer sk-client"),
            ("cookie", "k=sk-client"),
            ("x-ok", "1"),
        ] {
            t.insert(k, HeaderValue::from_static(v));
        }
        filter_request_trailers(&mut t, None);
        assert_eq!(t.len(), 1);
        assert_eq!(t["x-ok"], "1");
        let mut h = HeaderMap::new();
        h.insert(
            header::TRAILER,
            HeaderValue::from_static("x-api-key, Authorization, cookie, x-ok, x-mine"),
        );
        prune_trailer_declaration(&mut h, Some(&HeaderName::from_static("x-mine")));
        assert_eq!(h[header::TRAILER], "x-ok");
        let mut t = HeaderMap::new();
        t.insert("x-echo-t", HeaderValue::from_static("Bearer sk-up"));
        t.insert("x-ok", HeaderValue::from_static("1"));
        filter_response_trailers(&mut t, Some(b"sk-up"), "r");
        assert_eq!(t.len(), 1);
        assert_eq!(t["x-ok"], "1");
    }
}
