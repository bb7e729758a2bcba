//! The settings page end to end, in a real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm; `tests/browser/e2e.mjs` holds the browser steps).
//!
//! This test starts keygate and a recording upstream over TLS with a per-run CA, makes Chromium
//! trust that CA through an NSS database in a temporary HOME (no certificate check is skipped),
//! runs the script, then checks what the upstream and the store saw. `.ci/run` installs
//! `chromium`, `libnss3-tools` (certutil) and the npm packages; when they are missing this test
//! installs them itself (apt-get, `npm ci`), or fails saying what to install.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use keygate::store::{ListQuery, Role};
use support::*;

static NPM: Mutex<()> = Mutex::new(());

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// `npm ci` in tests/browser when playwright-core is not there yet.
fn ensure_npm_packages() {
    let _one = NPM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = browser_dir();
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--silent"])
        .current_dir(&dir)
        .status()
        .expect("npm runs (Node 20 is on the machine image)");
    assert!(status.success(), "npm ci in tests/browser failed");
}

/// Debian's chromium and certutil, installed with apt-get when missing (as .ci/run does), so
/// that `cargo test` works on a fresh machine of this project's image (root, Debian's registry
/// reachable).
fn ensure_browser() -> String {
    let _one = NPM.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::var("KG_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let certutil = Path::new("/usr/bin/certutil");
    if !Path::new(&path).exists() || !certutil.exists() {
        let ok = support::apt_install(&["chromium", "libnss3-tools"]);
        assert!(
            ok && Path::new(&path).exists(),
            "{path} or certutil is missing and apt-get could not install them: \
             install Debian's chromium and libnss3-tools (as .ci/run does)"
        );
    }
    path
}

/// A HOME whose NSS database trusts the test CA, for Chromium.
fn browser_home(ca: &TestCa) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db_arg = format!("sql:{}", db.display());
    let certutil = |args: &[&str]| {
        let out = Command::new("certutil")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("certutil: {e}"));
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    certutil(&["-d", &db_arg, "-N", "--empty-password"]);
    certutil(&[
        "-d",
        &db_arg,
        "-A",
        "-t",
        "C,,",
        "-n",
        "keygate test CA",
        "-i",
        ca.ca_file.to_str().unwrap(),
    ]);
    home
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_page_manages_keys_secrets_and_env_vars_in_chromium() {
    let chromium = ensure_browser();
    ensure_npm_packages();
    let ca = TestCa::new();
    let up = FakeUpstream::start(&ca).await;
    // An admin allowance the whole flow fits in (about 60 calls), small enough that the page's
    // last step reaches a 429 by clicking in a few seconds. Key usage is written to the store
    // every 200ms (10 s by default), so the page shows a use without the test waiting long.
    let kg = Keygate::start(
        &ca,
        &[("/", &up.url(), "S")],
        "[limits]\nadmin = { per_second = 2, burst = 100 }\n\
         [keys]\nusage_flush_interval = \"200ms\"\n",
    )
    .await;
    let (admin_key, _) = make_key(&kg, Role::Admin);
    let home = browser_home(&ca);
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("settings-page.png");
    let _ = std::fs::remove_file(&screenshot);

    let out = tokio::process::Command::new("node")
        .arg("e2e.mjs")
        .current_dir(browser_dir())
        .env(
            "KG_ADMIN_URL",
            format!("https://127.0.0.1:{}", kg.admin.port()),
        )
        .env(
            "KG_PROXY_URL",
            format!("https://127.0.0.1:{}", kg.proxy.port()),
        )
        .env("KG_CA_FILE", &ca.ca_file)
        .env("KG_ADMIN_KEY", &admin_key)
        .env("KG_PROXY_KEY", &kg.key)
        .env("KG_BROWSER_HOME", home.path())
        .env("KG_SCREENSHOT", &screenshot)
        .env("KG_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), out)
        .await
        .expect("the browser test ends within 4 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for k in [&admin_key, &kg.key] {
        assert!(!stdout.contains(k.as_str()) && !stderr.contains(k.as_str()));
    }
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser steps failed:\n{stdout}\n{stderr}"
    );
    println!("screenshot: {}", screenshot.display());
    println!(
        "activity screenshot: {}",
        screenshot
            .with_file_name("settings-page-activity.png")
            .display()
    );

    // The upstream saw exactly the one request made with the new key while it lived, with the
    // injected credential in place of the key.
    let seen = up.recorded();
    let paths: Vec<&str> = seen.iter().map(|r| r.uri.path()).collect();
    assert_eq!(
        paths,
        ["/e2e/accepted"],
        "only the accepted request reached the upstream"
    );
    let r = &seen[0];
    assert!(r.headers.get("x-api-key").is_none());
    assert_eq!(
        r.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}").as_str()
    );

    // What the page created and deleted, as the store has it now.
    let (_, store) = kg.store();
    let org = store.tenant().unwrap().org_id;
    let keys = store.list_api_keys(&ListQuery::all(&org, 1000)).unwrap();
    let names: Vec<String> = keys.iter().map(|k| k.name.clone()).collect();
    for gone in ["e2e-browser", "<img src=x onerror=alert(1)>"] {
        assert!(!names.iter().any(|n| n == gone), "{gone:?} was deleted");
    }
    for kept in ["ci-pipeline", "slack-bot"] {
        assert!(names.iter().any(|n| n == kept), "{kept:?} was created");
    }
    // The proxy key the page refused at sign-in (403 from the admin API) counted one use.
    let refused = keys
        .iter()
        .find(|k| k.id == kg.key_id)
        .expect("the proxy key");
    assert_eq!((refused.request_count, refused.rate_limited_count), (1, 0));
    assert!(refused.last_used.is_some());
    let secrets = store
        .list_ai_secrets(&ListQuery::all(&org, 1000), &[])
        .unwrap();
    assert!(
        secrets.iter().all(|s| s.name != "E2E_SECRET"),
        "the secret was deleted"
    );
    let vars = store
        .list_env_vars(&ListQuery::all(&org, 1000), &Default::default())
        .unwrap();
    assert!(
        vars.iter().all(|v| v.name != "E2E_VAR"),
        "the env var was deleted"
    );
    kg.stop().await;
}
