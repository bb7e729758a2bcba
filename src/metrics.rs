//! Counters and gauges for `GET /metrics` (Prometheus text format 0.0.4) on the admin listener.
//!
//! Labels are route names, status codes, listener and limiter names: never a key, a secret or
//! anything a client chose. Every update is a relaxed atomic add; the per-route map is read
//! with a borrowed `&str`, so counting a request allocates nothing after a route's first one.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

/// Upper bounds (seconds) of the upstream latency histogram buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The label of requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

/// A Prometheus histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{}}} {sum}", labels.trim_end_matches(','));
        let _ = writeln!(
            out,
            "{name}_count{{{}}} {count}",
            labels.trim_end_matches(',')
        );
    }
}

#[derive(Default)]
struct RouteStats {
    by_status: DashMap<u16, AtomicU64>,
    upstream: Histogram,
}

/// Which limiter refused a request.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// A key (or route) quota on the proxy.
    Proxy,
    /// The per-IP failed-authentication throttle.
    AuthFailures,
    /// The admin API quota.
    Admin,
}

/// Everything `/metrics` reports that is not read from elsewhere at scrape time.
#[derive(Default)]
pub struct Metrics {
    routes: DashMap<String, Arc<RouteStats>>,
    /// Open connections: proxy, admin.
    pub connections: [AtomicI64; 2],
    /// Proxied requests whose handler is running (until the response head is ready).
    pub in_flight: AtomicI64,
    pub tls_handshake_failures: AtomicU64,
    pub cleartext_attempts: AtomicU64,
    pub exposed_keys_flagged: AtomicU64,
    refused: [AtomicU64; 3],
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// Values read at scrape time from their owners.
pub struct Snapshot {
    pub key_cache_entries: usize,
    pub key_cache_hits: u64,
    pub key_cache_misses: u64,
    pub key_store_staleness: Duration,
    pub limiter_tracked: usize,
    pub config_generation: u64,
}

impl Metrics {
    fn route(&self, route: &str) -> Arc<RouteStats> {
        if let Some(r) = self.routes.get(route) {
            return r.clone();
        }
        self.routes.entry(route.to_owned()).or_default().clone()
    }

    /// Counts one answered proxy request; `upstream` is the time to the upstream's response
    /// head when the request reached the upstream.
    pub fn request(&self, route: &str, status: u16, upstream: Option<Duration>) {
        let r = self.route(route);
        if let Some(c) = r.by_status.get(&status) {
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            r.by_status
                .entry(status)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(d) = upstream {
            r.upstream.observe(d);
        }
    }

    pub fn refused(&self, by: Refusal) {
        self.refused[by as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, s: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let mut routes: Vec<(String, Arc<RouteStats>)> = self
            .routes
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));

        out.push_str("# HELP keygate_requests_total Proxied requests answered, by route and status.\n# TYPE keygate_requests_total counter\n");
        for (name, r) in &routes {
            let mut codes: Vec<(u16, u64)> = r
                .by_status
                .iter()
                .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
                .collect();
            codes.sort_unstable();
            for (code, n) in codes {
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{route=\"{}\",code=\"{code}\"}} {n}",
                    escape(name)
                );
            }
        }
        out.push_str("# HELP keygate_upstream_response_seconds Time from sending a request upstream to its response head.\n# TYPE keygate_upstream_response_seconds histogram\n");
        for (name, r) in &routes {
            if r.upstream.count.load(Ordering::Relaxed) > 0 {
                let labels = format!("route=\"{}\",", escape(name));
                r.upstream
                    .render(&mut out, "keygate_upstream_response_seconds", &labels);
            }
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP keygate_connections Open client connections, by listener.\n# TYPE keygate_connections gauge\nkeygate_connections{{listener=\"proxy\"}} {}\nkeygate_connections{{listener=\"admin\"}} {}",
            self.connections[0].load(Ordering::Relaxed),
            self.connections[1].load(Ordering::Relaxed)
        );
        gauge(
            &mut out,
            "keygate_requests_in_flight",
            "Proxied requests (h1 requests and h2 streams) being handled, until their response head.",
            self.in_flight.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "keygate_key_cache_entries",
            "Keys (and unknown-key verdicts) in the key cache.",
            s.key_cache_entries.to_string(),
        );
        counter(
            &mut out,
            "keygate_key_cache_hits_total",
            "Key lookups answered from the cache.",
            s.key_cache_hits,
        );
        counter(
            &mut out,
            "keygate_key_cache_misses_total",
            "Key lookups that read the store.",
            s.key_cache_misses,
        );
        gauge(
            &mut out,
            "keygate_key_store_staleness_seconds",
            "Seconds since the key store was last read successfully.",
            format!("{:.3}", s.key_store_staleness.as_secs_f64()),
        );
        gauge(
            &mut out,
            "keygate_limiter_tracked",
            "Keys and IPs with rate limiter state.",
            s.limiter_tracked.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP keygate_rate_limited_total Requests refused with 429, by limiter.\n# TYPE keygate_rate_limited_total counter\nkeygate_rate_limited_total{{limiter=\"proxy\"}} {}\nkeygate_rate_limited_total{{limiter=\"auth_failures\"}} {}\nkeygate_rate_limited_total{{limiter=\"admin\"}} {}",
            self.refused[0].load(Ordering::Relaxed),
            self.refused[1].load(Ordering::Relaxed),
            self.refused[2].load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "keygate_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            self.tls_handshake_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "keygate_cleartext_attempts_total",
            "Cleartext HTTP requests refused on a TLS port.",
            self.cleartext_attempts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "keygate_exposed_keys_flagged_total",
            "Valid keys seen in cleartext requests and flagged (or revoked).",
            self.exposed_keys_flagged.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP keygate_config_reloads_total Config reloads, by outcome.\n# TYPE keygate_config_reloads_total counter\nkeygate_config_reloads_total{{outcome=\"applied\"}} {}\nkeygate_config_reloads_total{{outcome=\"refused\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed)
        );
        gauge(
            &mut out,
            "keygate_config_generation",
            "Reloads applied since start (0: the config keygate started with).",
            s.config_generation.to_string(),
        );
        out
    }
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        m.request("api", 200, Some(Duration::from_millis(3)));
        m.request("api", 200, Some(Duration::from_millis(40)));
        m.request("api", 429, None);
        m.request(NO_ROUTE, 404, None);
        m.refused(Refusal::Proxy);
        let text = m.render(&Snapshot {
            key_cache_entries: 2,
            key_cache_hits: 5,
            key_cache_misses: 1,
            key_store_staleness: Duration::from_millis(120),
            limiter_tracked: 1,
            config_generation: 0,
        });
        assert!(text.contains("keygate_requests_total{route=\"api\",code=\"200\"} 2\n"));
        assert!(text.contains("keygate_requests_total{route=\"api\",code=\"429\"} 1\n"));
        assert!(text.contains("keygate_requests_total{route=\"(none)\",code=\"404\"} 1\n"));
        assert!(text
            .contains("keygate_upstream_response_seconds_bucket{route=\"api\",le=\"0.005\"} 1\n"));
        assert!(text
            .contains("keygate_upstream_response_seconds_bucket{route=\"api\",le=\"0.05\"} 2\n"));
        assert!(text.contains("keygate_upstream_response_seconds_count{route=\"api\"} 2\n"));
        assert!(text.contains("keygate_rate_limited_total{limiter=\"proxy\"} 1\n"));
        assert!(text.contains("keygate_key_store_staleness_seconds 0.120\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
