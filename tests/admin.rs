//! The admin API over real TLS: every call of the wire contract, its status codes and rules,
//! and its effect on the data plane.

mod support;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

struct Admin {
    kg: Keygate,
    key: String,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TestBody,
    >,
}

impl Admin {
    async fn start(ca: &TestCa, routes: &[(&str, &str, &str)]) -> Admin {
        let kg = Keygate::start(ca, routes, "").await;
        let (key, _) = make_key(&kg, keygate::store::Role::Admin);
        Admin {
            kg,
            key,
            client: ca.client(false),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, _, v) = admin_call(
            &self.client,
            method,
            &self.kg.admin_url(path),
            Some(&self.key),
            body,
        )
        .await;
        (s, v)
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body).await;
        assert_eq!(s, StatusCode::OK, "{method} {path}: {v}");
        v
    }

    async fn err(&self, method: &str, path: &str, body: Option<Value>, want: StatusCode) -> String {
        let (s, v) = self.call(method, path, body).await;
        assert_eq!(s, want, "{method} {path}: {v}");
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {v}"))
            .to_owned()
    }
}

fn ids(v: &Value) -> Vec<String> {
    v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn auth_admin_role_required_and_401s_match_the_proxy() {
    let ca = TestCa::new();
    let a = Admin::start(&ca, &[("/", "https://127.0.0.1:9", "K")]).await;
    let url = a.kg.admin_url("/v1/api_key");
    let (s, _, missing) = admin_call(&a.client, "GET", &url, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, bad) = admin_call(&a.client, "GET", &url, Some("sk-nope"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(missing, bad);
    let (s, _, proxy_401) = admin_call(&a.client, "GET", &a.kg.url("/x"), None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(proxy_401, missing, "admin and proxy 401 bodies differ");
    // A proxy-role key: 403 with a JSON error.
    let (s, _, v) = admin_call(&a.client, "GET", &url, Some(&a.kg.key), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v["error"].as_str().unwrap().contains("admin"));
    // x-api-key works as well as Bearer.
    let req = get(&url, &[("x-api-key", &a.key)]);
    let (s, _, _) = send(&a.client, req).await;
    assert_eq!(s, StatusCode::OK);
    // CORS preflight needs no key.
    let req = http::Request::builder()
        .method("OPTIONS")
        .uri(&url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-stainless-lang",
        )
        .body(empty())
        .unwrap();
    let (s, h, _) = send(&a.client, req).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("PATCH"));
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("x-stainless-lang"));
    a.kg.stop().await;
}

#[tokio::test]
async fn api_keys_create_list_page_get_delete() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let a = Admin::start(&ca, &[("/", &up.url(), "K")]).await;
    let mut made = Vec::new();
    for i in 0..5 {
        let v = a
            .ok(
                "POST",
                "/v1/api_key",
                Some(json!({"name": format!("k{i}")})),
            )
            .await;
        let key = v["key"].as_str().unwrap();
        assert!(key.starts_with("sk-") && key.len() == 51);
        assert_eq!(v["role"], "proxy");
        let preview = v["preview_name"].as_str().unwrap();
        assert!(
            preview.starts_with("sk-****") && preview.len() == 11 && preview.ends_with(&key[47..])
        );
        for f in ["id", "created", "name", "user_id", "org_id"] {
            assert!(v[f].is_string(), "{f} missing: {v}");
        }
        assert!(v["created"].as_str().unwrap().ends_with('Z'));
        made.push((v["id"].as_str().unwrap().to_owned(), key.to_owned()));
    }
    // Two keys may share a name: no de-duplication.
    let dup = a
        .ok("POST", "/v1/api_key", Some(json!({"name": "k0"})))
        .await;
    assert_ne!(dup["id"], made[0].0.as_str());
    let all = a.ok("GET", "/v1/api_key", None).await;
    assert!(
        !all.to_string().contains("\"key\""),
        "a list shows a raw key"
    );
    for (_, key) in &made {
        assert!(!all.to_string().contains(key.as_str()));
    }
    let newest_first: Vec<String> = ids(&all);
    assert_eq!(
        newest_first.len(),
        8,
        "3 earlier keys (test, admin, first admin) + 5 + dup"
    );
    assert_eq!(newest_first[0], dup["id"].as_str().unwrap());
    assert_eq!(
        newest_first[1..6],
        made.iter().rev().map(|m| m.0.clone()).collect::<Vec<_>>()[..]
    );

    // Cursor pages, forwards and backwards, and past the end.
    let p1 = ids(&a.ok("GET", "/v1/api_key?limit=3", None).await);
    assert_eq!(p1, newest_first[..3]);
    let p2 = ids(&a
        .ok(
            "GET",
            &format!("/v1/api_key?limit=3&starting_after={}", p1[2]),
            None,
        )
        .await);
    assert_eq!(p2, newest_first[3..6]);
    let back = ids(&a
        .ok(
            "GET",
            &format!("/v1/api_key?limit=2&ending_before={}", p2[0]),
            None,
        )
        .await);
    assert_eq!(
        back,
        newest_first[1..3],
        "ending_before gives the ones just before, newest first"
    );
    let last = newest_first.last().unwrap();
    assert!(ids(&a
        .ok("GET", &format!("/v1/api_key?starting_after={last}"), None)
        .await)
    .is_empty());
    assert!(ids(&a.ok("GET", "/v1/api_key?limit=0", None).await).is_empty());
    let e = a
        .err(
            "GET",
            &format!("/v1/api_key?starting_after={last}&ending_before={last}"),
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(e.contains("only one"), "{e}");

    // Filters: ids repeated and comma-joined, exact name, org_name.
    let q = format!("/v1/api_key?ids={}&ids={}", made[0].0, made[1].0);
    assert_eq!(
        ids(&a.ok("GET", &q, None).await),
        vec![made[1].0.clone(), made[0].0.clone()]
    );
    let q = format!("/v1/api_key?ids={}%2C{}", made[0].0, made[1].0);
    assert_eq!(ids(&a.ok("GET", &q, None).await).len(), 2);
    assert_eq!(
        ids(&a.ok("GET", "/v1/api_key?api_key_name=k3", None).await),
        vec![made[3].0.clone()]
    );
    assert!(
        ids(&a.ok("GET", "/v1/api_key?api_key_name=k", None).await).is_empty(),
        "name filter is exact"
    );
    assert_eq!(
        ids(&a.ok("GET", "/v1/api_key?org_name=default", None).await).len(),
        8
    );
    a.err(
        "GET",
        "/v1/api_key?org_name=elsewhere",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.err(
        "POST",
        "/v1/api_key",
        Some(json!({"name": "x", "org_name": "elsewhere"})),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Get, 404, 400.
    let one = a
        .ok("GET", &format!("/v1/api_key/{}", made[2].0), None)
        .await;
    assert_eq!(one["name"], "k2");
    assert!(one.get("key").is_none());
    a.err(
        "GET",
        "/v1/api_key/00000000-0000-4000-8000-000000000000",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    a.err(
        "GET",
        "/v1/api_key/not-a-uuid",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // A created key works on the proxy; deleted, it is refused on the very next request.
    let proxy = ca.client(false);
    let (s, _, _) = send(&proxy, get(&a.kg.url("/p"), &[("x-api-key", &made[4].1)])).await;
    assert_eq!(s, StatusCode::CREATED);
    let gone = a
        .ok("DELETE", &format!("/v1/api_key/{}", made[4].0), None)
        .await;
    assert_eq!(gone["id"], made[4].0.as_str());
    let (s, _, _) = send(&proxy, get(&a.kg.url("/p"), &[("x-api-key", &made[4].1)])).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "deleted key accepted on the next request"
    );
    a.err(
        "DELETE",
        &format!("/v1/api_key/{}", made[4].0),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Role extension: admin keys can use the admin API, default ones cannot.
    let adm = a
        .ok(
            "POST",
            "/v1/api_key",
            Some(json!({"name": "ops", "role": "admin"})),
        )
        .await;
    assert_eq!(adm["role"], "admin");
    let (s, _, _) = admin_call(
        &a.client,
        "GET",
        &a.kg.admin_url("/v1/api_key"),
        adm["key"].as_str(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = admin_call(
        &a.client,
        "GET",
        &a.kg.admin_url("/v1/api_key"),
        Some(&made[3].1),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    a.err(
        "POST",
        "/v1/api_key",
        Some(json!({"name": "x", "role": "root"})),
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.kg.stop().await;
}

#[tokio::test]
async fn ai_secrets_follow_the_contract_and_reach_the_proxy_at_once() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let a = Admin::start(&ca, &[("/", &up.url(), "ROUTE_SECRET")]).await;
    let proxy = ca.client(false);
    let call_proxy = || async {
        let (s, _, _) = send(&proxy, get(&a.kg.url("/z"), &[("x-api-key", &a.kg.key)])).await;
        (
            s,
            up.recorded()
                .last()
                .map(|r| r.headers["authorization"].to_str().unwrap().to_owned()),
        )
    };

    let s = a
        .ok("POST", "/v1/ai_secret", Some(json!({"name": "OPENAI_API_KEY", "type": "openai", "secret": "sk-first-value-0001", "metadata": {"a": {"x": 1}, "list": [1, 2]}})))
        .await;
    assert_eq!(s["preview_secret"], "****0001");
    for f in ["id", "created", "updated_at", "org_id"] {
        assert!(s[f].is_string(), "{f}: {s}");
    }
    let id = s["id"].as_str().unwrap().to_owned();
    let again = a
        .ok(
            "POST",
            "/v1/ai_secret",
            Some(
                json!({"name": "OPENAI_API_KEY", "type": "anthropic", "secret": "zzz-other-9999"}),
            ),
        )
        .await;
    assert_eq!(again, s, "POST on an existing name returns it unmodified");
    // PUT without secret keeps the stored one; replaces type and metadata.
    let r = a
        .ok(
            "PUT",
            "/v1/ai_secret",
            Some(json!({"name": "OPENAI_API_KEY", "type": "openai"})),
        )
        .await;
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["preview_secret"], "****0001");
    assert_eq!(r["metadata"], Value::Null);
    // PATCH: deep merge, null is "no change".
    let p = a
        .ok(
            "PATCH",
            &format!("/v1/ai_secret/{id}"),
            Some(json!({"metadata": {"a": {"x": 1}, "list": [1]}})),
        )
        .await;
    assert_eq!(p["metadata"], json!({"a": {"x": 1}, "list": [1]}));
    let p = a
        .ok("PATCH", &format!("/v1/ai_secret/{id}"), Some(json!({"metadata": {"a": {"y": 2}, "list": [3]}, "type": null, "name": null, "secret": null})))
        .await;
    assert_eq!(p["metadata"], json!({"a": {"x": 1, "y": 2}, "list": [3]}));
    assert_eq!(p["type"], "openai");
    assert_eq!(p["name"], "OPENAI_API_KEY");
    assert_eq!(p["preview_secret"], "****0001");
    // Renaming onto a taken name is a 400, never 409.
    a.ok("POST", "/v1/ai_secret", Some(json!({"name": "TAKEN"})))
        .await;
    a.err(
        "PATCH",
        &format!("/v1/ai_secret/{id}"),
        Some(json!({"name": "TAKEN"})),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // The route's secret: created, changed and deleted through the API, used at once.
    // The harness stored the route's secret; delete it through the API first.
    assert_eq!(
        call_proxy().await,
        (
            StatusCode::CREATED,
            Some(format!("Bearer {UPSTREAM_SECRET}"))
        )
    );
    a.ok(
        "DELETE",
        "/v1/ai_secret",
        Some(json!({"name": "ROUTE_SECRET"})),
    )
    .await;
    let (st, _) = call_proxy().await;
    assert_eq!(
        st,
        StatusCode::SERVICE_UNAVAILABLE,
        "deleted route secret still used"
    );
    a.ok(
        "PUT",
        "/v1/ai_secret",
        Some(json!({"name": "ROUTE_SECRET", "type": "openai", "secret": "route-value-1"})),
    )
    .await;
    assert_eq!(
        call_proxy().await,
        (StatusCode::CREATED, Some("Bearer route-value-1".to_owned()))
    );
    let rs = a
        .ok(
            "PUT",
            "/v1/ai_secret",
            Some(json!({"name": "ROUTE_SECRET", "type": "openai", "secret": "route-value-2"})),
        )
        .await;
    assert_eq!(
        call_proxy().await,
        (StatusCode::CREATED, Some("Bearer route-value-2".to_owned()))
    );
    a.ok(
        "PATCH",
        &format!("/v1/ai_secret/{}", rs["id"].as_str().unwrap()),
        Some(json!({"secret": "route-value-3"})),
    )
    .await;
    assert_eq!(
        call_proxy().await,
        (StatusCode::CREATED, Some("Bearer route-value-3".to_owned()))
    );
    let del = a
        .ok(
            "DELETE",
            "/v1/ai_secret",
            Some(json!({"name": "ROUTE_SECRET"})),
        )
        .await;
    assert_eq!(del["name"], "ROUTE_SECRET");
    assert_eq!(
        call_proxy().await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "deleted secret still used"
    );
    a.err(
        "DELETE",
        "/v1/ai_secret",
        Some(json!({"name": "ROUTE_SECRET"})),
        StatusCode::NOT_FOUND,
    )
    .await;
    a.err("DELETE", "/v1/ai_secret", None, StatusCode::BAD_REQUEST)
        .await;

    // Lists: type filter repeated or comma-joined, name filter, pages.
    a.ok(
        "POST",
        "/v1/ai_secret",
        Some(json!({"name": "ANTHROPIC_API_KEY", "type": "anthropic", "secret": "a-1234567890"})),
    )
    .await;
    a.ok(
        "POST",
        "/v1/ai_secret",
        Some(json!({"name": "GOOGLE", "type": "google", "secret": "g-1234567890"})),
    )
    .await;
    let n = |v: Value| {
        v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        n(a.ok("GET", "/v1/ai_secret?ai_secret_type=anthropic", None)
            .await),
        ["ANTHROPIC_API_KEY"]
    );
    assert_eq!(
        n(a.ok(
            "GET",
            "/v1/ai_secret?ai_secret_type=anthropic%2Cgoogle",
            None
        )
        .await),
        ["GOOGLE", "ANTHROPIC_API_KEY"]
    );
    assert_eq!(
        n(a.ok(
            "GET",
            "/v1/ai_secret?ai_secret_type=anthropic&ai_secret_type=google",
            None
        )
        .await)
        .len(),
        2
    );
    assert_eq!(
        n(a.ok("GET", "/v1/ai_secret?ai_secret_name=GOOGLE", None)
            .await),
        ["GOOGLE"]
    );
    assert_eq!(
        n(a.ok("GET", "/v1/ai_secret?limit=1", None).await),
        ["GOOGLE"]
    );
    let all = a.ok("GET", "/v1/ai_secret", None).await;
    assert_eq!(
        n(all.clone()),
        ["GOOGLE", "ANTHROPIC_API_KEY", "TAKEN", "OPENAI_API_KEY"]
    );
    for value in [
        "sk-first-value-0001",
        "route-value",
        "a-1234567890",
        "g-1234567890",
    ] {
        assert!(
            !all.to_string().contains(value),
            "a secret value was returned"
        );
    }
    // Get, delete by id, 404s.
    assert_eq!(
        a.ok("GET", &format!("/v1/ai_secret/{id}"), None).await["name"],
        "OPENAI_API_KEY"
    );
    assert_eq!(
        a.ok("DELETE", &format!("/v1/ai_secret/{id}"), None).await["id"],
        id.as_str()
    );
    a.err(
        "GET",
        &format!("/v1/ai_secret/{id}"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    a.err(
        "PATCH",
        &format!("/v1/ai_secret/{id}"),
        Some(json!({"type": "x"})),
        StatusCode::NOT_FOUND,
    )
    .await;
    a.kg.stop().await;
}

#[tokio::test]
async fn env_vars_follow_the_contract() {
    let ca = TestCa::new();
    let a = Admin::start(&ca, &[]).await;
    let e = a
        .ok("POST", "/v1/env_var", Some(json!({"object_type": "project", "object_id": "p1", "name": "DB_URL", "value": "postgres://user:pw@db/x"})))
        .await;
    assert_eq!(e["used"], Value::Null);
    assert_eq!(e["object_type"], "project");
    assert!(e.get("value").is_none());
    let id = e["id"].as_str().unwrap().to_owned();
    let again = a
        .ok("POST", "/v1/env_var", Some(json!({"object_type": "project", "object_id": "p1", "name": "DB_URL", "value": "other"})))
        .await;
    assert_eq!(again, e);
    a.ok(
        "POST",
        "/v1/env_var",
        Some(json!({"object_type": "organization", "object_id": "o1", "name": "DB_URL"})),
    )
    .await;
    a.ok(
        "PUT",
        "/v1/env_var",
        Some(json!({"object_type": "function", "object_id": "f1", "name": "TOKEN", "value": "t"})),
    )
    .await;
    let replaced = a
        .ok("PUT", "/v1/env_var", Some(json!({"object_type": "project", "object_id": "p1", "name": "DB_URL", "value": "new"})))
        .await;
    assert_eq!(replaced["id"], id.as_str());
    let e400 = a
        .err(
            "POST",
            "/v1/env_var",
            Some(json!({"object_type": "team", "object_id": "t", "name": "X"})),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(e400.contains("object_type"), "{e400}");
    a.err(
        "GET",
        "/v1/env_var?object_type=team",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.err(
        "POST",
        "/v1/env_var",
        Some(json!({"object_type": "project", "object_id": "p", "name": "A=B"})),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        ids(&a
            .ok("GET", "/v1/env_var?object_type=project&object_id=p1", None)
            .await),
        vec![id.clone()]
    );
    assert_eq!(
        ids(&a.ok("GET", "/v1/env_var?env_var_name=DB_URL", None).await).len(),
        2
    );
    assert_eq!(ids(&a.ok("GET", "/v1/env_var", None).await).len(), 3);
    assert_eq!(
        ids(&a.ok("GET", "/v1/env_var?limit=1", None).await).len(),
        1
    );
    // PATCH requires name, even unchanged.
    let m = a
        .err(
            "PATCH",
            &format!("/v1/env_var/{id}"),
            Some(json!({"value": "v"})),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(m.contains("name"), "{m}");
    let p = a
        .ok(
            "PATCH",
            &format!("/v1/env_var/{id}"),
            Some(json!({"name": "DATABASE_URL", "value": "v2"})),
        )
        .await;
    assert_eq!(p["name"], "DATABASE_URL");
    assert_eq!(
        a.ok("GET", &format!("/v1/env_var/{id}"), None).await["name"],
        "DATABASE_URL"
    );
    let all = a.ok("GET", "/v1/env_var", None).await.to_string();
    for v in ["postgres://", "\"v2\"", "\"new\""] {
        assert!(!all.contains(v), "an env var value was returned");
    }
    assert_eq!(
        a.ok("DELETE", &format!("/v1/env_var/{id}"), None).await["id"],
        id.as_str()
    );
    a.err(
        "GET",
        &format!("/v1/env_var/{id}"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    a.err(
        "DELETE",
        &format!("/v1/env_var/{id}"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    // Values are sealed at rest: not in the database file.
    let db = std::fs::read(a.kg.dir.path().join("keygate.db")).unwrap();
    let wal = std::fs::read(a.kg.dir.path().join("keygate.db-wal")).unwrap_or_default();
    for hay in [&db, &wal] {
        assert!(
            !hay.windows(11).any(|w| w == b"postgres://"),
            "env var value stored in plaintext"
        );
    }
    a.kg.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let ca = TestCa::new();
    let a = Admin::start(&ca, &[]).await;
    let before = a.ok("GET", "/v1/api_key", None).await;
    let cases: Vec<(&str, &str, Option<Value>, StatusCode, &str)> = vec![
        (
            "POST",
            "/v1/api_key",
            Some(json!({"name": 5})),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "POST",
            "/v1/api_key",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "POST",
            "/v1/api_key",
            Some(json!({"name": ""})),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "POST",
            "/v1/api_key",
            Some(json!({"name": "x", "nmae": "y"})),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        ("POST", "/v1/api_key", None, StatusCode::BAD_REQUEST, "name"),
        (
            "POST",
            "/v1/ai_secret",
            Some(json!({"name": "S", "metadata": [1]})),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "POST",
            "/v1/ai_secret",
            Some(json!({"name": "S", "secret": 42})),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "GET",
            "/v1/api_key?limit=-3",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/v1/api_key?colour=red",
            None,
            StatusCode::BAD_REQUEST,
            "unknown query parameter `colour`",
        ),
        (
            "GET",
            "/v1/ai_secret?ids=nope",
            None,
            StatusCode::BAD_REQUEST,
            "UUID",
        ),
        (
            "POST",
            "/v1/api_key?debug=1",
            Some(json!({"name": "q"})),
            StatusCode::BAD_REQUEST,
            "unknown query parameter `debug`",
        ),
        (
            "PUT",
            "/v1/ai_secret?x=1",
            Some(json!({"name": "Q"})),
            StatusCode::BAD_REQUEST,
            "unknown query parameter `x`",
        ),
        (
            "GET",
            "/v1/api_key/123",
            None,
            StatusCode::BAD_REQUEST,
            "UUID",
        ),
        (
            "PATCH",
            "/v1/api_key",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "allowed",
        ),
        (
            "PUT",
            "/v1/env_var/00000000-0000-4000-8000-000000000000",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "allowed",
        ),
        (
            "GET",
            "/v1/projects",
            None,
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
        (
            "GET",
            "/v2/api_key",
            None,
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
    ];
    for (m, p, b, want, needle) in cases {
        let e = a.err(m, p, b, want).await;
        assert!(e.contains(needle), "{m} {p}: {e:?} lacks {needle:?}");
    }
    // Malformed JSON, raw.
    let req = http::Request::post(a.kg.admin_url("/v1/ai_secret"))
        .header("authorization", format!("Bearer {}", a.key))
        .body(full("{\"name\": \"S\", "))
        .unwrap();
    let (s, _, body) = send(&a.client, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("invalid JSON"));
    // Oversized body.
    let big = json!({"name": "S", "secret": "x".repeat(300 * 1024)});
    let e = a
        .err(
            "POST",
            "/v1/ai_secret",
            Some(big),
            StatusCode::PAYLOAD_TOO_LARGE,
        )
        .await;
    assert!(e.contains("larger than"), "{e}");
    // Nothing was written by any of them.
    assert_eq!(a.ok("GET", "/v1/api_key", None).await, before);
    assert!(ids(&a.ok("GET", "/v1/ai_secret", None).await).is_empty());
    a.kg.stop().await;
}
