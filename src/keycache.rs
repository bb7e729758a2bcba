//! The cached key list: key digest → `Principal`, so that the hot path never touches the store
//! for a known key.
//!
//! ```text
//!  key ──shape ok?──no──▶ unknown (no lookup, nothing cached)
//!        │yes
//!   HMAC digest ──▶ moka entry (principal or "unknown", revision it was read at)
//!        │              │ hit, revision current ──▶ answer
//!        │              │ miss or stale revision ──▶ one store read per digest (concurrent
//!        │              ▼                            misses wait for the same read)
//!        │         positive TTL (known) / negative TTL (unknown)
//!  poller ──every poll_interval──▶ store.revisions() ──▶ `current` revision, `last_sync`
//! ```
//!
//! An entry read at an older keys revision than the poller last saw is never served: so a key
//! deleted by any process is refused within one poll interval, and one deleted through this
//! process (admin API) at once, by [`KeyCache::note_revision`]. When the store has not been
//! read successfully for longer than the staleness bound, lookups fail closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypto::{is_well_formed_key, KeyDigest, MasterKey};
use crate::store::{Principal, Store, StoreError};

#[derive(Clone)]
struct Entry {
    principal: Option<Arc<Principal>>,
    revision: u64,
}

struct Ttl {
    positive: Duration,
    negative: Duration,
}

impl moka::Expiry<KeyDigest, Entry> for Ttl {
    fn expire_after_create(
        &self,
        _k: &KeyDigest,
        v: &Entry,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(if v.principal.is_some() {
            self.positive
        } else {
            self.negative
        })
    }
}

/// Why a lookup could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("key store unavailable beyond the staleness bound")]
    Stale,
    #[error("key store read failed: {0}")]
    Store(#[from] Arc<StoreError>),
}

/// The key cache. Cheap to share behind an `Arc`.
pub struct KeyCache {
    cache: moka::future::Cache<KeyDigest, Entry>,
    store: Arc<dyn Store>,
    master: Arc<MasterKey>,
    current: AtomicU64,
    started: Instant,
    last_sync_ms: AtomicU64,
    staleness_bound_ms: u64,
}

/// Settings of the key cache.
pub struct KeyCacheSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub capacity: u64,
    pub staleness_bound: Duration,
}

impl KeyCache {
    /// A cache over `store`; `initial_revision` is the keys revision read at start.
    pub fn new(
        store: Arc<dyn Store>,
        master: Arc<MasterKey>,
        s: KeyCacheSettings,
        initial_revision: u64,
    ) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(s.capacity)
            .expire_after(Ttl {
                positive: s.ttl,
                negative: s.negative_ttl,
            })
            .build();
        KeyCache {
            cache,
            store,
            master,
            current: AtomicU64::new(initial_revision),
            started: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            staleness_bound_ms: s.staleness_bound.as_millis() as u64,
        }
    }

    /// The principal of `key`, or `None` for any key that is not valid now.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Arc<Principal>>, LookupError> {
        if self.staleness() > Duration::from_millis(self.staleness_bound_ms) {
            return Err(LookupError::Stale);
        }
        if !is_well_formed_key(key) {
            return Ok(None);
        }
        let digest = self.master.digest(key);
        let current = self.current.load(Ordering::Acquire);
        if let Some(e) = self.cache.get(&digest).await {
            if e.revision >= current {
                return Ok(e.principal);
            }
            self.cache.invalidate(&digest).await;
        }
        let store = self.store.clone();
        let entry = self
            .cache
            .try_get_with(digest, async move {
                let (principal, revision) =
                    tokio::task::spawn_blocking(move || store.principal_by_digest(&digest))
                        .await
                        .map_err(|e| StoreError::Corrupt(format!("lookup task failed: {e}")))??;
                Ok::<_, StoreError>(Entry {
                    principal: principal.map(Arc::new),
                    revision,
                })
            })
            .await?;
        Ok(entry.principal)
    }

    /// Records the keys revision the store is at now, and that it was readable.
    pub fn note_revision(&self, revision: u64) {
        self.current.fetch_max(revision, Ordering::AcqRel);
        self.last_sync_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// How long since the store was last read successfully.
    pub fn staleness(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_sync_ms.load(Ordering::Acquire)))
    }

    /// Entries currently cached (approximate).
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Whether the cache holds no entry (approximate).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
