//! Rate limits over real TLS: the 429 answer and its headers, `RateLimit` on admitted answers,
//! quotas changed through the admin API, the per-IP throttle on failed authentication, and the
//! rule that a limited request never reaches the upstream.

mod support;

use http::StatusCode;
use serde_json::json;
use support::*;

fn upstream_hits(up: &FakeUpstream) -> usize {
    up.recorded().len()
}

#[tokio::test]
async fn over_quota_is_a_429_with_standard_headers_and_no_upstream_contact() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "K")],
        "[limits]\ndefault = { per_second = 0.2, burst = 2 }\n",
    )
    .await;
    let client = ca.client(false);
    let call = || send(&client, get(&kg.url("/r"), &[("x-api-key", &kg.key)]));
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"default\";r=1;t=5");
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=10");
    let before = upstream_hits(&up);
    let (s, h, body) = call().await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(&body[..], br#"{"error":"rate limit exceeded"}"#);
    assert_eq!(h["retry-after"], "5");
    assert_eq!(h["ratelimit-policy"], "\"default\";q=2;w=10");
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=5");
    assert_eq!(h["content-type"], "application/json");
    for _ in 0..20 {
        assert_eq!(call().await.0, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(
        upstream_hits(&up),
        before,
        "a limited request reached the upstream"
    );
    // Another key is not affected.
    let (other, _) = make_key(&kg, keygate::store::Role::Proxy);
    let (s, _, _) = send(&client, get(&kg.url("/r"), &[("x-api-key", &other)])).await;
    assert_eq!(s, StatusCode::CREATED);
    kg.stop().await;
}

#[tokio::test]
async fn a_key_quota_set_through_the_admin_api_applies_on_the_next_request() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], "").await;
    let (admin, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);
    let (s, _, created) = admin_call(
        &client,
        "POST",
        &kg.admin_url("/v1/api_key"),
        Some(&admin),
        Some(json!({"name": "tight", "rate_limit": {"per_second": 0.5, "burst": 1}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{created}");
    assert_eq!(
        created["rate_limit"],
        json!({"per_second": 0.5, "burst": 1})
    );
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let call = || send(&client, get(&kg.url("/q"), &[("x-api-key", &key)]));
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"key\";r=0;t=2");
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["retry-after"], "2", "whole seconds, rounded up");
    assert_eq!(h["ratelimit-policy"], "\"key\";q=1;w=2");
    // Raise it: the very next request is admitted under the new quota.
    let (s, _, patched) = admin_call(
        &client,
        "PATCH",
        &kg.admin_url(&format!("/v1/api_key/{id}")),
        Some(&admin),
        Some(json!({"rate_limit": {"per_second": 100, "burst": 50}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{patched}");
    assert_eq!(patched["rate_limit"]["burst"], 50);
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"key\";r=49;t=1");
    // Clear it: back to the default quota.
    let (s, _, cleared) = admin_call(
        &client,
        "PATCH",
        &kg.admin_url(&format!("/v1/api_key/{id}")),
        Some(&admin),
        Some(json!({"rate_limit": null})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cleared["rate_limit"], serde_json::Value::Null);
    let (s, h, _) = call().await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(h["ratelimit"].to_str().unwrap().starts_with("\"default\";"));
    // Bad quotas are refused.
    for bad in [
        json!({"per_second": 0, "burst": 1}),
        json!({"per_second": 1, "burst": 0}),
        json!({"per_second": 1}),
    ] {
        let (s, _, _) = admin_call(
            &client,
            "PATCH",
            &kg.admin_url(&format!("/v1/api_key/{id}")),
            Some(&admin),
            Some(json!({ "rate_limit": bad })),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
    kg.stop().await;
}

#[tokio::test]
async fn failed_authentication_is_throttled_per_ip_only() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    // A slow refill, so that the count below does not depend on how fast the machine is.
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "K")],
        "[limits]\nauth_failures = { per_second = 0.1, burst = 20 }\n",
    )
    .await;
    let state = kg.running.as_ref().unwrap().state.clone();
    let tracked_before = state.live().limits.tracked();
    let attacker = client_from(&ca.ca_file, false, Some("127.0.0.1".parse().unwrap()));
    let mut statuses = Vec::new();
    for i in 0..30 {
        let guess = format!("sk-{:048}", i);
        let (s, h, _) = send(&attacker, get(&kg.url("/g"), &[("x-api-key", &guess)])).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
        }
        statuses.push(s);
    }
    let unauthorized = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(
        unauthorized, 20,
        "burst of 20 failures, then 429: {statuses:?}"
    );
    assert!(statuses[20..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));
    // While blocked, even a valid key from that IP gets 429 before any lookup.
    let (s, _, _) = send(&attacker, get(&kg.url("/g"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Another client IP with a valid key is not affected.
    let neighbour = client_from(&ca.ca_file, false, Some("127.0.0.2".parse().unwrap()));
    let (s, _, _) = send(&neighbour, get(&kg.url("/g"), &[("x-api-key", &kg.key)])).await;
    assert_eq!(s, StatusCode::CREATED);
    // The admin listener shares the throttle: the blocked IP gets 429 there as well.
    let (s, h, _) = admin_call(
        &attacker,
        "GET",
        &kg.admin_url("/v1/api_key"),
        Some("sk-nope"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key("retry-after"));
    // Thirty unknown keys created no per-key state: only the attacker IP's and the neighbour
    // key's.
    assert!(
        state.live().limits.tracked() <= tracked_before + 2,
        "unknown keys created limiter state: {} -> {}",
        tracked_before,
        state.live().limits.tracked()
    );
    kg.stop().await;
}

#[tokio::test]
async fn route_quotas_hold_keys_to_the_stricter_limit() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let extra = format!(
        "[[route]]\nname = \"scarce\"\nprefix = \"/scarce\"\nupstream = \"{}\"\ninject = {{ ai_secret = \"K\" }}\nlimit = {{ per_second = 0.2, burst = 1 }}\n",
        up.url()
    );
    let kg = Keygate::start(&ca, &[("/", &up.url(), "K")], &extra).await;
    let client = ca.client(true);
    let call = |p: &'static str| send(&client, get(&kg.url(p), &[("x-api-key", &kg.key)]));
    let (s, h, _) = call("/scarce/a").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["ratelimit"], "\"route\";r=0;t=5");
    let (s, h, _) = call("/scarce/a").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["ratelimit-policy"], "\"route\";q=1;w=5");
    // The key's own (default) quota still has room on other routes.
    let (s, h, _) = call("/other").await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(
        h["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"default\";r=18"),
        "{:?}",
        h["ratelimit"]
    );
    kg.stop().await;
}

#[tokio::test]
async fn the_admin_api_is_rate_limited_per_key() {
    let ca = TestCa::new();
    let kg = Keygate::start(
        &ca,
        &[],
        "[limits]\nadmin = { per_second = 0.2, burst = 3 }\n",
    )
    .await;
    let (admin, _) = make_key(&kg, keygate::store::Role::Admin);
    let (admin2, _) = make_key(&kg, keygate::store::Role::Admin);
    let client = ca.client(false);
    let url = kg.admin_url("/v1/ai_secret");
    for i in 0..3 {
        let (s, h, _) = admin_call(&client, "GET", &url, Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            h["ratelimit"],
            format!("\"admin\";r={};t={}", 2 - i, 5 * (i + 1)).as_str()
        );
    }
    let (s, h, body) = admin_call(&client, "GET", &url, Some(&admin), None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body, json!({"error": "rate limit exceeded"}));
    assert_eq!(h["retry-after"], "5");
    assert_eq!(h["ratelimit-policy"], "\"admin\";q=3;w=15");
    let (s, _, _) = admin_call(&client, "GET", &url, Some(&admin2), None).await;
    assert_eq!(s, StatusCode::OK, "another admin key is not affected");
    kg.stop().await;
}
