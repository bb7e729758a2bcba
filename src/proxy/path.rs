//! Stage 1: the request path, normalised once. The route is chosen on this path and exactly
//! this path is sent upstream, so an upstream that normalises (nginx, most frameworks) can never
//! see another path than the one keygate matched: `/v1/chat/../files/x` is `/v1/files/x` for
//! both.
//!
//! ```text
//!  raw path ─▶ percent-decode unreserved characters (%2e → ., %63 → c; RFC 3986 §6.2.2.2),
//!              upper-case the hex of the others
//!           ─▶ %2F / %5C / a literal \ ?  ──▶ 400, unless server.allow_encoded_slashes
//!           ─▶ merge // (as nginx does before it resolves dots)
//!           ─▶ remove . and .. segments (RFC 3986 §5.2.4) ─▶ climbs above / ? ──▶ 400
//!           ─▶ a `.;` or `..;` segment (a dot segment to Tomcat and Jetty) ──▶ 400
//! ```
//!
//! A path with none of `%`, `\`, `//` or `/.` is already normal and is not copied.

/// Why a request path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path has a malformed percent-encoding")]
    Malformed,
    #[error("the request path climbs above the root with ..")]
    AboveRoot,
    #[error("the request path has an encoded slash or backslash (%2F, %5C or \\)")]
    EncodedSlash,
    #[error("the request path has a dot segment with a parameter (.; or ..;)")]
    DotParameter,
}

/// The normalised form of `path`, or `None` when it is already normal. Paths that are not in
/// origin form (`*`) are left alone: no route matches them.
pub fn normalize(path: &str, allow_encoded_slashes: bool) -> Result<Option<String>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Ok(None);
    }
    let suspicious = b.iter().enumerate().any(|(i, &c)| {
        c == b'%' || c == b'\\' || (c == b'/' && matches!(b.get(i + 1), Some(b'/' | b'.')))
    });
    if !suspicious {
        return Ok(None);
    }
    let mut out: Vec<String> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    let mut trailing_slash = false;
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let seg = decode_segment(raw, allow_encoded_slashes)?;
        match seg.as_str() {
            "" | "." => trailing_slash = last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = last;
            }
            s => {
                if matches!(s.split(';').next(), Some("." | "..")) {
                    return Err(PathError::DotParameter);
                }
                out.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(path.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        normal.push('/');
    }
    Ok((normal != path).then_some(normal))
}

/// `uri` with its path replaced by `path` (the query kept as it was).
pub fn with_path(uri: &http::Uri, path: &str) -> Result<http::Uri, PathError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.try_into().map_err(|_| PathError::Malformed)?);
    http::Uri::from_parts(parts).map_err(|_| PathError::Malformed)
}

/// One segment with unreserved characters decoded and other escapes upper-cased.
fn decode_segment(raw: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
                    return Err(PathError::Malformed);
                };
                let byte = (hi * 16 + lo) as u8;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(byte as char);
                } else if matches!(byte, b'/' | b'\\') && !allow_encoded_slashes {
                    return Err(PathError::EncodedSlash);
                } else {
                    out.push_str(&format!("%{byte:02X}"));
                }
                i += 3;
            }
            b'\\' if !allow_encoded_slashes => return Err(PathError::EncodedSlash),
            _ => {
                // Up to the next escape in one piece; `%` and `\` are ASCII, so this never
                // splits a UTF-8 sequence.
                let end = b[i..]
                    .iter()
                    .position(|c| *c == b'%' || *c == b'\\')
                    .map_or(b.len(), |p| i + p.max(1));
                out.push_str(&raw[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, false).map(|o| o.unwrap_or_else(|| p.to_owned()))
    }

    #[test]
    fn normal_paths_are_not_copied() {
        for p in [
            "/",
            "/v1/chat",
            "/v1/chat/",
            "/a.b/c..d/.e",
            "/x;y=1",
            "*",
            "/a-b_c~d",
        ] {
            assert_eq!(normalize(p, false), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_go_as_nginx_resolves_them() {
        assert_eq!(
            n("/v1/chat/../files/secret-doc").unwrap(),
            "/v1/files/secret-doc"
        );
        assert_eq!(n("/v1/chat/%2e%2e/files/x").unwrap(), "/v1/files/x");
        assert_eq!(n("/v1/chat/%2E%2e/files/x").unwrap(), "/v1/files/x");
        assert_eq!(n("/v1/chat/.%2e/files/x").unwrap(), "/v1/files/x");
        assert_eq!(n("/v1/chat/./../files/x").unwrap(), "/v1/files/x");
        assert_eq!(n("/v1/chat//../files/x").unwrap(), "/v1/files/x");
        assert_eq!(n("/v1/chat/a/./b/../c").unwrap(), "/v1/chat/a/c");
        assert_eq!(n("/a/../b/x").unwrap(), "/b/x");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("//").unwrap(), "/");
        assert_eq!(n("/v1//chat///x").unwrap(), "/v1/chat/x");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept() {
        assert_eq!(n("/v1/%63hat/x").unwrap(), "/v1/chat/x");
        assert_eq!(n("/v1/a%7eb%2Dc").unwrap(), "/v1/a~b-c");
        assert_eq!(n("/v1/a%20b%3f").unwrap(), "/v1/a%20b%3F");
        assert_eq!(n("/v1/%C3%A9").unwrap(), "/v1/%C3%A9");
        assert_eq!(n("/v1/é%41").unwrap(), "/v1/éA");
    }

    #[test]
    fn climbing_slashes_and_bad_escapes_are_refused() {
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/v1/../../x"), Err(PathError::AboveRoot));
        assert_eq!(n("/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/v1/chat%2F..%2Ffiles"), Err(PathError::EncodedSlash));
        assert_eq!(n("/v1/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/v1/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/v1/a\\b"), Err(PathError::EncodedSlash));
        assert_eq!(n("/v1/%zz"), Err(PathError::Malformed));
        assert_eq!(n("/v1/%4"), Err(PathError::Malformed));
        assert_eq!(n("/v1/chat/..;/files"), Err(PathError::DotParameter));
        assert_eq!(n("/v1/chat/.;x/files"), Err(PathError::DotParameter));
    }

    #[test]
    fn encoded_slashes_can_be_kept_by_config() {
        assert_eq!(
            normalize("/v1/a%2fb/./c", true),
            Ok(Some("/v1/a%2Fb/c".to_owned()))
        );
        assert_eq!(normalize("/v1/a%2Fb", true), Ok(None));
    }
}
