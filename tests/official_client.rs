//! Python tools against keygate over real TLS, with the per-run CA: the official client
//! (`braintrust-api`) against the admin listener, and the `sslyze` TLS scan (R10). Both are
//! pinned in tests/official_client/requirements.txt.
//!
//! They live in a virtual environment at `target/pyvenv` that `.ci/run` creates; when it
//! is missing this test creates it (python3 -m venv + pip install from PyPI), so that
//! `cargo test` on a fresh machine runs it too.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn venv_python() -> PathBuf {
    // The tests of this file run in parallel: one of them sets the venv up.
    static VENV: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut venv = VENV.lock().unwrap_or_else(|e| e.into_inner());
    venv.get_or_insert_with(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyvenv");
    let python = venv.join("bin/python");
    let marker = venv.join(".keygate-requirements");
    let requirements = root.join("tests/official_client/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) && python.exists()
    {
        return python;
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 is needed for the official client test");
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .expect("pip");
    assert!(
        status.success(),
        "pip install -r {} failed",
        requirements.display()
    );
    std::fs::write(&marker, wanted).unwrap();
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works_unmodified() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let ca = TestCa::new();
    // A tight admin limit, so that the client's retry-on-429 is exercised.
    let kg = Keygate::start(
        &ca,
        &[],
        "[limits]\nadmin = { per_second = 10, burst = 20 }\n",
    )
    .await;
    let (admin_key, _) = make_key(&kg, keygate::store::Role::Admin);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official_client/braintrust_flow.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env(
            "KEYGATE_ADMIN_URL",
            format!("https://127.0.0.1:{}", kg.admin.port()),
        )
        .env("KEYGATE_ADMIN_KEY", &admin_key)
        .env("KEYGATE_CA", &ca.ca_file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "official client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
    assert!(!stdout.contains(&admin_key) && !stderr.contains(&admin_key));
    kg.stop().await;
}

/// R10: Mozilla's "intermediate" profile, checked by sslyze against a listener with a
/// certificate from the per-run CA (the scan trusts that CA only through `--certinfo_ca_file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_the_listeners_compliant_with_mozilla_intermediate() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let sslyze = python.with_file_name("sslyze");
    let ca = TestCa::new();
    let kg = Keygate::start(&ca, &[], "").await;
    for port in [kg.proxy.port(), kg.admin.port()] {
        let out = tokio::process::Command::new(&sslyze)
            .arg("--mozilla_config=intermediate")
            .arg("--certinfo_ca_file")
            .arg(&ca.ca_file)
            .arg(format!("localhost:{port}"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let compliant = format!("localhost:{port}: OK - Compliant.");
        assert!(
            out.status.success() && stdout.contains(&compliant),
            "sslyze: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            "TLS 1.0 Cipher Suites:",
            "TLS 1.1 Cipher Suites:",
            "SSL 3.0 Cipher Suites:",
        ] {
            let at = stdout
                .find(line)
                .unwrap_or_else(|| panic!("{line} missing"));
            assert!(
                stdout[at..]
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l.contains("rejected")),
                "{line} not rejected:\n{stdout}"
            );
        }
        assert!(stdout.contains("Supplied CA file CA Store (N/A):   OK - Certificate is trusted"));
        eprintln!("port {port}: {compliant}");
    }
    kg.stop().await;
}
