//! Stage 4: per-key rate limits (GCRA, governor keyed limiters), the per-IP throttle on failed
//! authentication, and the IETF `RateLimit` / `RateLimit-Policy` headers.
//!
//! ```text
//!  before any key lookup: is this IP blocked for failing auth too often? ──yes──▶ 429
//!  auth failed ──▶ count against the IP (10/s, burst 20 by default); over ──▶ block, 429
//!  auth ok ──▶ the route's quota for this key (if the route has one) ──▶ the key's quota
//!              (its own, or the default) ──▶ any over ──▶ 429, nothing forwarded
//! ```
//!
//! State exists only for keys that authenticated: unknown keys never create any. Limiters are
//! shared by quota (every key on the default quota shares one keyed limiter), state is keyed by
//! the key id as a `u128`, and idle state is dropped by `evict_idle` on a timer
//! (`retain_recent`), so memory follows the keys active in the last few seconds, not all keys
//! ever seen. Rejected requests do not consume quota (GCRA only advances on admission).
//! Checking the route quota first means a request the route refuses never touches the key's
//! quota; in the rare case that the route admits and the key's own quota refuses, the route's
//! quota has spent one unit.
//!
//! The clock is tokio's, so tests can pause and advance it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{NotUntil, Quota, RateLimiter};
use http::HeaderValue;

use crate::config::{LimitSpec, LimitsConfig, Route};

/// A tokio instant for governor: paused test clocks apply to the limiter too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, n: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(n))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }
    fn saturating_sub(&self, d: Nanos) -> Self {
        TokioInstant(self.0.checked_sub(Duration::from(d)).unwrap_or(self.0))
    }
}

/// tokio's clock, for governor.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, TokioClock, StateInformationMiddleware>;

/// One quota's limiter over many keys, with its policy name.
struct Bucket<K: std::hash::Hash + Eq + Clone> {
    policy: &'static str,
    spec: LimitSpec,
    limiter: Keyed<K>,
}

fn quota(spec: LimitSpec) -> Quota {
    let period = Duration::from_secs_f64(1.0 / spec.per_second());
    let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl<K: std::hash::Hash + Eq + Clone> Bucket<K> {
    fn new(policy: &'static str, spec: LimitSpec) -> Self {
        Bucket {
            policy,
            spec,
            limiter: RateLimiter::dashmap_with_clock(quota(spec), TokioClock)
                .with_middleware::<StateInformationMiddleware>(),
        }
    }

    fn check(&self, key: &K) -> Result<(u32, u64), Limited> {
        match self.limiter.check_key(key) {
            Ok(snapshot) => Ok(state(self.spec, &snapshot)),
            Err(not_until) => Err(self.limited(&not_until)),
        }
    }

    fn limited(&self, n: &NotUntil<TokioInstant>) -> Limited {
        let wait = n.wait_time_from(TokioClock.now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Limited {
            retry_after: secs.max(1),
            ratelimit: ratelimit_value(self.policy, 0, secs.max(1)),
            policy: policy_value(self.policy, self.spec),
        }
    }
}

/// (remaining, seconds until full) after an admission.
fn state(spec: LimitSpec, s: &StateSnapshot) -> (u32, u64) {
    let remaining = s.remaining_burst_capacity();
    let missing = f64::from(spec.burst.saturating_sub(remaining));
    (remaining, (missing / spec.per_second()).ceil() as u64)
}

/// `"policy";r=R;t=T` (draft-ietf-httpapi-ratelimit-headers, structured field form).
fn ratelimit_value(policy: &str, remaining: u32, reset: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{policy}\";r={remaining};t={reset}"))
        .unwrap_or(HeaderValue::from_static("\"default\";r=0;t=1"))
}

/// `"policy";q=BURST;w=WINDOW`, the window being the time to earn the whole burst back.
fn policy_value(policy: &str, spec: LimitSpec) -> HeaderValue {
    let window = (f64::from(spec.burst) / spec.per_second()).ceil().max(1.0) as u64;
    HeaderValue::from_str(&format!("\"{policy}\";q={};w={window}", spec.burst))
        .unwrap_or(HeaderValue::from_static("\"default\";q=1;w=1"))
}

/// A refusal: what the 429 carries.
#[derive(Debug, Clone)]
pub struct Limited {
    /// Whole seconds, rounded up, at least 1.
    pub retry_after: u64,
    /// The `RateLimit` value.
    pub ratelimit: HeaderValue,
    /// The `RateLimit-Policy` value.
    pub policy: HeaderValue,
}

type RouteBucket = Arc<Bucket<u128>>;

/// All limiters of a running keygate.
pub struct Limiters {
    default: Arc<Bucket<u128>>,
    /// Per-key quotas do not come from the config: a reload keeps them all.
    by_quota: Arc<DashMap<LimitSpec, Arc<Bucket<u128>>>>,
    /// (route name, its bucket), indexed like the configured routes.
    routes: Vec<(Arc<str>, Option<RouteBucket>)>,
    admin: Arc<Bucket<u128>>,
    auth_failures: Arc<Bucket<IpAddr>>,
    blocked: Arc<DashMap<IpAddr, (tokio::time::Instant, Limited)>>,
}

impl Limiters {
    /// The limiters of a config (`routes` indexed like the configured routes).
    pub fn new(cfg: &LimitsConfig, routes: &[Route]) -> Self {
        Limiters {
            default: Arc::new(Bucket::new("default", cfg.default)),
            by_quota: Arc::default(),
            routes: routes
                .iter()
                .map(|r| {
                    let bucket = r.limit.map(|l| Arc::new(Bucket::new("route", l)));
                    (r.name.clone(), bucket)
                })
                .collect(),
            admin: Arc::new(Bucket::new("admin", cfg.admin)),
            auth_failures: Arc::new(Bucket::new("auth", cfg.auth_failures)),
            blocked: Arc::default(),
        }
    }

    /// The limiters of a reloaded config. Every quota that did not change keeps its state
    /// (a reload must not hand every key a fresh burst), and so do per-key quotas and IP
    /// blocks; a changed quota starts fresh.
    pub fn reconfigured(&self, cfg: &LimitsConfig, routes: &[Route]) -> Self {
        fn keep<K: std::hash::Hash + Eq + Clone>(
            old: &Arc<Bucket<K>>,
            policy: &'static str,
            spec: LimitSpec,
        ) -> Arc<Bucket<K>> {
            if old.spec == spec {
                old.clone()
            } else {
                Arc::new(Bucket::new(policy, spec))
            }
        }
        Limiters {
            default: keep(&self.default, "default", cfg.default),
            by_quota: self.by_quota.clone(),
            routes: routes
                .iter()
                .map(|r| {
                    let old = self
                        .routes
                        .iter()
                        .find(|(name, _)| *name == r.name)
                        .and_then(|(_, b)| b.as_ref());
                    let bucket = r.limit.map(|spec| match old {
                        Some(b) => keep(b, "route", spec),
                        None => Arc::new(Bucket::new("route", spec)),
                    });
                    (r.name.clone(), bucket)
                })
                .collect(),
            admin: keep(&self.admin, "admin", cfg.admin),
            auth_failures: keep(&self.auth_failures, "auth", cfg.auth_failures),
            blocked: self.blocked.clone(),
        }
    }

    /// Admits a request of key `uid` (whose own quota is `own`) on route `route`; returns the
    /// `RateLimit` value for the answer.
    pub fn check_key(
        &self,
        uid: u128,
        own: Option<LimitSpec>,
        route: usize,
    ) -> Result<HeaderValue, Limited> {
        let route_state = match self.routes.get(route).and_then(|(_, b)| b.as_ref()) {
            Some(b) => Some((b.policy, b.check(&uid)?)),
            None => None,
        };
        let (policy, key_state) = match own.filter(|o| *o != self.default.spec) {
            None => (self.default.policy, self.default.check(&uid)?),
            Some(spec) => {
                let bucket = self
                    .by_quota
                    .entry(spec)
                    .or_insert_with(|| Arc::new(Bucket::new("key", spec)))
                    .clone();
                (bucket.policy, bucket.check(&uid)?)
            }
        };
        // Report the tighter of the two.
        let (policy, (remaining, reset)) = match route_state {
            Some((p, s)) if s.0 < key_state.0 => (p, s),
            _ => (policy, key_state),
        };
        Ok(ratelimit_value(policy, remaining, reset))
    }

    /// Admits an admin API call of key `uid`.
    pub fn check_admin(&self, uid: u128) -> Result<HeaderValue, Limited> {
        self.admin
            .check(&uid)
            .map(|(r, t)| ratelimit_value(self.admin.policy, r, t))
    }

    /// Whether `ip` is blocked for failing authentication too often (checked before any key
    /// lookup).
    pub fn ip_blocked(&self, ip: IpAddr) -> Option<Limited> {
        let entry = self.blocked.get(&ip)?;
        let (until, limited) = entry.value();
        if *until > tokio::time::Instant::now() {
            return Some(limited.clone());
        }
        drop(entry);
        self.blocked.remove(&ip);
        None
    }

    /// Counts a failed authentication from `ip`; beyond the allowance the IP is blocked until
    /// it has earned a try back, and this request is refused with 429 too.
    pub fn auth_failed(&self, ip: IpAddr) -> Option<Limited> {
        match self.auth_failures.check(&ip) {
            Ok(_) => None,
            Err(limited) => {
                let until = tokio::time::Instant::now() + Duration::from_secs(limited.retry_after);
                self.blocked.insert(ip, (until, limited.clone()));
                tracing::warn!(%ip, "too many failed authentications; IP throttled");
                Some(limited)
            }
        }
    }

    /// Drops state that is back to "fresh" (idle keys and IPs) and expired IP blocks.
    pub fn evict_idle(&self) {
        self.default.limiter.retain_recent();
        self.default.limiter.shrink_to_fit();
        for b in self.by_quota.iter() {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
        for b in self.routes.iter().filter_map(|(_, b)| b.as_ref()) {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
        self.admin.limiter.retain_recent();
        self.auth_failures.limiter.retain_recent();
        self.auth_failures.limiter.shrink_to_fit();
        let now = tokio::time::Instant::now();
        self.blocked.retain(|_, (until, _)| *until > now);
    }

    /// Keys (and IPs) with limiter state now.
    pub fn tracked(&self) -> usize {
        self.default.limiter.len()
            + self.by_quota.iter().map(|b| b.limiter.len()).sum::<usize>()
            + self
                .routes
                .iter()
                .filter_map(|(_, b)| b.as_ref())
                .map(|b| b.limiter.len())
                .sum::<usize>()
            + self.admin.limiter.len()
            + self.auth_failures.limiter.len()
    }
}

/// The limit stage: admits the grant's key on its route, or refuses with 429.
pub fn limit(
    limits: &Limiters,
    (index, _): (usize, &Route),
    grant: &super::authenticate::Grant,
) -> Result<HeaderValue, crate::error::ProxyError> {
    use super::authenticate::Grant;
    let (uid, own) = match grant {
        Grant::Key(p) => (p.key_uid, p.limit()),
        Grant::Passthrough { uid, .. } => (*uid, None),
    };
    limits
        .check_key(uid, own, index)
        .map_err(crate::error::ProxyError::RateLimited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiters(per_second: f64, burst: u32) -> Limiters {
        let spec = LimitSpec::new(per_second, burst).unwrap();
        Limiters::new(
            &LimitsConfig {
                default: spec,
                auth_failures: LimitSpec::new(10.0, 20).unwrap(),
                admin: spec,
            },
            &[],
        )
    }

    /// Hammers for `secs` of (paused) time, one try every `step`; returns the admissions.
    async fn hammer(
        l: &Limiters,
        uid: u128,
        own: Option<LimitSpec>,
        secs: u64,
        step: Duration,
    ) -> u64 {
        let end = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut admitted = 0;
        while tokio::time::Instant::now() < end {
            if l.check_key(uid, own, 0).is_ok() {
                admitted += 1;
            }
            tokio::time::advance(step).await;
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_unchanged_quotas_state_and_resets_changed_ones() {
        let l = limiters(1.0, 2);
        assert!(l.check_key(1, None, 0).is_ok());
        assert!(l.check_key(1, None, 0).is_ok());
        assert!(l.check_key(1, None, 0).is_err(), "burst used up");
        let own = LimitSpec::new(1.0, 1).unwrap();
        assert!(l.check_key(2, Some(own), 0).is_ok());
        // Same quotas: the spent burst stays spent, per-key quotas too.
        let same = l.reconfigured(
            &LimitsConfig {
                default: LimitSpec::new(1.0, 2).unwrap(),
                auth_failures: LimitSpec::new(10.0, 20).unwrap(),
                admin: LimitSpec::new(1.0, 2).unwrap(),
            },
            &[],
        );
        assert!(
            same.check_key(1, None, 0).is_err(),
            "a reload handed out a fresh burst"
        );
        assert!(same.check_key(2, Some(own), 0).is_err());
        // A changed default quota starts from its new burst.
        let changed = same.reconfigured(
            &LimitsConfig {
                default: LimitSpec::new(1.0, 5).unwrap(),
                auth_failures: LimitSpec::new(10.0, 20).unwrap(),
                admin: LimitSpec::new(1.0, 2).unwrap(),
            },
            &[],
        );
        assert_eq!(
            hammer(&changed, 1, None, 1, Duration::from_millis(10)).await,
            5
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hammering_admits_rate_times_t_plus_burst_and_rejects_cost_nothing() {
        for (rate, burst) in [(10.0, 20), (100.0, 5), (2.5, 1)] {
            let l = limiters(rate, burst);
            // 1,000 tries a second, far over the limit.
            let got = hammer(&l, 7, None, 10, Duration::from_millis(1)).await as f64;
            let want = rate * 10.0 + f64::from(burst);
            assert!(
                (got - want).abs() <= want * 0.02 + 1.0,
                "rate {rate} burst {burst}: admitted {got}, want {want} ± 2 %"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_not_locked_out_after_hammering() {
        let l = limiters(10.0, 20);
        hammer(&l, 1, None, 10, Duration::from_micros(100)).await;
        // Stop for the time one request earns back: the next one is admitted.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.check_key(1, None, 0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent_and_own_quotas_apply() {
        let l = limiters(1.0, 2);
        assert!(l.check_key(1, None, 0).is_ok());
        assert!(l.check_key(1, None, 0).is_ok());
        let refused = l.check_key(1, None, 0).unwrap_err();
        assert_eq!(refused.retry_after, 1);
        assert_eq!(refused.ratelimit, "\"default\";r=0;t=1");
        assert_eq!(refused.policy, "\"default\";q=2;w=2");
        assert!(
            l.check_key(2, None, 0).is_ok(),
            "another key is not affected"
        );
        let own = LimitSpec::new(100.0, 50);
        let got = hammer(&l, 3, own, 1, Duration::from_millis(1)).await;
        assert!((140..=160).contains(&got), "{got}");
        let ok = l.check_key(4, None, 0).unwrap();
        assert_eq!(ok, "\"default\";r=1;t=1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_strictest_of_route_and_key_quota_holds() {
        let text = "[[route]]\nprefix = \"/\"\nupstream = \"https://u\"\ninject = { ai_secret = \"S\" }\nlimit = { per_second = 1, burst = 1 }\n";
        let cfg = crate::config::Config::parse(text, "t").unwrap();
        let l = Limiters::new(&cfg.limits, &cfg.routes);
        assert!(l.check_key(9, None, 0).is_ok());
        let refused = l.check_key(9, None, 0).unwrap_err();
        assert!(refused.ratelimit.to_str().unwrap().starts_with("\"route\""));
        // The key's default quota (10/s, 20) was not spent by the refusals.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.check_key(9, None, 0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_auth_blocks_the_ip_and_only_that_ip() {
        let l = limiters(10.0, 20);
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        let mut refusals = 0;
        for _ in 0..25 {
            if l.auth_failed(bad).is_some() {
                refusals += 1;
            }
        }
        assert_eq!(refusals, 5, "burst 20 allowed, then blocked");
        assert!(l.ip_blocked(bad).is_some());
        assert!(l.ip_blocked(good).is_none());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.ip_blocked(bad).is_none(), "the block ends");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_state_is_evicted() {
        let l = limiters(10.0, 20);
        for uid in 0..10_000u128 {
            let _ = l.check_key(uid, None, 0);
        }
        assert_eq!(l.tracked(), 10_000);
        tokio::time::advance(Duration::from_secs(3)).await;
        l.evict_idle();
        assert_eq!(
            l.tracked(),
            0,
            "keys seen once keep no state once their bucket is full again"
        );
    }
}
