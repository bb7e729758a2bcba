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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::config::{Config, OnCleartext};
use crate::crypto::{MasterKey, MasterKeyError, MasterKeySource};
use crate::keycache::{KeyCache, KeyCacheSettings};
use crate::proxy::credentials::Credentials;
use crate::proxy::forward::Upstream;
use crate::proxy::limit::Limiters;
use crate::proxy::passthrough::PassthroughCache;
use crate::proxy::routes::RouteTable;
use crate::secret::Secret;
use crate::server::{accept_loop, Plane};
use crate::store::{
    issue_key, KeyOptions, Revisions, Role, SqliteStore, Store, StoreError, Tenant,
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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters of events worth reporting.
#[derive(Debug, Default)]
pub struct Counters {
    pub cleartext_attempts: AtomicU64,
    pub exposed_keys_flagged: AtomicU64,
}

/// What every request handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    /// The default org and user: routes take their secrets from this org.
    pub tenant: Tenant,
    pub store: Arc<dyn Store>,
    pub master: Arc<MasterKey>,
    pub keys: KeyCache,
    pub routes: RouteTable,
    pub credentials: Credentials,
    pub passthrough: PassthroughCache,
    pub limits: Limiters,
    pub upstream: Upstream,
    pub counters: Counters,
}

impl AppState {
    /// A key was seen in a cleartext request: if it is valid, it has leaked. Flag it (or revoke
    /// it, by config), log the event by key id, never the key.
    pub async fn cleartext_key_seen(&self, key: &Secret) {
        let principal = match self.keys.authenticate(key.expose()).await {
            Ok(Some(p)) => p,
            _ => return,
        };
        self.counters
            .exposed_keys_flagged
            .fetch_add(1, Ordering::Relaxed);
        let revoke = self.config.keys.on_cleartext == OnCleartext::Revoke;
        let store = self.store.clone();
        let id = principal.key_id();
        let result = tokio::task::spawn_blocking(move || {
            store.flag_exposed(&id)?;
            if revoke {
                store.delete_api_key(None, &id)?;
            }
            store.revisions()
        })
        .await;
        match result {
            Ok(Ok(rev)) => {
                self.keys.note_revision(rev.keys);
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

/// Opens the master key and the store named by the config.
pub fn open_store(
    config: &Config,
    master_env: Option<Zeroizing<String>>,
) -> Result<(Arc<MasterKey>, Arc<SqliteStore>), AppError> {
    let master = Arc::new(MasterKey::load_or_create(&MasterKeySource {
        env: master_env,
        file: config.store.master_key_file.clone(),
    })?);
    let store = Arc::new(SqliteStore::open(&config.store.path, master.clone())?);
    Ok((master, store))
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
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (at most the drain timeout), returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let max = self
            .state
            .config
            .server
            .max_connections
            .min(u32::MAX as usize) as u32;
        let drain = self.state.config.server.drain_timeout;
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
    }
}

/// Starts keygate: everything `serve` does short of waiting for a signal.
pub async fn start(
    config: Config,
    master_env: Option<Zeroizing<String>>,
) -> Result<Running, AppError> {
    let config = Arc::new(config);
    let (master, sqlite) = open_store(&config, master_env)?;
    let store: Arc<dyn Store> = sqlite;

    let first_admin_key = {
        let store = store.clone();
        let master = master.clone();
        blocking(move || -> Result<Option<Secret>, AppError> {
            if store.count_api_keys()? > 0 {
                return Ok(None);
            }
            let t = store.tenant()?;
            let (key, rec) = issue_key(
                store.as_ref(),
                &master,
                (&t.org_id, &t.user_id),
                "admin",
                KeyOptions::role(Role::Admin),
            )?;
            tracing::info!(key_id = %rec.id, "the store was empty: created the first admin key");
            Ok(Some(key))
        })
        .await?
    };

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
    let credentials = {
        let store = store.clone();
        let routes = config.routes.clone();
        let tenant = tenant.clone();
        blocking(move || {
            let c = Credentials::new(routes.len());
            c.refresh(store.as_ref(), &tenant, &routes).map(|()| c)
        })
        .await?
    };

    let proxy = TcpListener::bind(config.listen.proxy)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen.proxy,
            source,
        })?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen.admin,
            source,
        })?;
    let proxy_addr = proxy.local_addr().map_err(|source| AppError::Bind {
        addr: config.listen.proxy,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| AppError::Bind {
        addr: config.listen.admin,
        source,
    })?;

    let state = Arc::new(AppState {
        routes: RouteTable::new(&config.routes),
        tenant,
        config: config.clone(),
        store,
        master,
        keys,
        credentials,
        passthrough: PassthroughCache::new(config.keys.cache_capacity),
        limits: Limiters::new(&config.limits, &config.routes),
        upstream,
        counters: Counters::default(),
    });

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut permits = Vec::new();
    for (listener, plane) in [(proxy, Plane::Proxy), (admin, Plane::Admin)] {
        let p = Arc::new(Semaphore::new(config.server.max_connections));
        permits.push(p.clone());
        tasks.spawn(accept_loop(
            listener,
            plane,
            tls.clone(),
            state.clone(),
            p,
            shutdown_rx.clone(),
        ));
    }
    tasks.spawn(poll_store(state.clone(), revisions, shutdown_rx.clone()));
    tasks.spawn(evict_idle_state(state.clone(), shutdown_rx));

    Ok(Running {
        proxy_addr,
        admin_addr,
        first_admin_key,
        dev_ca: cert.dev_ca,
        state,
        shutdown,
        tasks,
        permits,
    })
}

async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Corrupt(format!("store task failed: {e}")).into()))
}

/// Drops limiter state of keys and IPs idle long enough to be back at a full bucket, and
/// expired key-cache entries, so that memory follows recent activity.
async fn evict_idle_state(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                state.limits.evict_idle();
                state.keys.evict_expired();
            }
            _ = crate::server::signalled(&mut shutdown) => return,
        }
    }
}

/// Asks the store every poll interval whether keys or secrets changed.
async fn poll_store(
    state: Arc<AppState>,
    mut seen: Revisions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(state.config.keys.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::server::signalled(&mut shutdown) => return,
        }
        let st = state.clone();
        let polled = blocking(move || -> Result<_, StoreError> {
            let rev = st.store.revisions()?;
            if (rev.secrets, rev.env_vars) != (seen.secrets, seen.env_vars) {
                st.credentials
                    .refresh(st.store.as_ref(), &st.tenant, &st.config.routes)?;
            }
            Ok(rev)
        })
        .await;
        match polled {
            Ok(rev) => {
                state.keys.note_revision(rev.keys);
                seen = rev;
                if failing {
                    tracing::info!("key store readable again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cannot read the key store; requests fail closed after the staleness bound");
                    failing = true;
                }
            }
        }
    }
}
