//! What counting a proxied request costs (`cargo bench --bench metrics`): `Metrics::request`
//! for a route and status already seen, with and without an upstream latency, on one thread and
//! on two threads counting the same route at once. Prints ns per call; asserts nothing.
//!
//! For an instruction count that does not move with machine load, run the binary under
//! callgrind with `single N` and `single 2N` and divide the difference by N (as for
//! `benches/hotpath.rs`).

use std::time::{Duration, Instant};

use keygate::metrics::Metrics;

fn count(m: &Metrics, n: u64) {
    let d = Duration::from_micros(1800);
    for i in 0..n {
        // Three of four requests reach the upstream; the fourth is answered by keygate.
        if i % 4 == 3 {
            m.request("/v1", 429, None);
        } else {
            m.request("/v1", 200, Some(d));
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "all".into());
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000_000);
    let m = Metrics::default();
    // The first requests of a route and status make their entries; they are not measured.
    count(&m, 4);
    if mode == "single" {
        count(&m, n);
        return;
    }
    let t = Instant::now();
    count(&m, n);
    println!(
        "Metrics::request, 1 thread:  {:.1} ns/call over {n} calls",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| count(&m, n));
        }
    });
    println!(
        "Metrics::request, 2 threads on one route: {:.1} ns/call (wall time ÷ calls per thread, {n} each)",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}
