//! The settings page (`GET /` on the admin listener): plain HTML, CSS and JavaScript compiled
//! into the binary, so it works offline and needs no build step. The page signs in with an
//! admin key held in `sessionStorage` and calls the admin API on this origin with it as a
//! header; the page itself is public and carries nothing secret.
//!
//! Every asset is served with a strict Content-Security-Policy (scripts, styles and fetches
//! from this origin only; no inline script, no eval, no framing, no form posts), so text that
//! slips past the page's escaping still cannot run.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::error::AdminError;
use crate::Body;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The asset at `path`, if the page has one there.
fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" => Some((INDEX, "text/html; charset=utf-8")),
        "/ui/app.js" => Some((SCRIPT, "text/javascript; charset=utf-8")),
        "/ui/app.css" => Some((STYLE, "text/css; charset=utf-8")),
        _ => None,
    }
}

/// Serves the page's assets; `None` for any other path.
pub fn serve<B>(req: &Request<B>, path: &str) -> Option<Result<Response<Body>, AdminError>> {
    let (text, content_type) = asset(path)?;
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Some(Err(AdminError::MethodNotAllowed("GET, HEAD")));
    }
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Small, and must change with the binary: always revalidated.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(Ok(res))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_only_its_own_assets() {
        // The CSP forbids inline script and style; the page must not need them.
        assert!(!INDEX.contains("<script>"), "no inline script block");
        let handler = INDEX.match_indices(" on").any(|(i, _)| {
            let rest = &INDEX[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!handler, "no inline event handler attributes");
        assert!(!INDEX.contains("style="), "no inline style attributes");
        assert!(!INDEX.contains("<style"), "no style block");
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(INDEX.contains(r#"src="/ui/app.js""#) && INDEX.contains(r#"href="/ui/app.css""#));
        // Text from the API goes in with textContent only.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("outerHTML"));
        assert!(!SCRIPT.contains("insertAdjacentHTML") && !SCRIPT.contains("document.write"));
        assert!(!SCRIPT.contains("eval(") && !SCRIPT.contains("new Function"));
        assert!(!SCRIPT.contains("localStorage") && !SCRIPT.contains("document.cookie"));
    }

    #[test]
    fn assets_carry_the_security_headers() {
        for path in ["/", "/ui/app.js", "/ui/app.css"] {
            let req = Request::get(path).body(()).unwrap();
            let res = serve(&req, path).unwrap().unwrap();
            let h = res.headers();
            assert_eq!(h["content-security-policy"], CSP);
            assert_eq!(h["x-frame-options"], "DENY");
            assert_eq!(h["referrer-policy"], "no-referrer");
            assert_eq!(h["x-content-type-options"], "nosniff");
        }
        let req = Request::post("/").body(()).unwrap();
        assert!(serve(&req, "/").unwrap().is_err());
        assert!(serve(&req, "/ui/other.js").is_none());
    }
}
