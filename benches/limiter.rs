//! Rate limiter figures (run with `cargo bench --bench limiter`): memory per limited key, and
//! the cost of an admission and of the 429 path. Prints them; asserts nothing about speed.
//!
//! Memory is the growth of this process's resident set while limiter state for N distinct keys
//! is created, divided by N. The 429 path is `check_key` refusing an exhausted key plus building
//! the 429 response (`error::rate_limited`), as the proxy does after the key cache hit.

use std::time::Instant;

use keygate::config::{LimitSpec, LimitsConfig};
use keygate::proxy::limit::Limiters;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn limiters() -> Limiters {
    let spec = LimitSpec::new(10.0, 20).expect("valid quota");
    Limiters::new(
        &LimitsConfig {
            default: spec,
            auth_failures: spec,
            admin: spec,
            backend: Default::default(),
        },
        &[],
    )
}

fn main() {
    for n in [10_000u128, 100_000, 1_000_000] {
        let l = limiters();
        let before = rss_kib();
        let t = Instant::now();
        for uid in 0..n {
            let _ = l.check_key(uid.wrapping_mul(0x9E37_79B9_7F4A_7C15), None, 0);
        }
        let took = t.elapsed();
        let after = rss_kib();
        println!(
            "limiter state for {n:>9} keys: {:>6.1} bytes/key (RSS +{} KiB), admission {:>5.0} ns/check, tracked {}",
            (after.saturating_sub(before) * 1024) as f64 / n as f64,
            after.saturating_sub(before),
            took.as_nanos() as f64 / n as f64,
            l.tracked()
        );
    }

    let l = limiters();
    for _ in 0..20 {
        let _ = l.check_key(42, None, 0);
    }
    let rounds = 1_000_000u32;
    let t = Instant::now();
    let mut refused = 0u32;
    for _ in 0..rounds {
        if let Err(limited) = l.check_key(42, None, 0) {
            let res = keygate::error::rate_limited(&limited);
            refused += u32::from(res.status() == http::StatusCode::TOO_MANY_REQUESTS);
        }
    }
    let took = t.elapsed();
    println!(
        "429 path (refused check + 429 response built): {:.0} ns/request over {rounds} requests ({refused} refused)",
        took.as_nanos() as f64 / f64::from(rounds)
    );

    let t = Instant::now();
    for _ in 0..rounds {
        let _ = l.check_key(42, None, 0);
    }
    println!(
        "refused check alone: {:.0} ns/request",
        t.elapsed().as_nanos() as f64 / f64::from(rounds)
    );
}
