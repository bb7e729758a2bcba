//! Replays the fuzz corpora on stable Rust: every file in `fuzz/corpus/<target>/` (required, not
//! empty) and in `fuzz/regressions/<target>/` (crash reproducers, when present) goes through the
//! same `keygate::fuzzing` function as the cargo-fuzz target of that name. A panic fails the test
//! and names the file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; `None` when the directory does not exist.
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    Some(out)
}

fn replay(target: &str, run: fn(&[u8])) {
    let corpus = root().join("corpus").join(target);
    let corpus_files = files(&corpus)
        .unwrap_or_else(|| panic!("corpus directory {} is missing", corpus.display()));
    assert!(
        !corpus_files.is_empty(),
        "corpus directory {} is empty",
        corpus.display()
    );
    let regressions = root().join("regressions").join(target);
    let regression_files = files(&regressions).unwrap_or_default();

    let mut failed = Vec::new();
    for path in corpus_files.iter().chain(&regression_files) {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "`keygate::fuzzing::{target}` panicked on {} of {} inputs:\n  {}",
        failed.len(),
        corpus_files.len() + regression_files.len(),
        failed.join("\n  ")
    );
}

#[test]
fn config_corpus() {
    replay("config", keygate::fuzzing::config);
}

#[test]
fn admin_json_corpus() {
    replay("admin_json", keygate::fuzzing::admin_json);
}

#[test]
fn request_head_corpus() {
    replay("request_head", keygate::fuzzing::request_head);
}
