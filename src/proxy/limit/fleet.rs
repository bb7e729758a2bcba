//! Fleet quotas: the per-key and per-route quotas of every keygate instance kept in one Redis
//! (`[limits] backend = "redis"`), so that a key gets its quota once across the fleet, not once
//! per instance.
//!
//! ```text
//!  request ─▶ Redis healthy? ──no──────────────────────────────▶ local limiter (counted)
//!                 │yes
//!                 ▼
//!             gcra.lua: every quota of the request in one EVALSHA, Redis's clock
//!                 │ answer within 250 ms ──▶ admitted / refused (headers as the local ones)
//!                 │ error or no answer ─────▶ degraded (WARN once) ─▶ local limiter (counted)
//!
//!  degraded: a probe every second (connect, PING) ──answers──▶ healthy again (INFO once)
//! ```
//!
//! While degraded, each instance enforces the full quota on its own: a fleet of N instances
//! may admit up to N times a key's quota until Redis answers again. Never a 5xx because Redis
//! is down, and never a key without a limit.
//!
//! Redis keys, one per (quota, key), holding the quota's theoretical arrival time in
//! microseconds and expiring when the bucket is full again:
//! `{prefix}q:{default|key}:{rate in thousandths}:{burst}:{uid, 32 hex}` and
//! `{prefix}q:route:{rate}:{burst}:{uid}:{route name}`. The quota is part of the name, so a
//! changed quota starts fresh, as the local limiter's does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use super::{Admitted, Checking, Limiters, Quotas, Refused};
use crate::config::{LimitSpec, LimitsConfig, RedisLimits, RedisUrl, Route};
use crate::metrics::Metrics;

/// How long a quota check waits for Redis before the local limiter answers instead.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(250);
/// How often a degraded instance asks Redis whether it is back.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The GCRA script (see the file for its keys, arguments and answer).
const GCRA: &str = include_str!("gcra.lua");

/// One quota of a request, as the script takes it.
struct Quota {
    key: String,
    policy: &'static str,
    spec: LimitSpec,
}

impl Quota {
    /// The emission interval in microseconds (at least 1).
    fn interval_us(&self) -> u64 {
        ((1_000_000.0 / self.spec.per_second()).round() as u64).max(1)
    }

    /// The burst tolerance in microseconds.
    fn tolerance_us(&self) -> u64 {
        self.interval_us() * u64::from(self.spec.burst.saturating_sub(1))
    }
}

/// The script's verdict on one quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Admit { remaining: u32 },
    Refuse { wait: Duration },
}

/// The connection to the fleet's Redis and whether it is answering.
pub struct RedisLink {
    client: ::redis::Client,
    /// `None` until connected, and after a failed probe (the next probe starts afresh).
    conn: ArcSwapOption<ConnectionManager>,
    script: ::redis::Script,
    prefix: String,
    /// The URL without its password, for log lines.
    url: RedisUrl,
    degraded: AtomicBool,
    metrics: Arc<Metrics>,
}

impl RedisLink {
    /// The link to the Redis of `cfg`, connected if Redis answers now; if it does not, the
    /// link starts degraded (local limits) and the probe connects later.
    pub async fn start(cfg: &RedisLimits, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        // The error text of the client could quote the URL: it is not passed on.
        let client = ::redis::Client::open(cfg.url.expose())
            .map_err(|_| format!("limits.redis_url: {} cannot be used", cfg.url))?;
        let link = Arc::new(RedisLink {
            client,
            conn: ArcSwapOption::empty(),
            script: ::redis::Script::new(GCRA),
            prefix: cfg.prefix.clone(),
            url: cfg.url.clone(),
            degraded: AtomicBool::new(true),
            metrics,
        });
        link.metrics.limiter_degraded_now.set(1);
        if link.probe().await {
            link.degraded.store(false, Ordering::SeqCst);
            link.metrics.limiter_degraded_now.set(0);
            tracing::info!(redis = %link.url, "per-key and per-route quotas are kept in Redis");
        } else {
            tracing::warn!(redis = %link.url,
                "Redis is not usable (unreachable, not answering, or refusing the credentials); each instance enforces the quotas alone until it is");
        }
        Ok(link)
    }

    /// Whether quota checks go to the local limiter now.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Runs the quotas of one request in Redis; `None` when Redis is degraded or does not
    /// answer in time (the caller asks the local limiter).
    async fn check(&self, quotas: &[Quota]) -> Option<Vec<Verdict>> {
        if self.degraded() {
            return None;
        }
        let Some(conn) = self.conn.load_full() else {
            self.degrade("not connected");
            return None;
        };
        let mut conn = (*conn).clone();
        let mut call = self.script.prepare_invoke();
        for q in quotas {
            call.key(&q.key).arg(q.interval_us()).arg(q.tolerance_us());
        }
        let answer = tokio::time::timeout(ANSWER_WITHIN, call.invoke_async::<Vec<i64>>(&mut conn));
        match answer.await {
            Ok(Ok(v)) if v.len() == 2 * quotas.len() => Some(
                v.chunks(2)
                    .map(|p| match p {
                        [1, remaining] => Verdict::Admit {
                            remaining: u32::try_from(*remaining).unwrap_or(0),
                        },
                        [_, wait] => Verdict::Refuse {
                            wait: Duration::from_micros(u64::try_from(*wait).unwrap_or(0)),
                        },
                        _ => Verdict::Refuse {
                            wait: Duration::ZERO,
                        },
                    })
                    .collect(),
            ),
            Ok(Ok(_)) => {
                self.degrade("the quota script answered with an unexpected shape");
                None
            }
            // The error's kind only: the text of some errors carries server replies.
            Ok(Err(e)) => {
                self.degrade(&format!("error ({:?})", e.kind()));
                None
            }
            Err(_) => {
                self.degrade("no answer within 250 ms");
                None
            }
        }
    }

    fn degrade(&self, why: &str) {
        if !self.degraded.swap(true, Ordering::SeqCst) {
            self.metrics.limiter_degraded_now.set(1);
            tracing::warn!(redis = %self.url, reason = why,
                "Redis quota check failed; each instance enforces the quotas alone until Redis answers");
        }
    }

    fn recover(&self) {
        if self.degraded.swap(false, Ordering::SeqCst) {
            self.metrics.limiter_degraded_now.set(0);
            tracing::info!(redis = %self.url, "Redis answers again; quotas are global again");
        }
    }

    /// Connects if need be and PINGs; a failure drops the connection, so that the next probe
    /// starts with a fresh one.
    async fn probe(&self) -> bool {
        if self.conn.load().is_none() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(ANSWER_WITHIN)
                .set_response_timeout(ANSWER_WITHIN)
                .set_number_of_retries(1)
                .set_max_delay(ANSWER_WITHIN.as_millis() as u64);
            let connect = ConnectionManager::new_with_config(self.client.clone(), config);
            match tokio::time::timeout(PROBE_EVERY, connect).await {
                Ok(Ok(c)) => self.conn.store(Some(Arc::new(c))),
                _ => return false,
            }
        }
        let Some(conn) = self.conn.load_full() else {
            return false;
        };
        let mut conn = (*conn).clone();
        let cmd = ::redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        let ok = matches!(tokio::time::timeout(ANSWER_WITHIN, ping).await, Ok(Ok(_)));
        if !ok {
            self.conn.store(None);
        }
        ok
    }

    /// While degraded, probes Redis every [`PROBE_EVERY`] and goes back to it when it answers.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::server::signalled(&mut shutdown) => return,
            }
            if self.degraded() && self.probe().await {
                self.recover();
            }
        }
    }
}

/// The quotas of a config snapshot checked in Redis, with the local limiters of the same
/// snapshot answering while Redis does not.
pub struct FleetQuotas {
    link: Arc<RedisLink>,
    default: LimitSpec,
    /// (route name, its quota), indexed like the configured routes.
    routes: Vec<Option<(Arc<str>, LimitSpec)>>,
    local: Arc<Limiters>,
}

impl FleetQuotas {
    pub fn new(
        link: Arc<RedisLink>,
        cfg: &LimitsConfig,
        routes: &[Route],
        local: Arc<Limiters>,
    ) -> Self {
        FleetQuotas {
            link,
            default: cfg.default,
            routes: routes
                .iter()
                .map(|r| r.limit.map(|l| (r.name.clone(), l)))
                .collect(),
            local,
        }
    }

    /// The quotas of a request, route first, with their Redis keys.
    fn quotas(&self, uid: u128, own: Option<LimitSpec>, route: usize) -> Vec<Quota> {
        let prefix = &self.link.prefix;
        let mut quotas = Vec::with_capacity(2);
        if let Some((name, spec)) = self.routes.get(route).and_then(Option::as_ref) {
            quotas.push(Quota {
                key: format!(
                    "{prefix}q:route:{}:{}:{uid:032x}:{name}",
                    spec.milli_per_second(),
                    spec.burst
                ),
                policy: "route",
                spec: *spec,
            });
        }
        let (policy, spec) = match own.filter(|o| *o != self.default) {
            None => ("default", self.default),
            Some(spec) => ("key", spec),
        };
        quotas.push(Quota {
            key: format!(
                "{prefix}q:{policy}:{}:{}:{uid:032x}",
                spec.milli_per_second(),
                spec.burst
            ),
            policy,
            spec,
        });
        quotas
    }
}

/// One answer from the verdicts of a request's quotas (route first): the first refusal, or
/// the tighter admission.
fn decide(quotas: &[Quota], verdicts: &[Verdict]) -> Result<Admitted, Refused> {
    let mut tightest: Option<Admitted> = None;
    for (q, v) in quotas.iter().zip(verdicts) {
        match *v {
            Verdict::Refuse { wait } => return Err(Refused::after(q.policy, q.spec, wait)),
            Verdict::Admit { remaining } => {
                let key = Admitted::with(q.policy, q.spec, remaining);
                tightest = Some(Admitted::tighter(tightest, key));
            }
        }
    }
    // The script answers one verdict per quota (checked in `check`).
    tightest.ok_or_else(|| Refused::after("default", quotas[0].spec, Duration::ZERO))
}

impl Quotas for FleetQuotas {
    fn check(&self, uid: u128, own: Option<LimitSpec>, route: usize) -> Checking<'_> {
        Checking::Waiting(Box::pin(async move {
            let quotas = self.quotas(uid, own, route);
            match self.link.check(&quotas).await {
                Some(verdicts) => decide(&quotas, &verdicts),
                None => {
                    self.link.metrics.limiter_degraded.inc();
                    self.local.check_key(uid, own, route)
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(policy: &'static str, per_second: f64, burst: u32) -> Quota {
        Quota {
            key: String::new(),
            policy,
            spec: LimitSpec::new(per_second, burst).unwrap(),
        }
    }

    #[test]
    fn intervals_follow_governor() {
        let q = quota("default", 10.0, 20);
        assert_eq!(q.interval_us(), 100_000);
        assert_eq!(q.tolerance_us(), 1_900_000);
        assert_eq!(quota("key", 1_000_000.0, 1).interval_us(), 1);
        assert_eq!(quota("key", 0.001, 1).interval_us(), 1_000_000_000);
        assert_eq!(quota("key", 0.001, 1).tolerance_us(), 0);
    }

    #[test]
    fn verdicts_become_the_local_limiters_numbers() {
        let route = quota("route", 1.0, 5);
        let key = quota("default", 10.0, 20);
        let both = [route, key];
        // The route has fewer left: it is reported.
        let a = decide(
            &both,
            &[
                Verdict::Admit { remaining: 3 },
                Verdict::Admit { remaining: 19 },
            ],
        )
        .unwrap();
        assert_eq!(
            (a.policy, a.remaining, a.reset),
            ("route", 3, 2),
            "t = ceil((5 - 3) / 1)"
        );
        let r = decide(
            &both,
            &[
                Verdict::Admit { remaining: 3 },
                Verdict::Refuse {
                    wait: Duration::from_micros(1_000_001),
                },
            ],
        )
        .unwrap_err();
        assert_eq!((r.policy, r.retry_after), ("default", 2));
        let r = decide(
            &both[1..],
            &[Verdict::Refuse {
                wait: Duration::from_micros(10),
            }],
        )
        .unwrap_err();
        assert_eq!(r.retry_after, 1, "at least one second");
    }

    #[tokio::test]
    async fn keys_name_the_quota_and_the_route() {
        let metrics = Arc::new(Metrics::default());
        let cfg = RedisLimits {
            // Nothing listens there: the link starts degraded.
            url: RedisUrl::parse(crate::secret::Secret::new("redis://127.0.0.1:1/0".into()))
                .unwrap(),
            prefix: "t:".into(),
        };
        let link = RedisLink::start(&cfg, metrics.clone()).await.unwrap();
        assert!(link.degraded());
        let text = "[[route]]\nname = \"r1\"\nprefix = \"/\"\nupstream = \"https://u\"\ninject = { ai_secret = \"S\" }\nlimit = { per_second = 1, burst = 1 }\n";
        let config = crate::config::Config::parse(text, "t").unwrap();
        let local = Arc::new(Limiters::new(&config.limits, &config.routes));
        let fleet = FleetQuotas::new(link, &config.limits, &config.routes, local);
        let keys: Vec<String> = fleet
            .quotas(0xab, LimitSpec::new(2.5, 3), 0)
            .into_iter()
            .map(|q| q.key)
            .collect();
        assert_eq!(
            keys,
            [
                "t:q:route:1000:1:000000000000000000000000000000ab:r1",
                "t:q:key:2500:3:000000000000000000000000000000ab",
            ]
        );
        // Degraded: the local limiter answers (burst 1 on the route), and it is counted.
        assert!(fleet.check(7, None, 0).await.is_ok());
        assert_eq!(fleet.check(7, None, 0).await.unwrap_err().policy, "route");
        assert_eq!(metrics.limiter_degraded.get(), 2);
        assert_eq!(metrics.limiter_degraded_now.get(), 1);
    }

    fn parse(text: &str, env: Option<&str>) -> Result<crate::config::Config, String> {
        let env = env.map(str::to_owned);
        crate::config::Config::parse_with_env(text, "t.toml", &|name| {
            (name == "KEYGATE_REDIS_URL").then(|| env.clone()).flatten()
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_backend_is_configured_in_limits_and_never_shows_a_password() {
        use crate::config::LimitsBackend;
        assert_eq!(
            parse("", None).unwrap().limits.backend,
            LimitsBackend::Local
        );
        let c = parse(
            "[limits]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2-SENTINEL@10.0.0.5:6379/2\"\n",
            None,
        )
        .unwrap();
        let LimitsBackend::Redis(r) = &c.limits.backend else {
            panic!("not redis");
        };
        assert_eq!(r.prefix, "keygate:");
        assert_eq!(r.url.to_string(), "redis://***@10.0.0.5:6379/2");
        assert_eq!(r.url.expose(), "redis://:hunter2-SENTINEL@10.0.0.5:6379/2");
        assert!(
            !format!("{c:?}").contains("SENTINEL"),
            "Debug shows the password"
        );
        // From the environment when the file has none; the file wins over it.
        let text = "[limits]\nbackend = \"redis\"\nredis_prefix = \"kg-test:\"\n";
        let c = parse(
            text,
            Some("rediss://user:pw-SENTINEL@cache.internal:6380/0"),
        )
        .unwrap();
        let LimitsBackend::Redis(r) = &c.limits.backend else {
            panic!("not redis");
        };
        assert_eq!(
            (r.url.to_string().as_str(), r.prefix.as_str()),
            ("rediss://***@cache.internal:6380/0", "kg-test:")
        );
        // Invalid combinations: file, line and column, the field, never the URL.
        let e = parse("[limits]\nbackend = \"redis\"\n", None).unwrap_err();
        assert!(e.starts_with("t.toml:2:11: `limits.backend`"), "{e}");
        assert!(e.contains("KEYGATE_REDIS_URL"), "{e}");
        let e = parse(
            "[limits]\nredis_url = \"redis://:pw-SENTINEL@h:1/0\"\n",
            None,
        )
        .unwrap_err();
        assert!(e.starts_with("t.toml:2:13: `limits.redis_url`"), "{e}");
        for bad in [
            "http://:pw-SENTINEL@h:1/0",
            "redis://:pw-SENTINEL@/0",
            "redis://:pw-SENTINEL@h:1/notadb",
            "rediss://:pw-SENTINEL@h:1/0#insecure",
        ] {
            let text = format!("[limits]\nbackend = \"redis\"\nredis_url = \"{bad}\"\n");
            let e = parse(&text, None).unwrap_err();
            assert!(e.starts_with("t.toml:3:13: `limits.redis_url`"), "{e}");
            assert!(!e.contains("SENTINEL"), "{e}");
            let e = parse("[limits]\nbackend = \"redis\"\n", Some(bad)).unwrap_err();
            assert!(e.contains("KEYGATE_REDIS_URL"), "{e}");
            assert!(!e.contains("SENTINEL"), "{e}");
        }
        let e = parse("[limits]\nbackend = \"memcached\"\n", None).unwrap_err();
        assert!(
            e.contains("`limits.backend`") && e.contains("\"local\" or \"redis\""),
            "{e}"
        );
    }

    /// The local backend through the seam answers as it does called directly.
    #[tokio::test(start_paused = true)]
    async fn the_local_limiters_answer_through_the_seam() {
        let config = crate::config::Config::parse(
            "[limits]\ndefault = { per_second = 1, burst = 2 }\n",
            "t",
        )
        .unwrap();
        let local: Arc<dyn Quotas> = Arc::new(Limiters::new(&config.limits, &config.routes));
        let a = local.check(1, None, 0).await.unwrap();
        assert_eq!((a.policy, a.remaining, a.reset), ("default", 1, 1));
        assert!(local.check(1, None, 0).await.is_ok());
        let r = local.check(1, None, 0).await.unwrap_err();
        assert_eq!((r.policy, r.retry_after), ("default", 1));
    }

    /// `rediss://` goes through rustls with ring (the only provider built in): a TLS handshake
    /// with a peer that hangs up fails as an unusable Redis, not a panic.
    #[tokio::test]
    async fn rediss_uses_the_ring_provider() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let cfg = RedisLimits {
            url: RedisUrl::parse(crate::secret::Secret::new(format!(
                "rediss://localhost:{port}/0"
            )))
            .unwrap(),
            prefix: "t:".into(),
        };
        let link = RedisLink::start(&cfg, Arc::new(Metrics::default()))
            .await
            .unwrap();
        assert!(link.degraded());
        assert!(
            accepted.load(Ordering::SeqCst) > 0,
            "no TLS connection attempted"
        );
        server.abort();
    }
}
