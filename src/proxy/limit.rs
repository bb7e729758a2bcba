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
//!
//! The data plane asks for a key's quotas through [`Quotas`], whose answers are plain numbers
//! ([`Admitted`], [`Refused`]); `crate::error` turns them into the `RateLimit`,
//! `RateLimit-Policy` and `Retry-After` headers, whichever backend answered. Two backends:
//! [`Limiters`] (this file, in-process) and [`fleet::FleetQuotas`] (one Redis shared by a
//! fleet, degrading to [`Limiters`] while Redis does not answer). The failed-authentication
//! throttle and the admin quota are always [`Limiters`]'.

use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::ops::Add;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{NotUntil, Quota, RateLimiter};

use crate::config::{LimitSpec, LimitsConfig, Route};

pub mod fleet;

/// An admission, as numbers: the `RateLimit` header of the answer is made of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// `default`, `key`, `route` or `admin`: the quota that is closest to refusing.
    pub policy: &'static str,
    pub spec: LimitSpec,
    /// Requests that could be admitted at once now.
    pub remaining: u32,
    /// Whole seconds (rounded up) until the whole burst is back.
    pub reset: u64,
}

/// A refusal, as numbers: what the 429 carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The quota that refused.
    pub policy: &'static str,
    pub spec: LimitSpec,
    /// Whole seconds, rounded up, at least 1.
    pub retry_after: u64,
}

impl Refused {
    /// A refusal of `policy` whose next admission is `wait` away.
    pub fn after(policy: &'static str, spec: LimitSpec, wait: Duration) -> Refused {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Refused {
            policy,
            spec,
            retry_after: secs.max(1),
        }
    }
}

impl Admitted {
    /// An admission of `policy` leaving `remaining` of the burst.
    pub fn with(policy: &'static str, spec: LimitSpec, remaining: u32) -> Admitted {
        let missing = f64::from(spec.burst.saturating_sub(remaining));
        Admitted {
            policy,
            spec,
            remaining,
            reset: (missing / spec.per_second()).ceil() as u64,
        }
    }

    /// The tighter of a route's admission and a key's (the route's when it has fewer left).
    pub fn tighter(route: Option<Admitted>, key: Admitted) -> Admitted {
        match route {
            Some(r) if r.remaining < key.remaining => r,
            _ => key,
        }
    }
}

/// What a quota check answers: at once (the local limiter, no allocation), or once a remote
/// backend has answered (a boxed future, so that the backend can sit behind `Arc<dyn Quotas>`:
/// an `async fn` or `impl Future` in a trait is not object-safe).
pub enum Checking<'a> {
    Done(Result<Admitted, Refused>),
    Waiting(Pin<Box<dyn Future<Output = Result<Admitted, Refused>> + Send + 'a>>),
}

impl Future for Checking<'_> {
    type Output = Result<Admitted, Refused>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Checking::Done(answer) => std::task::Poll::Ready(*answer),
            Checking::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

/// The per-key and per-route quotas, as the data plane sees them: one check per request.
pub trait Quotas: Send + Sync {
    /// Admits a request of key `uid` (whose own quota is `own`) on route `route` (its index in
    /// the configured routes), or refuses it.
    fn check(&self, uid: u128, own: Option<LimitSpec>, route: usize) -> Checking<'_>;
}

impl Quotas for Limiters {
    fn check(&self, uid: u128, own: Option<LimitSpec>, route: usize) -> Checking<'_> {
        Checking::Done(self.check_key(uid, own, route))
    }
}

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

    fn check(&self, key: &K) -> Result<Admitted, Refused> {
        match self.limiter.check_key(key) {
            Ok(snapshot) => Ok(self.admitted(&snapshot)),
            Err(not_until) => Err(self.refused(&not_until)),
        }
    }

    fn admitted(&self, s: &StateSnapshot) -> Admitted {
        Admitted::with(self.policy, self.spec, s.remaining_burst_capacity())
    }

    fn refused(&self, n: &NotUntil<TokioInstant>) -> Refused {
        Refused::after(self.policy, self.spec, n.wait_time_from(TokioClock.now()))
    }
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
    blocked: Arc<DashMap<IpAddr, (tokio::time::Instant, Refused)>>,
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

    /// Admits a request of key `uid` (whose own quota is `own`) on route `route`.
    pub fn check_key(
        &self,
        uid: u128,
        own: Option<LimitSpec>,
        route: usize,
    ) -> Result<Admitted, Refused> {
        let route_state = match self.routes.get(route).and_then(|(_, b)| b.as_ref()) {
            Some(b) => Some(b.check(&uid)?),
            None => None,
        };
        let key_state = match own.filter(|o| *o != self.default.spec) {
            None => self.default.check(&uid)?,
            Some(spec) => {
                let bucket = self
                    .by_quota
                    .entry(spec)
                    .or_insert_with(|| Arc::new(Bucket::new("key", spec)))
                    .clone();
                bucket.check(&uid)?
            }
        };
        Ok(Admitted::tighter(route_state, key_state))
    }

    /// Admits an admin API call of key `uid`.
    pub fn check_admin(&self, uid: u128) -> Result<Admitted, Refused> {
        self.admin.check(&uid)
    }

    /// Whether `ip` is blocked for failing authentication too often (checked before any key
    /// lookup).
    pub fn ip_blocked(&self, ip: IpAddr) -> Option<Refused> {
        let entry = self.blocked.get(&ip)?;
        let (until, refused) = entry.value();
        if *until > tokio::time::Instant::now() {
            return Some(*refused);
        }
        drop(entry);
        self.blocked.remove(&ip);
        None
    }

    /// Counts a failed authentication from `ip`; beyond the allowance the IP is blocked until
    /// it has earned a try back, and this request is refused with 429 too.
    pub fn auth_failed(&self, ip: IpAddr) -> Option<Refused> {
        match self.auth_failures.check(&ip) {
            Ok(_) => None,
            Err(refused) => {
                let until = tokio::time::Instant::now() + Duration::from_secs(refused.retry_after);
                self.blocked.insert(ip, (until, refused));
                tracing::warn!(%ip, "too many failed authentications; IP throttled");
                Some(refused)
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
pub async fn limit(
    quotas: &dyn Quotas,
    (index, _): (usize, &Route),
    grant: &super::authenticate::Grant,
) -> Result<Admitted, crate::error::ProxyError> {
    use super::authenticate::Grant;
    let (uid, own) = match grant {
        Grant::Key(p) => (p.key_uid, p.limit()),
        Grant::Passthrough { uid, .. } => (*uid, None),
    };
    quotas
        .check(uid, own, index)
        .await
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
                backend: Default::default(),
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
                backend: Default::default(),
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
                backend: Default::default(),
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
        let [retry, ratelimit, policy] = crate::error::refusal_headers(&refused);
        assert_eq!(retry.1, "1");
        assert_eq!(ratelimit.1, "\"default\";r=0;t=1");
        assert_eq!(policy.1, "\"default\";q=2;w=2");
        assert!(
            l.check_key(2, None, 0).is_ok(),
            "another key is not affected"
        );
        let own = LimitSpec::new(100.0, 50);
        let got = hammer(&l, 3, own, 1, Duration::from_millis(1)).await;
        assert!((140..=160).contains(&got), "{got}");
        let ok = l.check_key(4, None, 0).unwrap();
        assert_eq!(crate::error::admission_header(&ok), "\"default\";r=1;t=1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_strictest_of_route_and_key_quota_holds() {
        let text = "[[route]]\nprefix = \"/\"\nupstream = \"https://u\"\ninject = { ai_secret = \"S\" }\nlimit = { per_second = 1, burst = 1 }\n";
        let cfg = crate::config::Config::parse(text, "t").unwrap();
        let l = Limiters::new(&cfg.limits, &cfg.routes);
        assert!(l.check_key(9, None, 0).is_ok());
        let refused = l.check_key(9, None, 0).unwrap_err();
        assert_eq!(refused.policy, "route");
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
