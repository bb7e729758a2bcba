//! Entry points for the fuzz targets in `fuzz/` and their corpus regression test
//! (`tests/fuzz_corpus.rs`). Not a stable API.
//!
//! Each function takes arbitrary bytes, runs keygate's own parsing and checking code on them and
//! returns nothing: any input must give an answer or a clean error, so a panic here is the bug a
//! fuzzer finds. The few `assert!`s state documented properties of the code under test.

use std::sync::OnceLock;

use http::Uri;

use crate::admin::{ai_secrets, api_keys, env_vars, request};
use crate::config::Config;
use crate::proxy::authenticate::{bearer_token, presented_key};
use crate::proxy::headers::strip_hop_by_hop;
use crate::proxy::routes::{request_host, RouteTable};
use crate::secret::Secret;

// ---------------------------------------------------------------------------------------------
// config

/// `Config::parse` on the input as (lossy) UTF-8; on success, the derived pieces the server
/// builds from a config: the route table (every route must be selectable by its own prefix and
/// host) and the `set_headers` templates.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let config = match Config::parse(&text, "fuzz") {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let table = RouteTable::new(&config.routes);
    for route in &config.routes {
        assert!(
            table.select(route.host.as_deref(), &route.prefix).is_some(),
            "route {:?} cannot be selected by its own prefix and host",
            route.name
        );
        for (_, template) in &route.set_headers {
            let _ = template.env_names().count();
            assert!(template.render(|_| Some("v")).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// admin_json

/// The admin API's request parsing, everything that runs before the store is asked: the input
/// as the JSON body of every admin write (the same `Deserialize` types and checks as the
/// handlers), as the request target's path (the id segment) and as the query string of each
/// list endpoint.
pub fn admin_json(data: &[u8]) {
    admin_bodies(data);
    admin_target(data);
}

/// What `request::json_body` does with the bytes once read: whitespace only is "no body", else
/// `serde_json::from_slice`. (Reading the `Incoming` body itself needs a connection.)
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// A string field of a body that parsed, read again through `serde_json::Value` (the typed
/// bodies' fields are private to their handler modules).
fn field<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(serde_json::Value::as_str)
}

fn admin_bodies(data: &[u8]) {
    let Some(value) = body::<serde_json::Value>(data) else {
        return;
    };
    let s = |name| field(&value, name).map(str::to_owned);

    // POST /v1/api_key
    if body::<api_keys::CreateBody>(data).is_some() {
        let _ = request::check_name("name", field(&value, "name").unwrap_or_default());
        if let Some(role) = field(&value, "role") {
            let _ = crate::store::Role::parse(role);
        }
        rate_limit(&value);
    }
    // PATCH /v1/api_key/{id}
    if body::<api_keys::PatchBody>(data).is_some() {
        rate_limit(&value);
    }
    // POST / PUT /v1/ai_secret
    if body::<ai_secrets::WriteBody>(data).is_some() {
        let _ = request::check_name("name", field(&value, "name").unwrap_or_default());
        let _ = ai_secrets::check_type(&s("type"));
    }
    // PATCH /v1/ai_secret/{id}
    if body::<ai_secrets::PatchBody>(data).is_some() {
        if let Some(n) = field(&value, "name") {
            let _ = request::check_name("name", n);
        }
        let _ = ai_secrets::check_type(&s("type"));
    }
    // DELETE /v1/ai_secret
    let _ = body::<ai_secrets::DeleteBody>(data);
    // POST / PUT /v1/env_var
    if body::<env_vars::WriteBody>(data).is_some() {
        let _ = env_vars::object_type(field(&value, "object_type").unwrap_or_default());
        let _ = request::check_name("object_id", field(&value, "object_id").unwrap_or_default());
        let _ = env_vars::check_env_name(field(&value, "name").unwrap_or_default());
        let _ = env_vars::check_value(&s("value").map(Secret::new));
    }
    // PATCH /v1/env_var/{id}
    if body::<env_vars::PatchBody>(data).is_some() {
        let _ = env_vars::check_env_name(field(&value, "name").unwrap_or_default());
        let _ = env_vars::check_value(&s("value").map(Secret::new));
    }
}

/// The `rate_limit` extension field of the api_key bodies.
fn rate_limit(value: &serde_json::Value) {
    if let Some(rl) = value.get("rate_limit").filter(|v| !v.is_null()) {
        if let Ok(rl) = serde_json::from_value::<api_keys::RateLimitBody>(rl.clone()) {
            if let Ok(spec) = rl.spec() {
                assert!(spec.per_second() > 0.0 && spec.burst >= 1);
            }
        }
    }
}

/// The list endpoints' accepted query parameters and name filters.
const LISTS: [(&[&str], &str); 3] = [
    (api_keys::LIST_PARAMS, api_keys::NAME_PARAM),
    (ai_secrets::LIST_PARAMS, ai_secrets::NAME_PARAM),
    (env_vars::LIST_PARAMS, env_vars::NAME_PARAM),
];

/// The input as a request target (`/v1/api_key/ID?limit=2`) when it parses as a URI, else as a
/// bare query string.
fn admin_target(data: &[u8]) {
    let uri = if data.first() == Some(&b'/') {
        Uri::try_from(data).ok()
    } else {
        None
    };
    let query: String = match &uri {
        Some(uri) => {
            admin_path(uri.path());
            uri.query().unwrap_or_default().to_owned()
        }
        None => String::from_utf8_lossy(data).into_owned(),
    };
    // Every handler first refuses query parameters on a non-list request.
    let _ = request::Params::parse(Some(&query), &[]);
    for (allowed, name_param) in LISTS {
        let Ok(p) = request::Params::parse(Some(&query), allowed) else {
            continue;
        };
        let _ = p.one("org_name");
        if let Ok(q) = p.list_query("org", name_param) {
            assert!(q.limit <= request::MAX_PAGE);
            for id in &q.ids {
                assert_eq!(request::parse_id(id).ok().as_ref(), Some(id));
            }
        }
        let _ = p.many("ai_secret_type");
        if let Ok(Some(t)) = p.one("object_type") {
            let _ = env_vars::object_type(t);
        }
        let _ = p.one("object_id");
    }
}

/// The admin router's split of the path (`admin::api_path`), then `parse_id` on the id.
fn admin_path(path: &str) {
    let Some((_resource, Some(id))) = crate::admin::api_path(path) else {
        return;
    };
    if let Ok(canonical) = request::parse_id(id) {
        // Canonical form is a fixed point.
        assert_eq!(request::parse_id(&canonical).ok(), Some(canonical));
    }
}

// ---------------------------------------------------------------------------------------------
// request_head

/// A route table with host-bound and nested prefixes, for `select` on fuzzed hosts and paths.
fn fuzz_routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let text = r#"
[[route]]
prefix = "/"
upstream = "https://u.example"
inject = { ai_secret = "A" }

[[route]]
prefix = "/v1"
upstream = "https://u.example"
inject = { ai_secret = "B" }

[[route]]
prefix = "/v1/chat/"
host = "api.local"
upstream = "https://u.example"
inject = "passthrough"

[[route]]
prefix = "/v1"
name = "v1-other"
host = "other.local:8443"
upstream = "https://u.example/base/"
inject = { ai_secret = "C", header = "x-key", prefix = "Key " }
"#;
        RouteTable::new(&Config::parse(text, "fuzz routes").expect("valid").routes)
    })
}

/// The request edge on a request head: the cleartext key finder (`server::key_in_head`) on the
/// raw bytes; then the head parsed by `httparse` into a `HeaderMap` and a URI, and on them
/// `presented_key`, `bearer_token`, `request_host`, route selection and `strip_hop_by_hop`.
pub fn request_head(data: &[u8]) {
    let _ = crate::server::key_in_head(data);

    let (target, mut map) = crate::server::parse_head(data);
    let uri: Uri = target
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    // The path keygate routes on: normalising it again changes nothing.
    for keep in [false, true] {
        if let Ok(Some(normal)) = crate::proxy::path::normalize(uri.path(), keep) {
            assert_eq!(crate::proxy::path::normalize(&normal, keep), Ok(None));
        }
    }

    if let Some(key) = presented_key(&map) {
        assert_eq!(key, key.trim());
    }
    for value in map.values() {
        if let Ok(v) = value.to_str() {
            if let Some(token) = bearer_token(v) {
                assert!(!token.is_empty() && token == token.trim());
            }
        }
    }
    let host = request_host(&uri, &map);
    let _ = fuzz_routes().select(host, uri.path());

    strip_hop_by_hop(&mut map);
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        assert!(!map.contains_key(hop), "{hop} survived strip_hop_by_hop");
    }
}
