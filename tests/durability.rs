//! Data survives a restart and a `kill -9` in the middle of writes: every write that was
//! acknowledged is there afterwards, whole, and nothing is half-written.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_mid_write_and_a_restart() {
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[limits]\nadmin = {{ per_second = 100000, burst = 100000 }}\n[upstream]\nca_file = {:?}\n\
             [[route]]\nprefix = \"/\"\nupstream = {:?}\ninject = {{ ai_secret = \"S0\" }}\n",
            ca.ca_file,
            up.url()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let mut kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    let admin_key = kg.stdout_lines[0].clone();
    let client = client_trusting(&dir.path().join("certs/ca.pem"), false);

    // Four writers create secrets as fast as they can; each records what was acknowledged.
    let acked: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let url = format!("https://127.0.0.1:{}/v1/ai_secret", kg.admin.port());
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (client, url, key, acked, next) = (
            client.clone(),
            url.clone(),
            admin_key.clone(),
            acked.clone(),
            next.clone(),
        );
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = json!({"name": format!("S{i}"), "type": "openai", "secret": format!("value-{i:06}")});
                let req = http::Request::post(&url)
                    .header("authorization", format!("Bearer {key}"))
                    .body(full(body.to_string()))
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == StatusCode::OK => {
                        acked.lock().unwrap().insert(i);
                    }
                    _ => return,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 60 {
        assert!(Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kg.child.kill().await.unwrap(); // SIGKILL, with writes in flight
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = next.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "kill -9 after {} acknowledged writes ({attempted} attempted)",
        acked.len()
    );

    // The store is intact.
    {
        let conn = rusqlite::Connection::open(dir.path().join("data/keygate.db")).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    // Restart: every acknowledged secret is there with its own value; none is half-written.
    let kg = KeygateProcess::serve(dir.path(), &["--config", &cfg], &[]).await;
    assert!(
        kg.stdout_lines.is_empty(),
        "a restart must not create another admin key"
    );
    let list_url = format!("https://127.0.0.1:{}/v1/ai_secret", kg.admin.port());
    let (s, _, list) = admin_call(&client, "GET", &list_url, Some(&admin_key), None).await;
    assert_eq!(s, StatusCode::OK);
    let objects = list["objects"].as_array().unwrap();
    let present: BTreeSet<u32> = objects
        .iter()
        .map(|o| o["name"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    assert!(
        acked.is_subset(&present),
        "acknowledged writes lost: {:?}",
        acked.difference(&present).collect::<Vec<_>>()
    );
    for o in objects {
        let i: u32 = o["name"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(
            o["preview_secret"],
            format!("****{:04}", i % 10_000).as_str(),
            "{o}"
        );
        assert_eq!(o["type"], "openai");
    }
    // And the values decrypt: S0 is the route's secret.
    let (s, _, created) = admin_call(
        &client,
        "POST",
        &format!("https://127.0.0.1:{}/v1/api_key", kg.admin.port()),
        Some(&admin_key),
        Some(json!({"name": "after-restart"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(
        &client,
        get(
            &kg.url("/check"),
            &[("x-api-key", created["key"].as_str().unwrap())],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        up.recorded().last().unwrap().headers["authorization"],
        "Bearer value-000000"
    );
    // The audit trail matches the data exactly: every secret there has its one
    // `secret.created` event, and no event names a secret that is not there (the event is in
    // the transaction of the change, so the kill cut both or neither). The API key made above
    // has its event too.
    let audit_url = format!("https://127.0.0.1:{}/v1/audit", kg.admin.port());
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            None => format!("{audit_url}?limit=1000"),
            Some(c) => format!("{audit_url}?limit=1000&starting_after={c}"),
        };
        let (s, _, page) = admin_call(&client, "GET", &url, Some(&admin_key), None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let page = page["objects"].as_array().unwrap().clone();
        let Some(last) = page.last() else { break };
        cursor = Some(last["id"].as_str().unwrap().to_owned());
        events.extend(page);
    }
    let mut created_secrets = BTreeSet::new();
    for e in &events {
        if e["action"] == "secret.created" {
            let i: u32 = e["object_name"].as_str().unwrap()[1..].parse().unwrap();
            assert!(created_secrets.insert(i), "two events for S{i}");
        }
    }
    assert_eq!(
        created_secrets, present,
        "secrets and their secret.created events differ after kill -9"
    );
    assert!(events
        .iter()
        .any(|e| e["action"] == "key.created" && e["object_name"] == "after-restart"));
    let (code, _) = kg.terminate().await;
    assert_eq!(code, Some(0));
    let (code, _, err) = cli(dir.path(), &["--config", &cfg, "audit", "verify"], b"", &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("audit trail OK"), "{err}");
}
