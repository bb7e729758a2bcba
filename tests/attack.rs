//! Regression tests from an attack review of keygate: each one describes a bug of the reviewed
//! commit and passes once it is fixed.
//!
//! Every test runs keygate on 127.0.0.1:0 (in-process, or the real binary where its log or
//! files matter), talks to it over real TLS that trusts only the per-run test CA, and asserts
//! both on what the client got and on what the recording fake upstream received. Raw clients
//! (h1 bytes, h2 frames) are used where the exact request matters. Test output never carries a
//! key or a secret: failures describe what was seen, not the values.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use keygate::config::Config;
use keygate::store::{issue_key, KeyOptions, Role, Store};
use serde_json::json;
use support::h2raw::{
    connect, connector, frame, hpack_lit, DATA_OR_END_STREAM, END_HEADERS, H2, T_CONTINUATION,
    T_DATA, T_GOAWAY, T_HEADERS, T_RST,
};
use support::harness::{wait_until, NO_LIMITS};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Set-up helpers
// ---------------------------------------------------------------------------------------------

/// Every limit out of the way, the admin API's too (NO_LIMITS leaves it at 20/s, burst 40):
/// for tests that make many calls and are not about quotas.
fn no_limits_at_all() -> String {
    format!("{NO_LIMITS}admin = {{ per_second = 100000, burst = 100000 }}\n")
}

/// A key of `role` limited to `routes` (by name), as `keygate keys create --route` makes it.
fn limited_key(kg: &Keygate, role: Role, routes: &[&str]) -> String {
    let (master, store) = kg.store();
    let t = store.tenant().unwrap();
    let (k, _) = issue_key(
        store.as_ref(),
        &master,
        (&t.org_id, &t.user_id),
        "limited",
        KeyOptions {
            role,
            routes: Some(routes.iter().map(|r| r.to_string()).collect()),
            limit: None,
        },
        &keygate::audit::Actor::Keygate,
    )
    .unwrap();
    k.expose().to_owned()
}

/// One `[[route]]` table.
fn route_toml(name: &str, prefix: &str, upstream: &str, secret: &str, more: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\n\
         inject = {{ ai_secret = \"{secret}\" }}\n{more}"
    )
}

/// A deterministic stream of well-formed keys nobody issued (`sk-` + 48 alphanumerics).
struct UnknownKeys(u64);

impl UnknownKeys {
    fn next_key(&mut self) -> String {
        const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut k = String::from("sk-");
        for _ in 0..48 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            k.push(ALNUM[(self.0 % ALNUM.len() as u64) as usize] as char);
        }
        k
    }
}

/// Whether any header value in `h` contains `needle`.
fn any_value_contains(h: &HeaderMap, needle: &str) -> bool {
    h.values()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(needle))
}

/// Whether `r` carries `needle` anywhere: headers, trailers, path or body.
fn carries(r: &Recorded, needle: &str) -> bool {
    any_value_contains(&r.headers, needle)
        || any_value_contains(&r.trailers, needle)
        || r.uri.to_string().contains(needle)
        || String::from_utf8_lossy(&r.body).contains(needle)
}

/// The `{"error": "..."}` text of a JSON error body, if it is one.
fn json_error(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("error")?
        .as_str()
        .map(str::to_owned)
}

/// Panics with every collected failure, one per line.
fn assert_none_failed(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TLS
// ---------------------------------------------------------------------------------------------

/// One response read off a raw connection.
#[derive(Debug, Default)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Decodes a chunked body (trailers ignored); None when incomplete or malformed.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Sends `request` (exactly these bytes) on a fresh TLS connection and reads until the server
/// closes or 5 s pass; returns the first response.
async fn h1_exchange(ca: &TestCa, addr: SocketAddr, request: &[u8]) -> Result<RawAnswer, String> {
    let mut s = connect(&connector(ca, b"http/1.1"), addr, b"http/1.1").await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(request).await?;
        s.flush().await
    })
    .await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(format!(
                "no complete response head ({} bytes read)",
                buf.len()
            ))
        }
    };
    let mut a = RawAnswer {
        status: r.code.unwrap_or(0),
        headers: r
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect(),
        body: Vec::new(),
    };
    let rest = &buf[head..];
    let header = |n: &str| {
        a.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    a.body = if let Some(cl) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest[..cl.min(rest.len())].to_vec()
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest).unwrap_or_default()
    } else {
        rest.to_vec()
    };
    Ok(a)
}

/// A keyed GET of `path` (written exactly as given) over raw HTTP/1.1.
async fn h1_get(ca: &TestCa, addr: SocketAddr, path: &str, key: &str) -> Result<RawAnswer, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
    );
    h1_exchange(ca, addr, req.as_bytes()).await
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2 frames, and just enough HPACK to read a response's :status
// ---------------------------------------------------------------------------------------------

/// An HPACK integer with a `prefix`-bit prefix: (value, bytes used).
fn hpack_int_decode(b: &[u8], prefix: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut v = usize::from(*b.first()?) & max;
    if v < max {
        return Some((v, 1));
    }
    let (mut shift, mut i) = (0, 1);
    loop {
        let c = *b.get(i)?;
        v += usize::from(c & 0x7f) << shift;
        shift += 7;
        i += 1;
        if c & 0x80 == 0 {
            return Some((v, i));
        }
        if shift > 28 {
            return None;
        }
    }
}

/// Huffman-coded digits (RFC 7541 appendix B: '0'-'2' are 5-bit codes, '3'-'9' 6-bit ones).
fn huffman_digits(raw: &[u8]) -> Option<String> {
    const CODES: [(u32, usize); 10] = [
        (0b00000, 5),
        (0b00001, 5),
        (0b00010, 5),
        (0b011001, 6),
        (0b011010, 6),
        (0b011011, 6),
        (0b011100, 6),
        (0b011101, 6),
        (0b011110, 6),
        (0b011111, 6),
    ];
    let total = raw.len() * 8;
    let bit = |i: usize| u32::from((raw[i / 8] >> (7 - i % 8)) & 1);
    let (mut out, mut pos) = (String::new(), 0);
    'next: while pos < total {
        if total - pos < 8 && (pos..total).all(|i| bit(i) == 1) {
            break; // EOS padding
        }
        for (digit, (code, len)) in CODES.iter().enumerate() {
            if pos + len <= total && (pos..pos + len).fold(0, |a, i| (a << 1) | bit(i)) == *code {
                out.push(char::from(b'0' + digit as u8));
                pos += len;
                continue 'next;
            }
        }
        return None;
    }
    Some(out)
}

/// The `:status` of the first response header block of a connection (no dynamic table needed:
/// it is the first field).
fn h2_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    while block.get(i)? & 0xe0 == 0x20 {
        i += hpack_int_decode(&block[i..], 5)?.1; // dynamic table size update
    }
    let b = block[i];
    if b & 0x80 != 0 {
        return match hpack_int_decode(&block[i..], 7)?.0 {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
    let (name, n) = hpack_int_decode(&block[i..], prefix)?;
    if !(8..=14).contains(&name) {
        return None;
    }
    i += n;
    let huffman = block.get(i)? & 0x80 != 0;
    let (len, n) = hpack_int_decode(&block[i..], 7)?;
    i += n;
    let raw = block.get(i..i + len)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

/// A request header block: the pseudo-headers, then `headers` in order.
fn h2_block(method: &str, path: &str, headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_lit(&mut b, ":method", method.as_bytes());
    hpack_lit(&mut b, ":scheme", b"https");
    hpack_lit(&mut b, ":path", path.as_bytes());
    hpack_lit(&mut b, ":authority", b"127.0.0.1");
    for (n, v) in headers {
        hpack_lit(&mut b, n, v);
    }
    b
}

/// What came back on stream 1.
#[derive(Debug, Default)]
struct H2Answer {
    status: Option<u16>,
    body: Vec<u8>,
    rst: Option<u32>,
    goaway: bool,
}

impl H2Answer {
    fn describe(&self) -> String {
        match (self.status, self.rst) {
            (Some(s), _) => s.to_string(),
            (None, Some(code)) => format!("RST_STREAM (code {code}) without a response"),
            (None, None) if self.goaway => "GOAWAY without a response".into(),
            _ => "no response within 5 s".into(),
        }
    }
}

/// Sends `block` as one request without a body on stream 1 of a fresh h2 connection (split
/// into HEADERS + CONTINUATION frames when over 16 KiB) and reads the answer.
async fn h2_exchange(ca: &TestCa, addr: SocketAddr, block: &[u8]) -> H2Answer {
    let mut h = H2::open(ca, addr).await;
    let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut bytes = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        let (ty, mut flags) = if i == 0 {
            (T_HEADERS, DATA_OR_END_STREAM)
        } else {
            (T_CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        bytes.extend(frame(ty, flags, 1, p));
    }
    let mut a = H2Answer::default();
    if !h.send(&bytes).await {
        a.goaway = true;
        return a;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some((ty, flags, sid, p)) = h.next(deadline).await {
        match (ty, sid) {
            (T_HEADERS, 1) => {
                if a.status.is_none() {
                    a.status = h2_status(&p);
                }
                if flags & DATA_OR_END_STREAM != 0 {
                    break;
                }
            }
            (T_DATA, 1) => {
                a.body.extend_from_slice(&p);
                if flags & DATA_OR_END_STREAM != 0 {
                    break;
                }
            }
            (T_RST, 1) => {
                a.rst = support::h2raw::rst_code(&p);
                break;
            }
            (T_GOAWAY, _) => {
                a.goaway = true;
                break;
            }
            _ => {}
        }
    }
    a
}

/// A keyed GET of `path` (sent exactly as given) over raw HTTP/2.
async fn h2_get(ca: &TestCa, addr: SocketAddr, path: &str, key: &str) -> H2Answer {
    h2_exchange(
        ca,
        addr,
        &h2_block("GET", path, &[("x-api-key", key.as_bytes())]),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Path normalisation
// ---------------------------------------------------------------------------------------------

const CHAT_SECRET: &str = "chat-secret-Qx81Lm";
const FILES_SECRET: &str = "files-secret-Wp27Zr";

/// Routes `chat` (/v1/chat, secret CHAT) and `files` (/v1/files, secret FILES) to one upstream,
/// and a key limited to route `chat`.
async fn chat_and_files(extra: &str) -> (TestCa, FakeUpstream, Keygate, String) {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let routes = route_toml("chat", "/v1/chat", &up.url(), "CHAT", "")
        + &route_toml("files", "/v1/files", &up.url(), "FILES", "");
    let extra = format!("{NO_LIMITS}{extra}");
    let kg = Keygate::start_toml(
        &ca,
        &extra,
        &routes,
        &[("CHAT", CHAT_SECRET), ("FILES", FILES_SECRET)],
    )
    .await;
    let chat_key = limited_key(&kg, Role::Proxy, &["chat"]);
    (ca, up, kg, chat_key)
}

/// Which route's secret a recorded request carried.
fn injected(r: &Recorded) -> &'static str {
    let auth = r
        .headers
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if auth == format!("Bearer {CHAT_SECRET}") {
        "the CHAT secret"
    } else if auth == format!("Bearer {FILES_SECRET}") {
        "the FILES secret"
    } else {
        "some other credential"
    }
}

/// What the upstream got since `before`, described without any secret.
fn got_since(up: &FakeUpstream, before: usize) -> String {
    let r = up.recorded();
    let new: Vec<String> = r[before.min(r.len())..]
        .iter()
        .map(|r| format!("{} with {}", r.uri, injected(r)))
        .collect();
    if new.is_empty() {
        "nothing".into()
    } else {
        new.join(", ")
    }
}

/// Paths that climb out of `/v1/chat` into `/v1/files`.
const TRAVERSALS: [&str; 5] = [
    "/v1/chat/../files/secret-doc",
    "/v1/chat/%2e%2e/files/secret-doc",
    "/v1/chat/%2E%2e/files/x",
    "/v1/chat/./../files/x",
    "/v1/chat//../files/x",
];

/// The controls that must hold for the traversal tests to mean anything.
async fn chat_controls(ca: &TestCa, kg: &Keygate, up: &FakeUpstream, chat_key: &str) {
    let ok = h1_get(ca, kg.proxy, "/v1/chat/ok", chat_key).await.unwrap();
    assert_eq!(ok.status, 201, "control: the chat key on /v1/chat");
    assert_eq!(injected(&up.recorded()[0]), "the CHAT secret");
    let no = h1_get(ca, kg.proxy, "/v1/files/x", chat_key).await.unwrap();
    assert_eq!(no.status, 403, "control: the chat key on /v1/files");
    assert_eq!(up.recorded().len(), 1, "control: a 403 forwards nothing");
}

/// 1: dot segments (plain, %2e-encoded, after `./` or `//`) cannot carry a key limited to route
/// `chat` into route `files`, over HTTP/1.1.
#[tokio::test]
async fn path_traversal_into_another_route_is_refused_over_h1() {
    let (ca, up, kg, chat_key) = chat_and_files("").await;
    chat_controls(&ca, &kg, &up, &chat_key).await;
    let mut failures = Vec::new();
    for p in TRAVERSALS {
        let before = up.recorded().len();
        let a = h1_get(&ca, kg.proxy, p, &chat_key).await;
        let got = got_since(&up, before);
        match a {
            Ok(a) if a.status == 403 && got == "nothing" && json_error(&a.body).is_some() => {}
            Ok(a) => failures.push(format!(
                "h1 GET {p}: answered {} (JSON error: {}), upstream got {got}",
                a.status,
                json_error(&a.body).is_some()
            )),
            Err(e) => failures.push(format!("h1 GET {p}: {e}; upstream got {got}")),
        }
    }
    kg.stop().await;
    assert_none_failed("traversal from /v1/chat into /v1/files over h1", &failures);
}

/// 1: the same over HTTP/2, the `:path` sent exactly as written (raw frames).
#[tokio::test]
async fn path_traversal_into_another_route_is_refused_over_h2() {
    let (ca, up, kg, chat_key) = chat_and_files("").await;
    chat_controls(&ca, &kg, &up, &chat_key).await;
    // The raw h2 client works: a plain request is served.
    let ok = h2_get(&ca, kg.proxy, "/v1/chat/h2-ok", &chat_key).await;
    assert_eq!(ok.status, Some(201), "control over h2: {}", ok.describe());
    let no = h2_get(&ca, kg.proxy, "/v1/files/x", &chat_key).await;
    assert_eq!(no.status, Some(403), "control over h2: {}", no.describe());
    let mut failures = Vec::new();
    for p in TRAVERSALS {
        let before = up.recorded().len();
        let a = h2_get(&ca, kg.proxy, p, &chat_key).await;
        let got = got_since(&up, before);
        if a.status != Some(403) || got != "nothing" || json_error(&a.body).is_none() {
            failures.push(format!(
                "h2 GET {p}: answered {} (JSON error: {}), upstream got {got}",
                a.describe(),
                json_error(&a.body).is_some()
            ));
        }
    }
    kg.stop().await;
    assert_none_failed("traversal from /v1/chat into /v1/files over h2", &failures);
}

/// 1: what is forwarded is the normalised path: dot segments removed, `%63` decoded to `c`,
/// the query untouched; the route is chosen on that path.
#[tokio::test]
async fn forwarded_paths_are_normalised_and_queries_untouched() {
    let (ca, up, kg, chat_key) = chat_and_files("").await;
    let cases = [
        ("/v1/chat/a/./b/../c?q=1%2F", "/v1/chat/a/c?q=1%2F"),
        ("/v1/%63hat/x", "/v1/chat/x"),
    ];
    let mut failures = Vec::new();
    for (sent, want) in cases {
        for proto in ["h1", "h2"] {
            let before = up.recorded().len();
            let status = if proto == "h1" {
                match h1_get(&ca, kg.proxy, sent, &chat_key).await {
                    Ok(a) => a.status.to_string(),
                    Err(e) => e,
                }
            } else {
                h2_get(&ca, kg.proxy, sent, &chat_key).await.describe()
            };
            let rec = up.recorded();
            let new = &rec[before..];
            let ok = status == "201"
                && new.len() == 1
                && new[0].uri.path_and_query().map(|p| p.as_str()) == Some(want)
                && injected(&new[0]) == "the CHAT secret";
            if !ok {
                failures.push(format!(
                    "{proto} GET {sent}: answered {status}, upstream got {} (want exactly {want} \
                     with the CHAT secret)",
                    got_since(&up, before)
                ));
            }
        }
    }
    kg.stop().await;
    assert_none_failed("normalised forwarding", &failures);
}

/// 1: a path that climbs above the root, an encoded slash or backslash (by default), or a
/// Tomcat-style path parameter on a dot segment gets 400 with a JSON error, and nothing is
/// forwarded.
#[tokio::test]
async fn unsafe_paths_get_400_and_reach_nothing() {
    let (ca, up, kg, chat_key) = chat_and_files("").await;
    let paths = [
        "/v1/../../x",
        "/..",
        "/v1/chat/a%2Fb",
        "/v1/chat/a%2fb",
        "/v1/chat/a%5Cb",
        "/v1/chat/..;/files/x",
        "/v1/chat/.;x/y",
    ];
    let mut failures = Vec::new();
    for p in paths {
        for proto in ["h1", "h2"] {
            let before = up.recorded().len();
            let (status, body) = if proto == "h1" {
                match h1_get(&ca, kg.proxy, p, &chat_key).await {
                    Ok(a) => (a.status.to_string(), a.body),
                    Err(e) => (e, Vec::new()),
                }
            } else {
                let a = h2_get(&ca, kg.proxy, p, &chat_key).await;
                (a.describe(), a.body)
            };
            let got = got_since(&up, before);
            if status != "400" || got != "nothing" || json_error(&body).is_none() {
                failures.push(format!(
                    "{proto} GET {p}: answered {status} (JSON error: {}), upstream got {got}",
                    json_error(&body).is_some()
                ));
            }
        }
    }
    kg.stop().await;
    assert_none_failed("unsafe paths", &failures);
}

/// 1: with `[server] allow_encoded_slashes = true`, `%2F` is forwarded as is.
#[tokio::test]
async fn encoded_slashes_are_forwarded_as_is_when_allowed() {
    let (ca, up, kg, chat_key) = chat_and_files("[server]\nallow_encoded_slashes = true\n").await;
    let a = h1_get(&ca, kg.proxy, "/v1/chat/a%2Fb", &chat_key)
        .await
        .unwrap();
    let rec = up.recorded();
    kg.stop().await;
    assert_eq!(
        a.status, 201,
        "GET /v1/chat/a%2Fb with encoded slashes allowed"
    );
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].uri.path(), "/v1/chat/a%2Fb", "%2F kept as is");
    assert_eq!(injected(&rec[0]), "the CHAT secret");
}

/// 1: with strip_prefix routes, `/a/../b/x` is route B's `/x`, never route A's `/../b/x`.
#[tokio::test]
async fn strip_prefix_routes_are_chosen_on_the_normalised_path() {
    let ca = TestCa::new();
    let up_a = FakeUpstream::start(&ca).await;
    let up_b = FakeUpstream::start(&ca).await;
    let routes = route_toml("A", "/a", &up_a.url(), "SA", "strip_prefix = true\n")
        + &route_toml("B", "/b", &up_b.url(), "SB", "strip_prefix = true\n");
    let kg = Keygate::start_toml(
        &ca,
        NO_LIMITS,
        &routes,
        &[("SA", "secret-a-1111"), ("SB", "secret-b-2222")],
    )
    .await;
    let mut failures = Vec::new();
    for proto in ["h1", "h2"] {
        let (na, nb) = (up_a.recorded().len(), up_b.recorded().len());
        let status = if proto == "h1" {
            match h1_get(&ca, kg.proxy, "/a/../b/x", &kg.key).await {
                Ok(a) => a.status.to_string(),
                Err(e) => e,
            }
        } else {
            h2_get(&ca, kg.proxy, "/a/../b/x", &kg.key).await.describe()
        };
        let (ra, rb) = (up_a.recorded(), up_b.recorded());
        let path = |r: &Recorded| {
            r.uri
                .path_and_query()
                .map_or(String::new(), |p| p.to_string())
        };
        let a_paths: Vec<String> = ra[na..].iter().map(path).collect();
        let b_paths: Vec<String> = rb[nb..].iter().map(path).collect();
        if status != "201" || !a_paths.is_empty() || b_paths != ["/x"] {
            failures.push(format!(
                "{proto} GET /a/../b/x: answered {status}; A's upstream got {a_paths:?}, B's \
                 got {b_paths:?} (want B: [\"/x\"], A: nothing)"
            ));
        }
    }
    kg.stop().await;
    assert_none_failed("strip_prefix and dot segments", &failures);
}

// ---------------------------------------------------------------------------------------------
// 2. Request trailers
// ---------------------------------------------------------------------------------------------

/// What must hold of a forwarded request that carried credential trailers.
fn check_request_trailers(label: &str, r: &Recorded, key: &str, failures: &mut Vec<String>) {
    let names: Vec<&str> = r.trailers.keys().map(|k| k.as_str()).collect();
    for bad in ["x-api-key", "authorization", "cookie"] {
        if r.trailers.contains_key(bad) {
            failures.push(format!("{label}: the upstream received a `{bad}` trailer"));
        }
    }
    if any_value_contains(&r.trailers, key) {
        failures.push(format!(
            "{label}: an upstream trailer value contains the client's keygate key"
        ));
    }
    if r.trailers.get("x-ok").map(|v| v.as_bytes()) != Some(b"1") {
        failures.push(format!(
            "{label}: the upstream did not receive the `x-ok: 1` trailer (trailers received: \
             {names:?})"
        ));
    }
    let auths = r.headers.get_all("authorization").iter().count()
        + r.trailers.get_all("authorization").iter().count();
    let want = format!("Bearer {UPSTREAM_SECRET}");
    if auths != 1 || r.headers.get("authorization").map(|v| v.as_bytes()) != Some(want.as_bytes()) {
        failures.push(format!(
            "{label}: the upstream got {auths} authorization field(s) in headers and trailers, \
             not exactly the injected one"
        ));
    }
}

/// keygate in front of an h1-only upstream and an h2 one (routes /h1 and /h2).
async fn trailer_setup() -> (TestCa, FakeUpstream, FakeUpstream, Keygate) {
    let ca = TestCa::new();
    let up1 = FakeUpstream::start_with(&ca, false).await;
    let up2 = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/h1", &up1.url(), "K"), ("/h2", &up2.url(), "K")],
        NO_LIMITS,
    )
    .await;
    (ca, up1, up2, kg)
}

/// 2: credential trailers of a chunked HTTP/1.1 request never reach the upstream (h1 or h2);
/// a harmless trailer does.
#[tokio::test]
async fn request_trailers_from_an_h1_client_carry_no_credentials_upstream() {
    let (ca, up1, up2, kg) = trailer_setup().await;
    let key = kg.key.clone();
    let mut failures = Vec::new();
    for (prefix, up, want_version) in [
        ("/h1", &up1, http::Version::HTTP_11),
        ("/h2", &up2, http::Version::HTTP_2),
    ] {
        let req = format!(
            "POST {prefix}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-api-key, authorization, cookie, x-ok\r\n\
             Connection: close\r\n\r\n\
             5\r\nhello\r\n0\r\nx-api-key: {key}\r\nauthorization: Bearer {key}\r\n\
             cookie: k={key}\r\nx-ok: 1\r\n\r\n"
        );
        let a = h1_exchange(&ca, kg.proxy, req.as_bytes()).await;
        let label = format!("h1 client -> {want_version:?} upstream");
        let rec = up.recorded();
        match (a, rec.last()) {
            (Ok(a), Some(r)) if a.status == 201 => {
                assert_eq!(r.version, want_version, "{label}: upstream protocol");
                assert_eq!(&r.body[..], b"hello", "{label}: body");
                check_request_trailers(&label, r, &key, &mut failures);
            }
            (a, r) => failures.push(format!(
                "{label}: answered {:?}, upstream got {} request(s)",
                a.map(|a| a.status),
                usize::from(r.is_some())
            )),
        }
    }
    kg.stop().await;
    assert_none_failed("request trailers from an h1 client", &failures);
}

/// 2: the same from an HTTP/2 client sending a trailer HEADERS frame.
#[tokio::test]
async fn request_trailers_from_an_h2_client_carry_no_credentials_upstream() {
    let (ca, up1, up2, kg) = trailer_setup().await;
    let key = kg.key.clone();
    let client = ca.client(true);
    let mut failures = Vec::new();
    for (prefix, up, want_version) in [
        ("/h1", &up1, http::Version::HTTP_11),
        ("/h2", &up2, http::Version::HTTP_2),
    ] {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-api-key", key.parse().unwrap());
        trailers.insert("authorization", format!("Bearer {key}").parse().unwrap());
        trailers.insert("cookie", format!("k={key}").parse().unwrap());
        trailers.insert("x-ok", "1".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = http::Request::post(kg.url(&format!("{prefix}/upload")))
            .header("x-api-key", &key)
            .header("trailer", "x-api-key, authorization, cookie, x-ok")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap();
        let (status, _, _) = send(&client, req).await;
        let label = format!("h2 client -> {want_version:?} upstream");
        let rec = up.recorded();
        match rec.last() {
            Some(r) if status == StatusCode::CREATED => {
                assert_eq!(r.version, want_version, "{label}: upstream protocol");
                assert_eq!(&r.body[..], b"hello", "{label}: body");
                check_request_trailers(&label, r, &key, &mut failures);
            }
            r => failures.push(format!(
                "{label}: answered {status}, upstream got {} request(s)",
                usize::from(r.is_some())
            )),
        }
    }
    kg.stop().await;
    assert_none_failed("request trailers from an h2 client", &failures);
}

// ---------------------------------------------------------------------------------------------
// 3. Response trailers
// ---------------------------------------------------------------------------------------------

/// 3: an upstream response trailer echoing the injected secret never reaches an h1 (TE:
/// trailers) or h2 client; a harmless trailer does.
async fn response_trailers_case(h2_upstream: bool) {
    let ca = TestCa::new();
    let up = FakeUpstream::start_with(&ca, h2_upstream).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let mut failures = Vec::new();
    for h2_client in [false, true] {
        let label = format!(
            "{} client <- {} upstream",
            if h2_client { "h2" } else { "h1" },
            if h2_upstream { "h2" } else { "h1" }
        );
        let client = ca.client(h2_client);
        let before = up.recorded().len();
        let res = client
            .request(get(
                &kg.url("/trailers"),
                &[("x-api-key", &kg.key), ("te", "trailers")],
            ))
            .await
            .expect("request");
        let status = res.status();
        let collected = res.into_body().collect().await.expect("response body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let body = collected.to_bytes();
        let rec = up.recorded();
        assert_eq!(status, StatusCode::OK, "{label}");
        assert_eq!(&body[..], b"part one;part two", "{label}: body");
        assert_eq!(rec.len(), before + 1, "{label}: forwarded once");
        assert_eq!(
            rec[before].version,
            if h2_upstream {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            },
            "{label}: upstream protocol"
        );
        let names: Vec<String> = trailers.keys().map(|k| k.to_string()).collect();
        if any_value_contains(&trailers, UPSTREAM_SECRET) {
            failures.push(format!(
                "{label}: the client received a trailer holding the injected secret (trailers: \
                 {names:?})"
            ));
        }
        if trailers.get("x-ok").map(|v| v.as_bytes()) != Some(b"1") {
            failures.push(format!(
                "{label}: the client did not receive the `x-ok: 1` trailer (trailers: {names:?})"
            ));
        }
    }
    kg.stop().await;
    assert_none_failed("response trailers", &failures);
}

#[tokio::test]
async fn response_trailers_from_an_h1_upstream_never_echo_the_secret() {
    response_trailers_case(false).await;
}

#[tokio::test]
async fn response_trailers_from_an_h2_upstream_never_echo_the_secret() {
    response_trailers_case(true).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Config text never echoed; no CORS on ops endpoints
// ---------------------------------------------------------------------------------------------

const SENTINEL: &str = "SENTINEL";

/// Whether `text` names `file` with `line` as `FILE:LINE:COLUMN`.
fn names_file_line(text: &str, file: &str, line: usize) -> bool {
    let needle = format!("{file}:{line}:");
    text.match_indices(&needle)
        .any(|(i, _)| text[i + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Bad variants of a config: (description, text, the 1-based line of the bad value, whether a
/// line number is required in the error).
fn sentinel_variants(valid: &str, upstream: &str) -> Vec<(&'static str, String, usize, bool)> {
    let base_lines = valid.lines().count();
    let route = |tail: &str| {
        format!(
            "{valid}\n[[route]]\nname = \"static\"\nprefix = \"/static\"\nupstream = \"{upstream}\"\n\
             inject = {{ ai_secret = \"K\" }}\n{tail}\n"
        )
    };
    // The bad line is the 7th after the valid text (which ends with a newline, and one more
    // blank line is added).
    let line = base_lines + 7;
    vec![
        (
            "syntax error: missing closing quote",
            route("set_headers = { \"x-static\" = \"Bearer sk-SENTINEL1234567890 }"),
            line,
            true,
        ),
        (
            "syntax error: trailing garbage",
            route("set_headers = { \"x-static\" = \"Bearer sk-SENTINEL1234567890\" } garbage"),
            line,
            true,
        ),
        (
            "type error: strip_prefix holds a string",
            route("strip_prefix = \"sk-SENTINEL1234567890\""),
            line,
            false,
        ),
    ]
}

/// 4: a refused reload (422), `/readyz`, `GET /-/reload` and `keygate check-config` never echo
/// text from the config file, and name the file and line of a syntax error as FILE:LINE:COLUMN.
#[tokio::test]
async fn config_errors_never_echo_the_file_and_name_file_line_column() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let (admin, _) = make_key(&kg, Role::Admin);
    let client = ca.client(false);
    let valid = std::fs::read_to_string(&kg.config_path).unwrap();
    let file = kg.config_path.display().to_string();
    let mut failures = Vec::new();
    for (what, text, line, line_required) in sentinel_variants(&valid, &up.url()) {
        assert_eq!(
            text.lines().nth(line - 1).map(|l| l.contains(SENTINEL)),
            Some(true),
            "{what}: the test's own line count"
        );
        std::fs::write(&kg.config_path, &text).unwrap();
        let (status, _, body) = admin_call(
            &client,
            "POST",
            &kg.admin_url("/-/reload"),
            Some(&admin),
            None,
        )
        .await;
        if status != StatusCode::UNPROCESSABLE_ENTITY {
            failures.push(format!("{what}: POST /-/reload answered {status}, not 422"));
        }
        let (_, _, ready) = admin_call(&client, "GET", &kg.admin_url("/readyz"), None, None).await;
        let (_, _, last) = admin_call(
            &client,
            "GET",
            &kg.admin_url("/-/reload"),
            Some(&admin),
            None,
        )
        .await;
        let (code, out, err) = cli(kg.dir.path(), &["check-config", &file], b"", &[]).await;
        if code == Some(0) {
            failures.push(format!("{what}: keygate check-config accepted the file"));
        }
        for (name, text) in [
            ("the 422 body", body.to_string()),
            ("GET /readyz", ready.to_string()),
            ("GET /-/reload", last.to_string()),
            ("keygate check-config", format!("{out}\n{err}")),
        ] {
            if text.contains(SENTINEL) {
                failures.push(format!("{what}: {name} echoes text of the config file"));
            }
            if line_required && !names_file_line(&text, &file, line) {
                failures.push(format!(
                    "{what}: {name} does not name the file and line as FILE:{line}:COLUMN"
                ));
            }
        }
    }
    kg.stop().await;
    assert_none_failed("config error reporting", &failures);
}

/// A config for a child keygate (dev certificates and store in its working directory).
fn child_config(ca: &TestCa, upstream: &str, extra: &str) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [upstream]\nca_file = {ca:?}\n{extra}\n\
         [[route]]\nprefix = \"/\"\nupstream = \"{upstream}\"\ninject = {{ ai_secret = \"K\" }}\n",
        ca = ca.ca_file,
    )
}

/// Starts the binary in a fresh directory with `K` stored; returns it, its directory, the
/// config path and a client trusting its dev CA.
async fn child(
    ca: &TestCa,
    upstream: &str,
    extra: &str,
) -> (
    KeygateProcess,
    tempfile::TempDir,
    String,
    hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TestBody,
    >,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, child_config(ca, upstream, extra)).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let (code, _, err) = cli(
        dir.path(),
        &["--config", &cfg, "secrets", "put", "K"],
        format!("{UPSTREAM_SECRET}\n").as_bytes(),
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "keygate secrets put: {err}");
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    (kg, dir, cfg, client)
}

/// 4: the running binary's log never holds config text either (SIGHUP with a bad file), and
/// `keygate reload`, which checks the file first, does not echo it.
#[tokio::test]
async fn a_refused_reload_never_logs_config_text() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let (kg, dir, cfg, client) = child(&ca, &up.url(), "").await;
    let valid = std::fs::read_to_string(&cfg).unwrap();
    let mut failures = Vec::new();
    for (round, (what, text, line, line_required)) in
        sentinel_variants(&valid, &up.url()).into_iter().enumerate()
    {
        std::fs::write(&cfg, &text).unwrap();
        let (code, out, err) = cli(dir.path(), &["--config", &cfg, "reload"], b"", &[]).await;
        if code == Some(0) {
            failures.push(format!("{what}: keygate reload accepted the file"));
        }
        let cli_out = format!("{out}\n{err}");
        if cli_out.contains(SENTINEL) {
            failures.push(format!(
                "{what}: keygate reload echoes text of the config file"
            ));
        }
        if line_required && !names_file_line(&cli_out, &cfg, line) {
            failures.push(format!(
                "{what}: keygate reload does not name the file and line as FILE:{line}:COLUMN"
            ));
        }
        // SIGHUP: the server reads the file and refuses it; wait until it counts the refusal
        // (it logs before it counts).
        std::process::Command::new("kill")
            .args(["-HUP", &kg.pid().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, _, body) = send(&client, get(&kg.admin_url("/metrics"), &[])).await;
            let text = String::from_utf8_lossy(&body).into_owned();
            if metric(&text, "keygate_config_reloads_total{outcome=\"refused\"}")
                .is_some_and(|n| n > round as u64)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the SIGHUP reload was not refused within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A good file and one more SIGHUP: once its success is in the log, so is everything the
    // refused reloads logged.
    std::fs::write(&cfg, &valid).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &kg.pid().to_string()])
        .status()
        .unwrap();
    let stderr = kg.stderr.clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            stderr.lock().unwrap().contains("config reloaded")
        })
        .await,
        "the good reload was not logged within 10 s"
    );
    let (_, log) = kg.terminate().await;
    if log.contains(SENTINEL) {
        let n = log.lines().filter(|l| l.contains(SENTINEL)).count();
        failures.push(format!(
            "the server log echoes config text on {n} line(s) (SIGHUP with a bad file)"
        ));
    }
    assert_none_failed("reload log", &failures);
}

/// 4: the ops endpoints send no `access-control-allow-origin`; the admin API keeps `*`.
#[tokio::test]
async fn ops_endpoints_carry_no_cors_header() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let (admin, _) = make_key(&kg, Role::Admin);
    let client = ca.client(false);
    let mut failures = Vec::new();
    for (method, path, key) in [
        ("GET", "/readyz", None),
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
        ("GET", "/-/reload", Some(admin.as_str())),
        ("POST", "/-/reload", Some(admin.as_str())),
    ] {
        let mut b = http::Request::builder()
            .method(method)
            .uri(kg.admin_url(path))
            .header("origin", "https://evil.example");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let (status, headers, _) = send(&client, b.body(empty()).unwrap()).await;
        assert!(status.is_success(), "{method} {path}: {status}");
        if let Some(v) = headers.get("access-control-allow-origin") {
            failures.push(format!(
                "{method} {path} answers with access-control-allow-origin: {v:?}"
            ));
        }
    }
    let (status, headers, _) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        None,
    )
    .await;
    kg.stop().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"*"[..]),
        "the admin API keeps CORS for the official clients"
    );
    assert_none_failed("CORS on ops endpoints", &failures);
}

// ---------------------------------------------------------------------------------------------
// 5. metadata.additionalHeaders
// ---------------------------------------------------------------------------------------------

/// Header names an ai_secret's `metadata.additionalHeaders` must not set.
const FORBIDDEN_EXTRA: [&str; 12] = [
    "host",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-authorization",
    "x-api-key",
    "authorization",
    "transfer-encoding",
    "content-length",
    "keep-alive",
];

fn extra_headers(name: &str, value: &str) -> serde_json::Value {
    json!({ "additionalHeaders": { name: value } })
}

/// 5: the admin API refuses (400, naming the header) additionalHeaders that would set a
/// framing, routing or credential header, or a value with CR/LF, on POST, PUT and PATCH; the
/// stored secret stays as it was.
#[tokio::test]
async fn the_admin_api_refuses_reserved_additional_headers() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], &no_limits_at_all()).await;
    let (admin, _) = make_key(&kg, Role::Admin);
    let client = ca.client(false);
    let url = kg.admin_url("/v1/ai_secret");
    let (_, store) = kg.store();
    let org = store.tenant().unwrap().org_id;
    let k_id = store.ai_secret_value(&org, "K").unwrap().unwrap().0.id;
    let mut failures = Vec::new();
    // (header name, metadata, whether the error must name the header)
    let mut cases: Vec<(String, serde_json::Value, bool)> = FORBIDDEN_EXTRA
        .iter()
        .map(|n| (n.to_string(), extra_headers(n, "v"), true))
        .collect();
    cases.push((
        "x-crlf".into(),
        extra_headers("x-crlf", "a\r\nx-injected: 1"),
        false,
    ));
    cases.push(("x-lf".into(), extra_headers("x-lf", "a\nb"), false));
    for (i, (name, metadata, must_name)) in cases.iter().enumerate() {
        let fresh = format!("NEW_{i}");
        let calls = [
            (
                "POST",
                url.clone(),
                json!({"name": fresh, "type": "openai", "secret": "s-new", "metadata": metadata}),
            ),
            (
                "PUT",
                url.clone(),
                json!({"name": "K", "type": "openai", "secret": "s-put", "metadata": metadata}),
            ),
            (
                "PATCH",
                kg.admin_url(&format!("/v1/ai_secret/{k_id}")),
                json!({"metadata": metadata}),
            ),
        ];
        for (method, u, body) in calls {
            let (status, _, answer) =
                admin_call(&client, method, &u, Some(&admin), Some(body)).await;
            let text = answer["error"].as_str().unwrap_or("").to_ascii_lowercase();
            if status != StatusCode::BAD_REQUEST {
                failures.push(format!(
                    "{method} additionalHeaders.{name}: {status}, not 400"
                ));
            } else if *must_name && !text.contains(name.as_str()) {
                failures.push(format!(
                    "{method} additionalHeaders.{name}: 400 without naming the header"
                ));
            }
        }
        if store.ai_secret_value(&org, &fresh).unwrap().is_some() {
            failures.push(format!(
                "POST additionalHeaders.{name}: the secret was created"
            ));
        }
    }
    let (rec, value) = store.ai_secret_value(&org, "K").unwrap().unwrap();
    if rec.metadata.is_some() {
        failures.push("the stored secret K's metadata changed".into());
    }
    if value.expose() != UPSTREAM_SECRET {
        failures.push("the stored secret K's value changed".into());
    }
    kg.stop().await;
    assert_none_failed("additionalHeaders through the admin API", &failures);
}

/// 5: a reserved additionalHeaders already in the store (written by an older version) makes
/// its route answer 503 with nothing forwarded; a harmless one is added upstream.
#[tokio::test]
async fn stored_reserved_additional_headers_make_the_route_fail_closed() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "K")],
        &format!("{NO_LIMITS}[keys]\npoll_interval = \"20ms\"\n"),
    )
    .await;
    let client = ca.client(false);
    let (_, store) = kg.store();
    let call = || send(&client, get(&kg.url("/x"), &[("x-api-key", &kg.key)]));
    let saw = |value: &str| {
        let want = format!("Bearer {value}");
        up.recorded().iter().any(|r| {
            r.headers
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        })
    };
    let mut failures = Vec::new();
    let mut names: Vec<&str> = FORBIDDEN_EXTRA.to_vec();
    names.push("x-extra");
    for (i, name) in names.into_iter().enumerate() {
        // A good value first, seen upstream: the poller has caught up.
        let good = format!("good-{i}");
        put_typed(store.as_ref(), "K", "openai", &good, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !saw(&good) {
            assert!(
                Instant::now() < deadline,
                "a plain secret write not picked up"
            );
            call().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Now the one with additionalHeaders.
        let bad = format!("direct-{i}");
        put_typed(
            store.as_ref(),
            "K",
            "openai",
            &bad,
            Some(extra_headers(name, "1")),
        );
        // Requests forwarded once the poller took the new secret in: those that do not carry
        // the good value any more (with `authorization` in additionalHeaders the injected
        // credential itself is overwritten).
        let before = up.recorded().len();
        let after_refresh = |up: &FakeUpstream| -> Vec<Recorded> {
            up.recorded()[before..]
                .iter()
                .filter(|r| !carries(r, &good))
                .cloned()
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            let (s, _, _) = call().await;
            if s == StatusCode::SERVICE_UNAVAILABLE
                || !after_refresh(&up).is_empty()
                || Instant::now() > deadline
            {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let forwarded = after_refresh(&up);
        if name == "x-extra" {
            let ok = status == StatusCode::CREATED
                && forwarded.last().is_some_and(|r| {
                    carries(r, &bad) && r.headers.get("x-extra").map(|v| v.as_bytes()) == Some(b"1")
                });
            assert!(ok, "a harmless additionalHeaders (x-extra: 1): {status}");
        } else if status != StatusCode::SERVICE_UNAVAILABLE || !forwarded.is_empty() {
            failures.push(format!(
                "stored additionalHeaders.{name}: answered {status}, {} request(s) reached the \
                 upstream with that secret's headers",
                forwarded.len()
            ));
        }
    }
    kg.stop().await;
    assert_none_failed("stored additionalHeaders", &failures);
}

// ---------------------------------------------------------------------------------------------
// 6. The failed-auth throttle does not lock out good keys
// ---------------------------------------------------------------------------------------------

/// 6: an IP throttled for failed authentications still serves its valid (cached) keys; unknown
/// keys stay refused with 429. Default limits.
#[tokio::test]
async fn the_auth_failure_throttle_does_not_lock_out_valid_keys() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let (admin, _) = make_key(&kg, Role::Admin);
    let client = ca.client(false);
    let (s, _, _) = send(&client, get(&kg.url("/warm"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED, "the proxy key works");
    let (s, _, _) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the admin key works");

    let mut unknown = UnknownKeys(0x9E37_79B9_7F4A_7C15);
    let mut throttled_after = None;
    for i in 0..60 {
        let k = if i % 2 == 0 {
            unknown.next_key()
        } else {
            format!("bad-key-{i}")
        };
        let (s, _, _) = send(&client, get(&kg.url("/probe"), &[("x-api-key", &k)])).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            throttled_after = Some(i + 1);
            break;
        }
        assert_eq!(s, StatusCode::UNAUTHORIZED, "an unknown key");
    }
    let n = throttled_after.expect("60 failed authentications from one IP were never throttled");
    let before = up.recorded().len();
    let (proxy_status, _, _) =
        send(&client, get(&kg.url("/after"), &[("x-api-key", &kg.key)])).await;
    let (admin_status, _, _) = admin_call(
        &client,
        "GET",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        None,
    )
    .await;
    let (unknown_status, _, _) = send(
        &client,
        get(&kg.url("/probe"), &[("x-api-key", &unknown.next_key())]),
    )
    .await;
    let forwarded = up.recorded()[before..]
        .iter()
        .any(|r| r.uri.path() == "/after");
    kg.stop().await;
    let mut failures = Vec::new();
    if proxy_status != StatusCode::CREATED || !forwarded {
        failures.push(format!(
            "the valid proxy key got {proxy_status} after {n} failed attempts (forwarded: \
             {forwarded})"
        ));
    }
    if admin_status != StatusCode::OK {
        failures.push(format!(
            "the admin key got {admin_status} on GET /v1/api_key after {n} failed attempts"
        ));
    }
    if unknown_status != StatusCode::TOO_MANY_REQUESTS {
        failures.push(format!(
            "an unknown key got {unknown_status}, not 429, while throttled"
        ));
    }
    assert_none_failed("auth failure throttle", &failures);
}

// ---------------------------------------------------------------------------------------------
// 7. h2 header limits
// ---------------------------------------------------------------------------------------------

/// 7: over h2, 500 headers or one 31 KiB header get 431 (as over h1), and nothing is forwarded.
#[tokio::test]
async fn h2_requests_over_the_header_limits_get_431() {
    let ca = TestCa::new();
    // An upstream that would take these heads: what it records, keygate forwarded.
    let up = FakeUpstream::start_roomy(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let key = kg.key.clone();
    let ok = h2_get(&ca, kg.proxy, "/control", &key).await;
    assert_eq!(ok.status, Some(201), "control: {}", ok.describe());
    // Control: a header list over what keygate announces (SETTINGS_MAX_HEADER_LIST_SIZE) is
    // answered 431 by the HTTP/2 layer, and the raw client reads that answer.
    let huge = vec![b'b'; 40 * 1024];
    let over = h2_exchange(
        &ca,
        kg.proxy,
        &h2_block(
            "GET",
            "/huge",
            &[("x-api-key", key.as_bytes()), ("x-big", &huge)],
        ),
    )
    .await;
    assert_eq!(over.status, Some(431), "control: {}", over.describe());
    assert_eq!(up.recorded().len(), 1, "control: the 431 forwarded nothing");
    let many: Vec<(String, Vec<u8>)> = (0..496)
        .map(|i| (format!("x-h-{i:03}"), b"v".to_vec()))
        .collect();
    let mut many_refs: Vec<(&str, &[u8])> = vec![("x-api-key", key.as_bytes())];
    many_refs.extend(many.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
    let big = vec![b'b'; 31 * 1024];
    let cases = [
        ("500 headers", h2_block("GET", "/many", &many_refs)),
        (
            "one 31 KiB header",
            h2_block(
                "GET",
                "/big",
                &[("x-api-key", key.as_bytes()), ("x-big", &big)],
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (what, block) in cases {
        let before = up.recorded().len();
        let a = h2_exchange(&ca, kg.proxy, &block).await;
        let n = up.recorded().len() - before;
        if a.status != Some(431) || n != 0 {
            failures.push(format!(
                "{what} over h2: answered {}, {n} request(s) forwarded",
                a.describe()
            ));
        }
    }
    kg.stop().await;
    assert_none_failed("h2 header limits", &failures);
}

// ---------------------------------------------------------------------------------------------
// 8. keygate keys on passthrough routes
// ---------------------------------------------------------------------------------------------

/// 8: a keygate key presented on a passthrough route is refused (403) and never sent upstream,
/// not even to the validation endpoint; so is one limited to another route.
#[tokio::test]
async fn keygate_keys_are_never_forwarded_on_a_passthrough_route() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let routes = format!(
        "[[route]]\nname = \"pt\"\nprefix = \"/pt\"\nupstream = \"{u}\"\ninject = \"passthrough\"\n{}",
        route_toml("chat", "/chat", &up.url(), "K", ""),
        u = up.url()
    );
    let kg = Keygate::start_toml(&ca, NO_LIMITS, &routes, &[("K", UPSTREAM_SECRET)]).await;
    let chat_key = limited_key(&kg, Role::Proxy, &["chat"]);
    let client = ca.client(false);
    // Controls: the passthrough route works with the upstream's own key, and the limited key
    // works on its route.
    let (s, _, _) = send(
        &client,
        get(&kg.url("/pt/ok"), &[("x-api-key", PASSTHROUGH_GOOD_KEY)]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "control: a passthrough key");
    let (s, _, _) = send(
        &client,
        get(&kg.url("/chat/ok"), &[("x-api-key", &chat_key)]),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "control: the limited key on its route"
    );
    let mut failures = Vec::new();
    for (what, key) in [
        ("an unrestricted keygate key", kg.key.clone()),
        ("a keygate key limited to route chat", chat_key.clone()),
    ] {
        for form in ["x-api-key", "authorization"] {
            let value = if form == "x-api-key" {
                key.clone()
            } else {
                format!("Bearer {key}")
            };
            let (s, _, _) = send(&client, get(&kg.url("/pt/v1/models"), &[(form, &value)])).await;
            let carried = up.recorded().iter().filter(|r| carries(r, &key)).count();
            if s != StatusCode::FORBIDDEN || carried != 0 {
                let paths: Vec<String> = up
                    .recorded()
                    .iter()
                    .filter(|r| carries(r, &key))
                    .map(|r| r.uri.path().to_owned())
                    .collect();
                failures.push(format!(
                    "{what} in {form} on the passthrough route: answered {s}; {carried} \
                     upstream request(s) carried it (paths {paths:?})"
                ));
            }
        }
    }
    kg.stop().await;
    assert_none_failed("keygate keys on a passthrough route", &failures);
}

// ---------------------------------------------------------------------------------------------
// 9. Cleartext lookups are throttled
// ---------------------------------------------------------------------------------------------

/// The value of an unlabelled counter in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// 9: cleartext requests carrying many distinct unknown keys cannot make keygate look each of
/// them up: the key lookups they cause are held to the failed-auth allowance.
#[tokio::test]
async fn cleartext_key_lookups_are_throttled() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let client = ca.client(false);
    let scrape = || async {
        let (_, _, body) = send(&client, get(&kg.admin_url("/metrics"), &[])).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        metric(&text, "keygate_key_cache_misses_total").expect("keygate_key_cache_misses_total")
    };
    let before = scrape().await;
    let mut unknown = UnknownKeys(0x2545_F491_4F6C_DD1D);
    let mut answered = 0;
    for _ in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
        let req = format!(
            "GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
            unknown.next_key()
        );
        let _ = tcp.write_all(req.as_bytes()).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut got)).await;
        answered += usize::from(got.starts_with(b"HTTP/1.1 "));
    }
    let after = scrape().await;
    up.recorded()
        .is_empty()
        .then_some(())
        .expect("nothing forwarded");
    kg.stop().await;
    println!("cleartext: {answered} of 100 answered; key cache misses {before} -> {after}");
    assert!(
        after - before <= 30,
        "100 cleartext requests with distinct unknown keys caused {} key lookups (cache \
         misses); the failed-auth allowance is a burst of 20",
        after - before
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Store file permissions
// ---------------------------------------------------------------------------------------------

/// 10: the store's files are readable by their owner only.
#[tokio::test]
async fn store_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(&cfg, child_config(&ca, &up.url(), "")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    // A fresh data directory: `keygate serve` creates the store.
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let admin = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);
    let (s, _, _) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/ai_secret"),
        Some(&admin),
        Some(json!({"name": "K", "type": "openai", "secret": "perm-secret"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "a write, so that the WAL exists");
    let data = dir.path().join("data");
    let mut seen = Vec::new();
    let mut failures = Vec::new();
    for f in ["keygate.db", "keygate.db-wal", "keygate.db-shm"] {
        let Ok(meta) = std::fs::metadata(data.join(f)) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        seen.push(format!("{f} {mode:o}"));
        if mode & 0o077 != 0 {
            failures.push(format!(
                "{f} has mode {mode:o}: group or others may access it"
            ));
        }
    }
    let _ = kg.terminate().await;
    assert!(
        seen.iter().any(|s| s.starts_with("keygate.db-wal")),
        "no WAL file after a write: {seen:?}"
    );
    assert_none_failed("store file modes", &failures);
}

// ---------------------------------------------------------------------------------------------
// 11. Lingering close
// ---------------------------------------------------------------------------------------------

/// Whether `buf` holds a whole response with a Content-Length body.
fn response_complete(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = r.parse(buf) else {
        return false;
    };
    let cl = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    buf.len() >= head + cl
}

/// 11: a 431 for an oversized head is read whole by the client, and the connection is not
/// reset: keygate must not close with the rest of the request unread (the kernel then sends an
/// RST, which can destroy the answer before the client reads it; on loopback the answer
/// usually survives, so the RST itself is what is checked, as the socket's pending error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_its_431_read_and_no_reset() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let tls = connector(&ca, b"http/1.1");
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\nx-big: {}\r\n\r\n",
        kg.key,
        "h".repeat(64 * 1024)
    );
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        let s = connect(&tls, kg.proxy, b"http/1.1").await;
        let (mut r, mut w) = tokio::io::split(s);
        let bytes = request.clone().into_bytes();
        let writer = tokio::spawn(async move {
            // The whole request in one go; the write side stays open, as an HTTP/1.1 client
            // keeps it (a half-close would hide a reset: the socket would be in TIME_WAIT).
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                w.write_all(&bytes).await?;
                w.flush().await
            })
            .await;
            w
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        // Until keygate closes; a keygate that lingers to read the rest of the request is
        // given 1 s after its answer is complete (5 s in all).
        let mut deadline = Instant::now() + Duration::from_secs(5);
        let mut answered = false;
        let end = loop {
            match tokio::time::timeout_at(deadline.into(), r.read(&mut chunk)).await {
                Ok(Ok(0)) => break "clean end".to_owned(),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => break format!("read error ({:?})", e.kind()),
                Err(_) => break "still open (lingering)".to_owned(),
            }
            if !answered && response_complete(&buf) {
                answered = true;
                deadline = deadline.min(Instant::now() + Duration::from_secs(1));
            }
        };
        let w = writer.await.expect("writer task");
        let s = r.unsplit(w);
        // A reset that came after the TLS close shows as the socket's pending error. keygate
        // has closed its side by now: a reset, if any, is sent at that close; wait for it
        // briefly (no reset ever comes when keygate read the request to its end).
        let tcp = s.get_ref().0;
        let mut reset = None;
        let _ = wait_until(Duration::from_millis(200), || {
            reset = tcp
                .take_error()
                .ok()
                .flatten()
                .map(|e| format!("{:?}", e.kind()));
            reset.is_some()
        })
        .await;
        let status_line = buf.starts_with(b"HTTP/1.1 431 ");
        // An RST after the server's FIN sets EPIPE (BrokenPipe), before it ECONNRESET.
        let end = match reset {
            Some(kind) => format!("{end}, then a reset (socket error {kind})"),
            None => end,
        };
        outcomes.push((status_line, end, buf.len()));
    }
    let forwarded = up.recorded().len();
    kg.stop().await;
    let bad: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, (status, end, _))| !status || end.to_ascii_lowercase().contains("reset"))
        .map(|(i, (status, end, n))| {
            format!("attempt {i}: 431 status line read: {status}; {n} bytes read, {end}")
        })
        .collect();
    println!("outcomes: {outcomes:?}");
    assert_eq!(forwarded, 0, "an oversized head was forwarded");
    assert_none_failed("431 for a 64 KiB header, 20 attempts", &bad);
}

// ---------------------------------------------------------------------------------------------
// 12. A reload racing a secret write
// ---------------------------------------------------------------------------------------------

/// The race of item 12 is timed against the reload's two phases: reading the file (TOML, per
/// route) and reading every route's credential (a store read, a decryption and a header value
/// check per route). A long secret makes the second phase long without making the first one
/// longer, so the write can land well inside it.
const RACE_ROUTES: usize = 1500;
const RACE_SECRET_LEN: usize = 16 * 1024;
const RACE_POLL: &str = "100ms";

/// A distinct long value for the race's secret.
fn race_value(tag: &str) -> String {
    format!("{tag}-{}", "z".repeat(RACE_SECRET_LEN))
}

/// 12: a secret written while a reload reads the credentials is the one used afterwards: the
/// reload must not install credentials read before the write once the poller has already
/// taken the write in (for the config being replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_racing_a_secret_write_never_keeps_the_stale_secret() {
    let ca = TestCa::new();
    // The credential header is long: an upstream with room for it.
    let up = FakeUpstream::start_roomy(&ca).await;
    let mut routes = String::new();
    for i in 0..RACE_ROUTES {
        routes.push_str(&route_toml(
            &format!("r{i}"),
            &format!("/r{i}"),
            &up.url(),
            "K",
            "",
        ));
    }
    let initial = race_value("initial");
    let kg = Keygate::start_toml(
        &ca,
        &format!("{NO_LIMITS}[keys]\npoll_interval = \"{RACE_POLL}\"\n"),
        &routes,
        &[("K", &initial)],
    )
    .await;
    let state = kg.running.as_ref().unwrap().state.clone();
    let (_, store) = kg.store();
    let store: Arc<dyn Store> = store;
    let client = ca.client(false);

    // How long a reload's phases take here: reading the file, and reading the credentials.
    let (parse, creds) = {
        let path = kg.config_path.clone();
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let config = Config::load(Some(&path)).unwrap();
            let parse = t.elapsed();
            let tenant = store.tenant().unwrap();
            let t = Instant::now();
            let c = keygate::proxy::credentials::Credentials::new(config.routes.len());
            c.refresh(store.as_ref(), &tenant, &config.routes).unwrap();
            (parse, t.elapsed())
        })
        .await
        .unwrap()
    };
    let t = Instant::now();
    state.reload().await.expect("a plain reload");
    let reload = t.elapsed();
    let t = Instant::now();
    put_secret(store.as_ref(), "K", &initial);
    let write = t.elapsed();
    println!(
        "calibration: parse {parse:?}, credentials {creds:?}, whole reload {reload:?}, one \
         secret write {write:?}"
    );

    let injects = |value: &str| {
        let want = format!("Bearer {value}");
        up.recorded().last().is_some_and(|r| {
            r.headers
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        })
    };
    let started = Instant::now();
    let mut stale_rounds = Vec::new();
    let mut fresh_rounds = 0;
    let mut rounds = 0;
    // The writes land while the reload reads the credentials (its last `creds` or so): after
    // the file is parsed, and early enough that the poller takes them in before it ends.
    let creds_start = reload.saturating_sub(creds);
    let fractions = [0.1, 0.2, 0.05, 0.3, 0.15];
    while rounds < 12 && started.elapsed() < Duration::from_secs(90) && stale_rounds.is_empty() {
        let frac = fractions[rounds % fractions.len()];
        rounds += 1;
        let values: Vec<String> = (0..3)
            .map(|j| race_value(&format!("round{rounds}-write{j}")))
            .collect();
        let last = values.last().unwrap().clone();
        let offset = creds_start + creds.mul_f64(frac);
        let st = state.clone();
        let reloading = tokio::spawn(async move { st.reload().await });
        let writes = {
            let store = store.clone();
            let values = values.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(offset);
                // A few writes a few ms apart, as a CLI would make them (its own connection).
                for v in &values {
                    put_secret(store.as_ref(), "K", v);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        writes.await.unwrap();
        let reload_done = reloading.is_finished();
        reloading.await.unwrap().expect("the reload applies");
        // The poller has had time to see the last write: a request must inject it.
        // The poller takes the writes in once the reload has released the credentials lock,
        // and its refresh reads every route again (as long as the reload's own read): allow
        // that twice over, at least 3 s. A stale credential stays until the next write, so
        // a longer wait only costs time on a failure.
        let settle = (creds * 4).max(Duration::from_secs(3));
        let deadline = Instant::now() + settle;
        let mut fresh = false;
        while Instant::now() < deadline {
            let (s, _, _) = send(&client, get(&kg.url("/r0/x"), &[("x-api-key", &kg.key)])).await;
            assert_eq!(
                s,
                StatusCode::CREATED,
                "round {rounds}: a request on route r0"
            );
            if injects(&last) {
                fresh = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "round {rounds}: writes from {offset:?} into the reload (reload already over when \
             they ended: {reload_done}); fresh: {fresh}"
        );
        if fresh {
            fresh_rounds += 1;
        } else {
            let which = values
                .iter()
                .position(|v| injects(v))
                .map_or("a value from before the round".to_owned(), |j| {
                    format!("write {} of 3", j + 1)
                });
            stale_rounds.push(format!(
                "round {rounds} (writes {offset:?} into the reload): {settle:?} after the reload, route \
                 r0 still injects {which}, not the last value written"
            ));
        }
    }
    kg.stop().await;
    println!(
        "{rounds} round(s) in {:?}, {fresh_rounds} fresh",
        started.elapsed()
    );
    assert_none_failed("reload racing secret writes", &stale_rounds);
}

// ---------------------------------------------------------------------------------------------
// 13. WWW-Authenticate on every 401
// ---------------------------------------------------------------------------------------------

/// 13: every 401, on the proxy and on the admin listener, says how to authenticate.
#[tokio::test]
async fn every_401_carries_www_authenticate() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], NO_LIMITS).await;
    let unknown = UnknownKeys(0xDEAD_BEEF_1234_5678).next_key();
    let unknown = unknown.as_str();
    let bearer = format!("Bearer {unknown}");
    let bearer = bearer.as_str();
    let mut failures = Vec::new();
    for h2 in [false, true] {
        let client = ca.client(h2);
        let proto = if h2 { "h2" } else { "h1" };
        let cases = [
            ("proxy, no key", kg.url("/x"), vec![]),
            (
                "proxy, unknown key",
                kg.url("/x"),
                vec![("x-api-key", unknown)],
            ),
            (
                "proxy, unknown Bearer",
                kg.url("/x"),
                vec![("authorization", bearer)],
            ),
            ("admin API, no key", kg.admin_url("/v1/api_key"), vec![]),
            (
                "admin API, unknown Bearer",
                kg.admin_url("/v1/ai_secret"),
                vec![("authorization", bearer)],
            ),
            ("reload, no key", kg.admin_url("/-/reload"), vec![]),
        ];
        for (what, url, headers) in cases {
            let (s, h, _) = send(&client, get(&url, &headers)).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{proto} {what}");
            match h.get("www-authenticate").and_then(|v| v.to_str().ok()) {
                Some(v) if v.starts_with("Bearer") => {}
                Some(_) => failures.push(format!(
                    "{proto} {what}: WWW-Authenticate does not start with Bearer"
                )),
                None => failures.push(format!("{proto} {what}: 401 without WWW-Authenticate")),
            }
        }
    }
    kg.stop().await;
    assert_none_failed("WWW-Authenticate", &failures);
}

// ---------------------------------------------------------------------------------------------
// 14. An IP address as SNI is not a warning
// ---------------------------------------------------------------------------------------------

/// A TLS 1.2/1.3 ClientHello whose SNI is `host_name` (as some clients send an IP address).
fn client_hello_with_sni(host_name: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    let name = host_name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
    ext(&mut exts, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa_p256, rsa_pss
    ext(&mut exts, 0x002b, &[2, 0x03, 0x03]); // TLS 1.2 only: no key share needed
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-ECDSA/RSA-AES128-GCM
    hello.extend_from_slice(&[1, 0]); // null compression
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// 14: a handshake whose SNI is an IP address leaves no WARN line in the default log.
#[tokio::test]
async fn an_ip_address_as_sni_is_not_logged_as_a_warning() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let (kg, dir, _cfg, _client) = child(&ca, &up.url(), "").await;
    let port = kg.proxy.port().to_string();
    let start = kg.stderr.lock().unwrap().len();
    let openssl = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let how = if openssl {
        let out = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-servername",
                    "127.0.0.1",
                    "-CAfile",
                ])
                .arg(dir.path().join("certs/ca.pem"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("openssl s_client ends within 15 s")
        .expect("run openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Verify return code: 0"),
            "openssl s_client did not complete a verified handshake"
        );
        "openssl s_client -servername 127.0.0.1"
    } else {
        // No openssl: a ClientHello written by hand carries the IP address as SNI (python3's
        // ssl module never sends an IP address as SNI, so it would prove nothing).
        let mut tcp = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
        tcp.write_all(&client_hello_with_sni("127.0.0.1"))
            .await
            .unwrap();
        let mut got = [0u8; 5];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut got)).await;
        "a hand-written ClientHello"
    };
    // A marker logged after the handshake: once it is in the log, so is anything before it.
    std::process::Command::new("kill")
        .args(["-HUP", &kg.pid().to_string()])
        .status()
        .unwrap();
    let stderr = kg.stderr.clone();
    let marked = wait_until(Duration::from_secs(10), || {
        stderr.lock().unwrap()[start..].contains("config reloaded")
    })
    .await;
    assert!(marked, "the SIGHUP reload was not logged within 10 s");
    let (_, log) = kg.terminate().await;
    let warns: Vec<String> = log[start..]
        .lines()
        .filter(|l| l.contains("WARN"))
        .map(|l| l.chars().take(200).collect())
        .collect();
    assert!(
        warns.is_empty(),
        "a handshake by {how} left WARN line(s) in the log:\n{}",
        warns.join("\n")
    );
}
