//! Key usage figures (run with `cargo bench --bench usage`): what one request's usage note
//! costs on the hot path (`Usage::note`: a read-locked map lookup, the clock, three atomic
//! adds), with 10,000 keys rotating as in W1-h1 and with one key, and what a flush's `take`
//! costs, and the flush's one transaction into a SQLite store of 10,000 keys. Prints them;
//! asserts nothing about speed.

use std::hint::black_box;
use std::time::Instant;

use keygate::usage::Usage;

fn per_op(label: &str, n: u64, mut f: impl FnMut(u64)) {
    // Warm up, then the best of five runs: the machine is shared.
    for i in 0..n / 10 {
        f(i);
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!("{label}: {best:.1} ns");
}

fn main() {
    let u = Usage::default();
    let n = 2_000_000;
    per_op(
        "note, 10,000 keys rotating (after the first flush interval)",
        n,
        |i| u.note(black_box(u128::from(i % 10_000) + 1), i % 7 == 0),
    );
    per_op("note, one key", n, |i| u.note(black_box(42), i % 7 == 0));
    let t = Instant::now();
    let taken = u.take();
    println!(
        "take of {} keys (a flush, off the hot path): {:.2} ms",
        taken.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    // The first request of each key after a flush inserts its entry (a write-locked shard).
    let t = Instant::now();
    for i in 0..10_000u128 {
        u.note(black_box(i + 1), false);
    }
    println!(
        "note, first request of each of 10,000 keys after a flush: {:.1} ns",
        t.elapsed().as_nanos() as f64 / 10_000.0
    );

    // The flush: one transaction updating every used key (synchronous = FULL, as served).
    let dir = tempfile::tempdir().expect("temp dir");
    let master = std::sync::Arc::new(keygate::crypto::MasterKey::from_bytes(&[7; 32]));
    let store =
        keygate::store::SqliteStore::open(&dir.path().join("k.db"), master.clone()).expect("store");
    let t0 = keygate::store::Store::tenant(&store).expect("tenant");
    let made = keygate::store::issue_keys(
        &store,
        &master,
        (&t0.org_id, &t0.user_id),
        "bench",
        keygate::store::KeyOptions::role(keygate::store::Role::Proxy),
        10_000,
        &keygate::audit::Actor::Keygate,
    )
    .expect("keys");
    for round in 0..3u64 {
        let usage: Vec<keygate::store::KeyUsage> = made
            .iter()
            .map(|(_, rec)| keygate::store::KeyUsage {
                key_id: rec.id.clone(),
                last_used_ms: 1_800_000_000_000 + round,
                requests: 25,
                rate_limited: 1,
            })
            .collect();
        let t = Instant::now();
        keygate::store::Store::record_usage(&store, &usage).expect("flush");
        println!(
            "flush of 10,000 keys into SQLite (round {}): {:.1} ms",
            round + 1,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
