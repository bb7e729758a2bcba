//! Counters and gauges for `GET /metrics` (Prometheus text format 0.0.4) on the admin listener.
//!
//! Why `prometheus-client`: it is the Prometheus project's official Rust client, and the text
//! it replaced was written by hand here (a 300-line module doing its own label escaping, number
//! formatting and `# HELP`/`# TYPE` lines). The client's encoder does those, and its tests parse
//! its output with the Python client's parser. Its Prometheus text encoder (not its OpenMetrics
//! one) keeps the exposition as it was: the same names, types, labels and `le` values, served
//! as `text/plain; version=0.0.4`.
//!
//! Labels are route names, status codes, listener, limiter and outcome names: never a key, a
//! secret or anything a client chose. Route names come from the config; the encoder escapes `\`,
//! `"` and newlines in label values. Counting a request reads the per-route handles with a
//! borrowed `&str` and adds to relaxed atomics, so it allocates nothing after a route's first
//! request with a given status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::one::Ref;
use dashmap::DashMap;
use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the upstream latency histogram buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The label of requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCode {
    route: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimiterLabel {
    limiter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The upstream latency histogram of one route: relaxed atomic adds, encoded by the client as a
/// histogram. The client's own `Histogram` takes a mutex and measured about 80 instructions
/// more per observation (`benches/metrics.rs` under callgrind), on every proxied request.
#[derive(Clone, Debug, Default)]
struct Latency(Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Per bucket, not cumulative; observations above the last bound are only in `count`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Latency {
    fn observe(&self, d: Duration) {
        let c = &self.0;
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            c.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        c.count.fetch_add(1, Ordering::Relaxed);
        c.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        if c.count.load(Ordering::Relaxed) == 0 {
            // A route that never reached its upstream (or `(none)`) shows no histogram.
            return Ok(());
        }
        // The encoder adds up the buckets and writes the `+Inf` one from the count.
        let buckets: [(f64, u64); LATENCY_BUCKETS.len()] =
            std::array::from_fn(|i| (LATENCY_BUCKETS[i], c.buckets[i].load(Ordering::Relaxed)));
        let count = c.count.load(Ordering::Relaxed);
        let sum = c.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One route's handles into the families, so that counting a request needs no owned label set.
struct RouteStats {
    by_status: DashMap<u16, Counter>,
    upstream: Latency,
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
pub struct Metrics {
    routes: DashMap<String, RouteStats>,
    requests: Family<RouteCode, Counter>,
    upstream: Family<RouteLabel, Latency>,
    connections_by_listener: Family<ListenerLabel, Gauge>,
    /// Open connections: proxy, admin.
    pub connections: [Gauge; 2],
    /// Proxied requests whose handler is running (until the response head is ready).
    pub in_flight: Gauge,
    pub tls_handshake_failures: Counter,
    pub cleartext_attempts: Counter,
    pub exposed_keys_flagged: Counter,
    rate_limited: Family<LimiterLabel, Counter>,
    /// By [`Refusal`]: proxy, auth_failures, admin.
    refused: [Counter; 3],
    reloads: Family<OutcomeLabel, Counter>,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    /// Quota checks the local limiter answered because Redis (`limits.backend = "redis"`) was
    /// not answering.
    pub limiter_degraded: Counter,
    /// 1 while quota checks go to the local limiter instead of Redis, else 0.
    pub limiter_degraded_now: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        // The fixed label values are made here, so they are reported (as 0) from the start.
        let connections_by_listener = Family::<ListenerLabel, Gauge>::default();
        let connections = ["proxy", "admin"].map(|listener| {
            connections_by_listener.get_or_create_owned(&ListenerLabel { listener })
        });
        let rate_limited = Family::<LimiterLabel, Counter>::default();
        let refused = ["proxy", "auth_failures", "admin"]
            .map(|limiter| rate_limited.get_or_create_owned(&LimiterLabel { limiter }));
        let reloads = Family::<OutcomeLabel, Counter>::default();
        let [reloads_ok, reloads_failed] = ["applied", "refused"]
            .map(|outcome| reloads.get_or_create_owned(&OutcomeLabel { outcome }));
        Metrics {
            routes: DashMap::new(),
            requests: Family::default(),
            upstream: Family::default(),
            connections_by_listener,
            connections,
            in_flight: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            cleartext_attempts: Counter::default(),
            exposed_keys_flagged: Counter::default(),
            rate_limited,
            refused,
            reloads,
            reloads_ok,
            reloads_failed,
            limiter_degraded: Counter::default(),
            limiter_degraded_now: Gauge::default(),
        }
    }
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
    /// The route's handles. The shard's read guard is held while the request is counted (no
    /// `Arc` to clone and drop); it takes no other lock of `routes`.
    fn route(&self, route: &str) -> Ref<'_, String, RouteStats> {
        if let Some(r) = self.routes.get(route) {
            return r;
        }
        self.routes
            .entry(route.to_owned())
            .or_insert_with(|| RouteStats {
                by_status: DashMap::new(),
                upstream: self.upstream.get_or_create_owned(&RouteLabel {
                    route: route.to_owned(),
                }),
            })
            .downgrade()
    }

    /// Counts one answered proxy request; `upstream` is the time to the upstream's response
    /// head when the request reached the upstream.
    pub fn request(&self, route: &str, status: u16, upstream: Option<Duration>) {
        let r = self.route(route);
        if let Some(c) = r.by_status.get(&status) {
            c.inc();
        } else {
            r.by_status
                .entry(status)
                .or_insert_with(|| {
                    self.requests.get_or_create_owned(&RouteCode {
                        route: route.to_owned(),
                        code: status,
                    })
                })
                .inc();
        }
        if let Some(d) = upstream {
            r.upstream.observe(d);
        }
    }

    pub fn refused(&self, by: Refusal) {
        self.refused[by as usize].inc();
    }

    /// The Prometheus text exposition.
    ///
    /// The registry is made for each scrape: it is only the list of descriptions over the
    /// shared handles, and the [`Snapshot`] values go in as constants, with no state shared
    /// between scrapes. `Registry` adds the `_total` suffix of counters, the unit suffix and
    /// the full stop of the help texts.
    pub fn render(&self, s: &Snapshot) -> String {
        let mut r = Registry::default();
        r.register(
            "keygate_requests",
            "Proxied requests answered, by route and status",
            self.requests.clone(),
        );
        r.register_with_unit(
            "keygate_upstream_response",
            "Time from sending a request upstream to its response head",
            Unit::Seconds,
            self.upstream.clone(),
        );
        r.register(
            "keygate_connections",
            "Open client connections, by listener",
            self.connections_by_listener.clone(),
        );
        r.register(
            "keygate_requests_in_flight",
            "Proxied requests (h1 requests and h2 streams) being handled, until their response head",
            self.in_flight.clone(),
        );
        r.register(
            "keygate_key_cache_entries",
            "Keys (and unknown-key verdicts) in the key cache",
            ConstGauge::new(s.key_cache_entries),
        );
        r.register(
            "keygate_key_cache_hits",
            "Key lookups answered from the cache",
            ConstCounter::new(s.key_cache_hits),
        );
        r.register(
            "keygate_key_cache_misses",
            "Key lookups that read the store",
            ConstCounter::new(s.key_cache_misses),
        );
        r.register_with_unit(
            "keygate_key_store_staleness",
            "Seconds since the key store was last read successfully",
            Unit::Seconds,
            // Millisecond resolution, as before.
            ConstGauge::new(s.key_store_staleness.as_millis() as f64 / 1000.0),
        );
        r.register(
            "keygate_limiter_tracked",
            "Keys and IPs with rate limiter state",
            ConstGauge::new(s.limiter_tracked),
        );
        r.register(
            "keygate_rate_limited",
            "Requests refused with 429, by limiter",
            self.rate_limited.clone(),
        );
        r.register(
            "keygate_limiter_degraded",
            "1 while Redis does not answer and each instance enforces the quotas alone, else 0",
            self.limiter_degraded_now.clone(),
        );
        r.register(
            "keygate_limiter_degraded_checks",
            "Quota checks answered by the local limiter because Redis did not answer",
            self.limiter_degraded.clone(),
        );
        r.register(
            "keygate_tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            self.tls_handshake_failures.clone(),
        );
        r.register(
            "keygate_cleartext_attempts",
            "Cleartext HTTP requests refused on a TLS port",
            self.cleartext_attempts.clone(),
        );
        r.register(
            "keygate_exposed_keys_flagged",
            "Valid keys seen in cleartext requests and flagged (or revoked)",
            self.exposed_keys_flagged.clone(),
        );
        r.register(
            "keygate_config_reloads",
            "Config reloads, by outcome",
            self.reloads.clone(),
        );
        r.register(
            "keygate_config_generation",
            "Reloads applied since start (0: the config keygate started with)",
            ConstGauge::new(s.config_generation),
        );
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_text::encode(&mut out, &r) {
            // Writing to a String does not fail; a value out of a gauge's range would.
            tracing::error!(error = %e, "encoding /metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            key_cache_entries: 2,
            key_cache_hits: 5,
            key_cache_misses: 1,
            key_store_staleness: Duration::from_millis(120),
            limiter_tracked: 1,
            config_generation: 0,
        }
    }

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        m.request("api", 200, Some(Duration::from_millis(3)));
        m.request("api", 200, Some(Duration::from_millis(40)));
        m.request("api", 429, None);
        m.request(NO_ROUTE, 404, None);
        m.refused(Refusal::Proxy);
        let text = m.render(&snapshot());
        assert!(text.contains("keygate_requests_total{route=\"api\",code=\"200\"} 2\n"));
        assert!(text.contains("keygate_requests_total{route=\"api\",code=\"429\"} 1\n"));
        assert!(text.contains("keygate_requests_total{route=\"(none)\",code=\"404\"} 1\n"));
        assert!(text
            .contains("keygate_upstream_response_seconds_bucket{route=\"api\",le=\"0.005\"} 1\n"));
        assert!(text
            .contains("keygate_upstream_response_seconds_bucket{route=\"api\",le=\"0.05\"} 2\n"));
        assert!(text.contains("keygate_upstream_response_seconds_count{route=\"api\"} 2\n"));
        assert!(text.contains("keygate_rate_limited_total{limiter=\"proxy\"} 1\n"));
        assert!(text.contains("keygate_key_store_staleness_seconds 0.12\n"));
        // A route that never reached its upstream has no histogram.
        assert!(!text.contains("route=\"(none)\",le="), "{text}");
    }

    /// The families, their types and help texts, and the histogram's `le` values, as the
    /// hand-written exposition had them.
    #[test]
    fn families_types_and_buckets_are_unchanged() {
        let m = Metrics::default();
        m.request("api", 200, Some(Duration::from_secs(31)));
        let text = m.render(&snapshot());
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(
            types,
            [
                "# TYPE keygate_requests_total counter",
                "# TYPE keygate_upstream_response_seconds histogram",
                "# TYPE keygate_connections gauge",
                "# TYPE keygate_requests_in_flight gauge",
                "# TYPE keygate_key_cache_entries gauge",
                "# TYPE keygate_key_cache_hits_total counter",
                "# TYPE keygate_key_cache_misses_total counter",
                "# TYPE keygate_key_store_staleness_seconds gauge",
                "# TYPE keygate_limiter_tracked gauge",
                "# TYPE keygate_rate_limited_total counter",
                "# TYPE keygate_limiter_degraded gauge",
                "# TYPE keygate_limiter_degraded_checks_total counter",
                "# TYPE keygate_tls_handshake_failures_total counter",
                "# TYPE keygate_cleartext_attempts_total counter",
                "# TYPE keygate_exposed_keys_flagged_total counter",
                "# TYPE keygate_config_reloads_total counter",
                "# TYPE keygate_config_generation gauge",
            ]
        );
        assert!(text.contains(
            "# HELP keygate_requests_total Proxied requests answered, by route and status.\n"
        ));
        let le: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("keygate_upstream_response_seconds_bucket{route=\"api\",le=\"")
            })
            .map(|l| l.split('"').next().unwrap_or_default())
            .collect();
        assert_eq!(
            le,
            [
                "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
                "2.5", "5", "10", "30", "+Inf"
            ]
        );
        for line in [
            "keygate_upstream_response_seconds_bucket{route=\"api\",le=\"30\"} 0",
            "keygate_upstream_response_seconds_bucket{route=\"api\",le=\"+Inf\"} 1",
            "keygate_upstream_response_seconds_sum{route=\"api\"} 31.0",
            "keygate_connections{listener=\"proxy\"} 0",
            "keygate_connections{listener=\"admin\"} 0",
            "keygate_rate_limited_total{limiter=\"auth_failures\"} 0",
            "keygate_rate_limited_total{limiter=\"admin\"} 0",
            "keygate_config_reloads_total{outcome=\"applied\"} 0",
            "keygate_config_reloads_total{outcome=\"refused\"} 0",
            "keygate_key_cache_hits_total 5",
            "keygate_config_generation 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.request("a\"b\\c\nd", 200, Some(Duration::from_millis(1)));
        let text = m.render(&snapshot());
        assert!(
            text.contains("keygate_requests_total{route=\"a\\\"b\\\\c\\nd\",code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("keygate_upstream_response_seconds_count{route=\"a\\\"b\\\\c\\nd\"} 1\n")
        );
        // Every sample is one line: the newline in the route name did not break one.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("keygate_"), "{l:?}");
        }
    }
}
