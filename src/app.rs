//! Wiring: master key, store, caches, upstream client, listeners, the store poller, and
//! shutdown.
//!
//! ```text
//!  start(): master key ─▶ store (checks the key fits) ─▶ first admin key if the store is empty
//!           ─▶ TLS (generate dev certs if none configured) ─▶ upstream client ─▶ credentials
//!           ─▶ bind both listeners ─▶ spawn accept loops + poller
//!  shutdown(): flag ─▶ accept loops stop, connections shut down gracefully ─▶ wait for every
//!              connection permit back, at most drain_timeout ─▶ return
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::config::{Config, LimitsBackend, OnCleartext};
use crate::crypto::{MasterKey, MasterKeyError, MasterKeySource};
use crate::keycache::{KeyCache, KeyCacheSettings};
use crate::metrics::Metrics;
use crate::proxy::credentials::Credentials;
use crate::proxy::forward::Upstream;
use crate::proxy::limit::fleet::{FleetQuotas, RedisLink};
use crate::proxy::limit::{Limiters, Quotas};
use crate::proxy::passthrough::PassthroughCache;
use crate::proxy::routes::RouteTable;
use crate::proxy::DataPlane;
use crate::secret::Secret;
use crate::server::{accept_loop, Plane, Serve};
use crate::store::{
    issue_first_admin_key, PgSettings, PgStore, Revisions, SqliteStore, Store, StoreError, Tenant,
};
use crate::tls::TlsError;

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    MasterKey(#[from] MasterKeyError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Limits(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a config file decides, swapped whole by a reload. A request loads it once and keeps
/// that snapshot to its end, so in-flight requests finish on the config they started with.
pub struct Live {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// What each route injects. The one field of a snapshot that changes after it is built:
    /// written only by `write_credentials`, under the credentials writer lock (a secret or env
    /// var changed, or a reload filling its new snapshot before swapping it in).
    pub credentials: Credentials,
    /// The in-process limiters: the failed-authentication throttle and the admin quota always,
    /// the key and route quotas with `limits.backend = "local"` or while Redis does not answer.
    pub limits: Arc<Limiters>,
    /// The key and route quota check of the data plane: `limits`, or Redis in front of it.
    pub quotas: Arc<dyn Quotas>,
    /// Shared with the next config when its `[upstream]` and CA file are unchanged: pooled
    /// connections stay.
    pub upstream: Arc<Upstream>,
    /// The upstream CA file's content when this upstream client was built.
    upstream_ca: Option<Vec<u8>>,
    pub tls: TlsAcceptor,
    /// When the listener certificate expires (Unix seconds), for `/readyz`.
    pub cert_not_after: Option<i64>,
    /// Counts reloads: 0 for the config keygate started with.
    pub generation: u64,
}

/// The outcome of the last reload, for the log, `/-/reload` and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub generation: u64,
    /// Unix seconds of the last attempt (0: none yet).
    pub attempted_at: u64,
    /// Why the last attempt was refused; `None` when it applied.
    pub error: Option<String>,
    /// Settings the file changed that only a restart applies.
    pub needs_restart: Vec<&'static str>,
}

/// What every request handler shares.
pub struct AppState {
    live: ArcSwap<Live>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Held by whoever writes credentials into the live config: a refresh (poller, admin
    /// write) and a reload's read-then-swap. Without it a reload could read the credentials,
    /// lose the race to a secret write whose refresh lands on the old config, and then swap in
    /// its stale copy. Taken owned (`lock_owned`, `blocking_lock_owned`) so that the guard can
    /// go into a blocking task and be handed to `write_credentials`.
    credentials_writer: Arc<tokio::sync::Mutex<()>>,
    pub reload_status: std::sync::Mutex<ReloadStatus>,
    /// Why the store poller's last read failed; `None` once a read succeeds. For `/readyz`.
    pub store_error: std::sync::Mutex<Option<String>>,
    /// The default org and user: routes take their secrets from this org.
    pub tenant: Tenant,
    pub store: Arc<dyn Store>,
    /// The key cache, passthrough verdicts, master key and metrics, as the data plane takes
    /// them.
    pub plane: DataPlane,
    /// The fleet's Redis, with `limits.backend = "redis"` (set at start; a reload keeps it).
    pub fleet: Option<Arc<RedisLink>>,
}

impl AppState {
    /// The current config snapshot.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Reads the config file again and applies it: routes, upstreams, limits, certificates
    /// and server settings for new connections. Connections and requests in flight keep what
    /// they started with. A file that does not load or validate changes nothing; the reason is
    /// returned, logged, and kept for `/-/reload` and `/readyz`.
    pub async fn reload(&self) -> Result<u64, String> {
        self.reload_by(crate::audit::Actor::Keygate).await
    }

    /// [`AppState::reload`] asked for by `by` (an admin key through `POST /-/reload`; a
    /// signal is keygate's own), which the audit trail names.
    pub async fn reload_by(&self, by: crate::audit::Actor) -> Result<u64, String> {
        let result = self.reload_inner().await;
        // The outcome only, never the error text: a refused file's error can quote its lines
        // (a store URL with a password in it).
        let config = self.live().config.source.clone();
        let ev = crate::audit::NewEvent {
            org_id: None,
            actor: by,
            action: match result {
                Ok(_) => crate::audit::action::CONFIG_RELOADED,
                Err(_) => crate::audit::action::CONFIG_REFUSED,
            },
            object_type: "config",
            object_id: match &result {
                Ok(generation) => generation.to_string(),
                Err(_) => String::new(),
            },
            object_name: config.map_or_else(
                || "(built-in defaults)".to_owned(),
                |p| p.display().to_string(),
            ),
            outcome: if result.is_ok() { "ok" } else { "refused" }.to_owned(),
        };
        let store = self.store.clone();
        match blocking(move || store.record_event(ev)).await {
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "could not record the reload in the audit trail"),
        }
        result
    }

    async fn reload_inner(&self) -> Result<u64, String> {
        let _one = self.reloading.lock().await;
        let old = self.live();
        let result = match self.build_reloaded(&old).await {
            Ok((live, needs_restart)) => {
                let live = Arc::new(live);
                // Credentials are read under the writer lock and swapped in before it is
                // released: a refresh that comes later refreshes the new config.
                let writer = self.credentials_writer.clone().lock_owned().await;
                let (store, tenant, fresh) =
                    (self.store.clone(), self.tenant.clone(), live.clone());
                // The guard comes back out of the blocking task and is dropped only after the
                // swap: released earlier, a refresh could land on the old snapshot in between
                // and the swap would install credentials older than it (the race of issue 12,
                // caught by `a_reload_racing_a_secret_write_never_keeps_the_stale_secret`).
                blocking(move || {
                    write_credentials(&writer, store.as_ref(), &tenant, &fresh).map(|()| writer)
                })
                .await
                .map_err(|e| e.to_string())
                .map(|writer| {
                    self.live.store(live.clone());
                    drop(writer);
                    (live, needs_restart)
                })
            }
            Err(e) => Err(e),
        };
        let mut status = self.reload_status.lock().unwrap_or_else(|e| e.into_inner());
        status.attempted_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match result {
            Ok((live, needs_restart)) => {
                let generation = live.generation;
                let routes = live.config.routes.len();
                // Verdicts are cached per route index; the indexes may mean other routes now.
                self.plane.passthrough.clear();
                for field in &needs_restart {
                    tracing::warn!(field, "changed in the config file; applies after a restart");
                }
                tracing::info!(generation, routes, "config reloaded");
                self.plane.metrics.reloads_ok.inc();
                *status = ReloadStatus {
                    generation,
                    attempted_at: status.attempted_at,
                    error: None,
                    needs_restart,
                };
                Ok(generation)
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; the running config stays");
                self.plane.metrics.reloads_failed.inc();
                status.error = Some(e.clone());
                Err(e)
            }
        }
    }

    async fn build_reloaded(&self, old: &Live) -> Result<(Live, Vec<&'static str>), String> {
        let source = old.config.source.clone();
        let config = tokio::task::spawn_blocking(move || Config::load_source(source.as_deref()))
            .await
            .map_err(|e| format!("reading the config: {e}"))?
            .map_err(|e| e.to_string())?;
        let needs_restart = restart_only_changes(&old.config, &config);
        let cert = crate::tls::resolve_listener_cert(&config.tls).map_err(|e| e.to_string())?;
        let tls = TlsAcceptor::from(
            crate::tls::server_config(&cert.cert, &cert.key).map_err(|e| e.to_string())?,
        );
        let upstream_ca = read_ca(&config);
        let upstream = if config.upstream == old.config.upstream && upstream_ca == old.upstream_ca {
            old.upstream.clone()
        } else {
            Arc::new(Upstream::new(&config.upstream).map_err(|e| e.to_string())?)
        };
        // Filled by `reload` under the credentials writer lock.
        let credentials = Credentials::new(config.routes.len());
        let limits = Arc::new(old.limits.reconfigured(&config.limits, &config.routes));
        let live = Live {
            routes: RouteTable::new(&config.routes),
            quotas: quotas(self.fleet.as_ref(), &limits, &config),
            limits,
            credentials,
            upstream,
            tls,
            cert_not_after: crate::tls::not_after(&cert.cert).ok(),
            upstream_ca,
            generation: old.generation + 1,
            config: Arc::new(config),
        };
        Ok((live, needs_restart))
    }

    /// After a key write: make the key cache see the new keys revision now, not at the next poll.
    pub fn keys_changed(&self) -> Result<(), StoreError> {
        let rev = self.store.revisions()?;
        self.plane.keys.note_revision(rev.keys);
        Ok(())
    }

    /// Re-reads the credentials of the live config from the store: by the poller when the
    /// secrets or env vars revision moved, and after an admin write so that the next request
    /// uses it. Blocking: call it from a blocking task.
    pub fn refresh_credentials(&self) -> Result<(), StoreError> {
        let writer = self.credentials_writer.clone().blocking_lock_owned();
        write_credentials(&writer, self.store.as_ref(), &self.tenant, &self.live())
    }

    /// A key was seen in a cleartext request from `peer`: if it is valid, it has leaked. Flag
    /// it (or revoke it, by config), log the event by key id, never the key. Store lookups
    /// count against the peer's failed-authentication allowance, as on the TLS listeners.
    pub async fn cleartext_key_seen(&self, key: &Secret, peer: std::net::IpAddr) {
        let principal = match self.plane.keys.cached(key.expose()) {
            Some(p) => p,
            None => {
                let live = self.live();
                if live.limits.ip_blocked(peer).is_some() {
                    return;
                }
                match self.plane.keys.authenticate(key.expose()).await {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        live.limits.auth_failed(peer);
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        self.plane.metrics.exposed_keys_flagged.inc();
        let revoke = self.live().config.keys.on_cleartext == OnCleartext::Revoke;
        let store = self.store.clone();
        let id = principal.key_id();
        let result = tokio::task::spawn_blocking(move || {
            store.flag_exposed(&id, revoke)?;
            store.revisions()
        })
        .await;
        match result {
            Ok(Ok(rev)) => {
                self.plane.keys.note_revision(rev.keys);
                tracing::warn!(key_id = %principal.key_id(), revoked = revoke,
                    "a valid key was sent over cleartext HTTP; flagged as exposed");
            }
            Ok(Err(e)) => {
                tracing::error!(key_id = %principal.key_id(), error = %e, "could not flag an exposed key")
            }
            Err(e) => tracing::error!(error = %e, "flagging task failed"),
        }
    }
}

/// The one writer of credentials: re-reads the credentials of `live`'s routes from the store
/// into `live`. Taking the writer lock's guard proves the caller holds it. Blocking.
fn write_credentials(
    _writer: &tokio::sync::OwnedMutexGuard<()>,
    store: &dyn Store,
    tenant: &Tenant,
    live: &Live,
) -> Result<(), StoreError> {
    live.credentials.refresh(store, tenant, &live.config.routes)
}

/// What a listener serves, for the accept loop: the proxy plane (`proxy::handle` on the data
/// plane and the config snapshot of the request's moment) or the admin plane.
#[derive(Clone)]
struct Listener {
    state: Arc<AppState>,
    plane: Plane,
}

impl Serve for Listener {
    fn plane(&self) -> Plane {
        self.plane
    }

    fn settings(&self) -> (TlsAcceptor, Arc<Config>) {
        let live = self.state.live();
        (live.tls.clone(), live.config.clone())
    }

    async fn call(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        peer: std::net::IpAddr,
    ) -> hyper::Response<crate::Body> {
        match self.plane {
            Plane::Proxy => {
                let live = self.state.live();
                crate::proxy::handle(&self.state.plane, &live, req, peer).await
            }
            // Boxed: the admin handler's future (3.4 KiB in a debug build) would otherwise
            // size this one, which every proxy request moves into a box of its own.
            Plane::Admin => Box::pin(crate::admin::handle(self.state.clone(), req, peer)).await,
        }
    }

    async fn cleartext_key(&self, key: Secret, peer: std::net::IpAddr) {
        self.state.cleartext_key_seen(&key, peer).await
    }

    fn metrics(&self) -> &Metrics {
        &self.state.plane.metrics
    }
}

/// Opens the master key and the store named by the config: PostgreSQL when a URL is set
/// (`KEYGATE_STORE_URL`, else `store.url`), else SQLite at `store.path`.
pub fn open_store(
    config: &Config,
    master_env: Option<Zeroizing<String>>,
) -> Result<(Arc<MasterKey>, Arc<dyn Store>), AppError> {
    let master = Arc::new(MasterKey::load_or_create(&MasterKeySource {
        env: master_env,
        file: config.store.master_key_file.clone(),
    })?);
    let store: Arc<dyn Store> = match store_url(config)? {
        Some(url) => {
            let settings = PgSettings::from_url(
                &url,
                config.store.ca_file.clone(),
                config.store.pool_size,
                config.store.timeout,
            )?;
            Arc::new(PgStore::open(&settings, master.clone())?)
        }
        None => Arc::new(SqliteStore::open(&config.store.path, master.clone())?),
    };
    Ok((master, store))
}

/// The PostgreSQL URL, if any: `KEYGATE_STORE_URL` (so that no password has to be written into
/// the config file) wins over `store.url`.
fn store_url(config: &Config) -> Result<Option<Zeroizing<String>>, StoreError> {
    match std::env::var("KEYGATE_STORE_URL") {
        Ok(url) if !url.is_empty() => {
            if !crate::config::StoreUrl::is_postgres(&url) {
                return Err(StoreError::Settings(
                    "KEYGATE_STORE_URL must be a postgres:// or postgresql:// URL (the value is not shown: it may hold a password)".into(),
                ));
            }
            Ok(Some(Zeroizing::new(url)))
        }
        _ => Ok(config
            .store
            .url
            .as_ref()
            .map(|u| Zeroizing::new(u.0.clone()))),
    }
}

/// A running keygate.
pub struct Running {
    /// Where the proxy listener listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    /// The admin key created because the store was empty; shown once.
    pub first_admin_key: Option<Secret>,
    /// The CA a client should trust, when keygate generated its certificate.
    pub dev_ca: Option<PathBuf>,
    /// The shared state (for tests and the admin side).
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    permits: Vec<Arc<Semaphore>>,
    max_connections: usize,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (at most the drain timeout), returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let live = self.state.live();
        // The semaphores were sized by the config keygate started with (not reloadable).
        let max = self.max_connections.min(u32::MAX as usize) as u32;
        let drain = live.config.server.drain_timeout;
        let permits = std::mem::take(&mut self.permits);
        let drained = tokio::time::timeout(drain, async {
            for p in &permits {
                let _ = p.acquire_many(max).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?drain,
                "drain deadline reached; closing the remaining connections"
            );
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        // After the drain: the usage of the last requests too.
        flush_usage(&self.state).await;
    }
}

/// Writes the key usage gathered since the last flush to the store, in one transaction. What
/// cannot be written is put back for the next flush.
pub async fn flush_usage(state: &Arc<AppState>) {
    let taken = state.plane.usage.take();
    if taken.is_empty() {
        return;
    }
    let (st, batch) = (state.clone(), taken.clone());
    if let Err(e) = blocking(move || st.store.record_usage(&batch)).await {
        tracing::warn!(error = %e, keys = taken.len(), "could not write key usage; kept for the next flush");
        state.plane.usage.restore(taken);
    }
}

/// Flushes key usage every `keys.usage_flush_interval` (not reloadable: fixed at start).
async fn flush_usage_every(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let every = state.live().config.keys.usage_flush_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => flush_usage(&state).await,
            _ = crate::server::signalled(&mut shutdown) => return,
        }
    }
}

/// Starts keygate: everything `serve` does short of waiting for a signal.
pub async fn start(
    config: Config,
    master_env: Option<Zeroizing<String>>,
) -> Result<Running, AppError> {
    let config = Arc::new(config);
    // Off the runtime's threads: a PostgreSQL store blocks on a runtime of its own.
    let (master, store) = {
        let config = config.clone();
        blocking(move || open_store(&config, master_env)).await?
    };

    let first_admin_key = {
        let store = store.clone();
        let master = master.clone();
        blocking(move || -> Result<Option<Secret>, AppError> {
            let Some((key, rec)) = issue_first_admin_key(store.as_ref(), &master)? else {
                return Ok(None);
            };
            tracing::info!(key_id = %rec.id, "the store was empty: created the first admin key");
            Ok(Some(key))
        })
        .await?
    };
    {
        let info = store.describe();
        tracing::info!(backend = info.backend, location = %info.location, "store open");
    }

    let cert = crate::tls::resolve_listener_cert(&config.tls)?;
    let tls = TlsAcceptor::from(crate::tls::server_config(&cert.cert, &cert.key)?);
    let upstream = Upstream::new(&config.upstream)?;

    let revisions = {
        let store = store.clone();
        blocking(move || store.revisions()).await?
    };
    let keys = KeyCache::new(
        store.clone(),
        master.clone(),
        KeyCacheSettings {
            ttl: config.keys.cache_ttl,
            negative_ttl: config.keys.negative_cache_ttl,
            capacity: config.keys.cache_capacity,
            staleness_bound: config.keys.staleness_bound,
        },
        revisions.keys,
    );
    keys.note_revision(revisions.keys);
    let tenant = {
        let store = store.clone();
        blocking(move || store.tenant()).await?
    };
    let (proxy, proxy_addr) = bind(config.listen.proxy).await?;
    let (admin, admin_addr) = bind(config.listen.admin).await?;

    let metrics = Arc::new(Metrics::default());
    let fleet = match &config.limits.backend {
        LimitsBackend::Local => None,
        LimitsBackend::Redis(redis) => Some(
            RedisLink::start(redis, metrics.clone())
                .await
                .map_err(AppError::Limits)?,
        ),
    };
    let limits = Arc::new(Limiters::new(&config.limits, &config.routes));
    let state = Arc::new(AppState {
        live: ArcSwap::from_pointee(Live {
            routes: RouteTable::new(&config.routes),
            // Filled below, through the one writer, before any listener runs.
            credentials: Credentials::new(config.routes.len()),
            quotas: quotas(fleet.as_ref(), &limits, &config),
            limits,
            upstream: Arc::new(upstream),
            upstream_ca: read_ca(&config),
            tls,
            cert_not_after: crate::tls::not_after(&cert.cert).ok(),
            generation: 0,
            config: config.clone(),
        }),
        reloading: tokio::sync::Mutex::new(()),
        credentials_writer: Arc::default(),
        reload_status: std::sync::Mutex::default(),
        store_error: std::sync::Mutex::default(),
        tenant,
        store,
        plane: DataPlane {
            master,
            keys: Arc::new(keys),
            passthrough: Arc::new(PassthroughCache::new(config.keys.cache_capacity)),
            metrics,
            usage: Arc::default(),
        },
        fleet: fleet.clone(),
    });

    {
        let state = state.clone();
        blocking(move || state.refresh_credentials()).await?;
    }

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut permits = Vec::new();
    for (listener, plane) in [(proxy, Plane::Proxy), (admin, Plane::Admin)] {
        let p = Arc::new(Semaphore::new(config.server.max_connections));
        permits.push(p.clone());
        let app = Listener {
            state: state.clone(),
            plane,
        };
        tasks.spawn(accept_loop(listener, app, p, shutdown_rx.clone()));
    }
    tasks.spawn(poll_store(state.clone(), revisions, shutdown_rx.clone()));
    if let Some(link) = fleet {
        tasks.spawn(link.watch(shutdown_rx.clone()));
    }
    tasks.spawn(evict_idle_state(state.clone(), shutdown_rx.clone()));
    tasks.spawn(flush_usage_every(state.clone(), shutdown_rx));

    Ok(Running {
        proxy_addr,
        admin_addr,
        first_admin_key,
        dev_ca: cert.dev_ca,
        state,
        shutdown,
        tasks,
        permits,
        max_connections: config.server.max_connections,
    })
}

/// A listener on `addr`, and the address it got (the port, when `addr` asked for port 0).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let bind_error = |source| AppError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::TaskFailed(e.to_string()).into()))
}

/// The key and route quota check of a config snapshot: the local limiters, or the fleet's Redis
/// in front of them.
fn quotas(
    fleet: Option<&Arc<RedisLink>>,
    local: &Arc<Limiters>,
    config: &Config,
) -> Arc<dyn Quotas> {
    match fleet {
        Some(link) => Arc::new(FleetQuotas::new(
            link.clone(),
            &config.limits,
            &config.routes,
            local.clone(),
        )),
        None => local.clone(),
    }
}

/// Drops limiter state of keys and IPs idle long enough to be back at a full bucket, and
/// expired key-cache entries, so that memory follows recent activity.
async fn evict_idle_state(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                state.live().limits.evict_idle();
                state.plane.keys.evict_expired();
            }
            _ = crate::server::signalled(&mut shutdown) => return,
        }
    }
}

/// Asks the store every poll interval whether keys or secrets changed, and at once when the
/// store pushes a change notice (PostgreSQL's NOTIFY from any instance). The poll goes on while
/// notices arrive: it is what notices a store outage (the staleness bound) and what catches a
/// change while the push channel is down.
async fn poll_store(
    state: Arc<AppState>,
    mut seen: Revisions,
    mut shutdown: watch::Receiver<bool>,
) {
    // Not reloadable: the key cache settings are fixed at start.
    let mut tick = tokio::time::interval(state.live().config.keys.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notices = state.store.changes();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = notice(&mut notices) => {}
            _ = crate::server::signalled(&mut shutdown) => return,
        }
        let st = state.clone();
        let polled = blocking(move || -> Result<_, StoreError> {
            let rev = st.store.revisions()?;
            if (rev.secrets, rev.env_vars) != (seen.secrets, seen.env_vars) {
                st.refresh_credentials()?;
            }
            Ok(rev)
        })
        .await;
        match polled {
            Ok(rev) => {
                state.plane.keys.note_revision(rev.keys);
                seen = rev;
                if failing {
                    tracing::info!("key store readable again");
                    failing = false;
                    *state.store_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
            Err(e) => {
                *state.store_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                if !failing {
                    tracing::error!(error = %e, "cannot read the key store; requests fail closed after the staleness bound");
                    failing = true;
                }
            }
        }
    }
}

/// The next change notice; never, for a store that sends none (or stopped sending).
async fn notice(notices: &mut Option<watch::Receiver<u64>>) {
    if let Some(rx) = notices {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    *notices = None;
    std::future::pending::<()>().await
}

fn read_ca(config: &Config) -> Option<Vec<u8>> {
    config
        .upstream
        .ca_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
}

/// The settings a reload cannot apply to a running keygate (they shape listeners, the store
/// or the runtime), named as in the config file.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("listen", old.listen != new.listen);
    check("store", old.store != new.store);
    // The Redis connection is made at start; quotas themselves reload.
    check(
        "limits.backend (and redis_url, redis_prefix)",
        old.limits.backend != new.limits.backend,
    );
    // keys.on_cleartext is read per event and applies at once; the cache settings do not.
    let cache = |k: &crate::config::KeysConfig| {
        (
            k.cache_ttl,
            k.negative_cache_ttl,
            k.cache_capacity,
            k.poll_interval,
            k.staleness_bound,
            k.usage_flush_interval,
        )
    };
    check(
        "keys (cache settings)",
        cache(&old.keys) != cache(&new.keys),
    );
    check(
        "server.max_connections",
        old.server.max_connections != new.server.max_connections,
    );
    check(
        "server.worker_threads",
        old.server.worker_threads != new.server.worker_threads,
    );
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_backend_changes_only_with_a_restart() {
        let local = Config::parse("", "t").unwrap();
        let redis = Config::parse_with_env(
            "[limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379/0\"\n",
            "t",
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            restart_only_changes(&local, &redis),
            ["limits.backend (and redis_url, redis_prefix)"]
        );
        let quotas = Config::parse("[limits]\ndefault = { per_second = 1, burst = 1 }\n", "t");
        assert!(restart_only_changes(&local, &quotas.unwrap()).is_empty());
    }
}
