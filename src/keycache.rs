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
use crate::store::{KeyLookup, Principal, StoreError};

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
    store: Arc<dyn KeyLookup>,
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
        store: Arc<dyn KeyLookup>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Role;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A store that knows one digest and counts how often it is asked.
    struct CountingStore {
        known: Mutex<Option<KeyDigest>>,
        revision: AtomicU64,
        lookups: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl KeyLookup for CountingStore {
        fn principal_by_digest(
            &self,
            digest: &KeyDigest,
        ) -> Result<(Option<Principal>, u64), StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Corrupt("down".into()));
            }
            let found = (*self.known.lock().unwrap() == Some(*digest)).then(|| Principal {
                key_id: "k1".into(),
                key_uid: 1,
                limit: None,
                org_id: "o".into(),
                user_id: "u".into(),
                role: Role::Proxy,
                routes: None,
            });
            Ok((found, self.revision.load(Ordering::SeqCst)))
        }
    }

    fn setup(staleness: Duration) -> (Arc<CountingStore>, KeyCache, String) {
        let master = Arc::new(MasterKey::from_bytes(&[3; 32]));
        let key = master.generate_key().unwrap().expose().to_owned();
        let store = Arc::new(CountingStore {
            known: Mutex::new(Some(master.digest(&key))),
            revision: AtomicU64::new(1),
            lookups: AtomicUsize::new(0),
            fail: Default::default(),
        });
        let cache = KeyCache::new(
            store.clone(),
            master,
            KeyCacheSettings {
                ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(5),
                capacity: 1000,
                staleness_bound: staleness,
            },
            1,
        );
        cache.note_revision(1);
        (store, cache, key)
    }

    #[tokio::test]
    async fn a_known_key_is_read_from_the_store_once() {
        let (store, cache, key) = setup(Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(
                cache.authenticate(&key).await.unwrap().unwrap().key_id,
                "k1"
            );
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_keys_are_negatively_cached_and_malformed_ones_never_looked_up() {
        let (store, cache, _) = setup(Duration::from_secs(10));
        let unknown = format!("sk-{}", "Z".repeat(48));
        for _ in 0..50 {
            assert!(cache.authenticate(&unknown).await.unwrap().is_none());
            assert!(cache.authenticate("sk-short").await.unwrap().is_none());
            assert!(cache.authenticate("").await.unwrap().is_none());
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_store_read() {
        let (store, cache, key) = setup(Duration::from_secs(10));
        let cache = Arc::new(cache);
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (c, k) = (cache.clone(), key.clone());
                tokio::spawn(async move { c.authenticate(&k).await.unwrap().is_some() })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_newer_revision_makes_cached_entries_stale_at_once() {
        let (store, cache, key) = setup(Duration::from_secs(10));
        assert!(cache.authenticate(&key).await.unwrap().is_some());
        // The key is deleted elsewhere; the poller sees the new revision.
        *store.known.lock().unwrap() = None;
        store.revision.store(2, Ordering::SeqCst);
        cache.note_revision(2);
        assert!(cache.authenticate(&key).await.unwrap().is_none());
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
        // And the negative answer is cached at the new revision.
        assert!(cache.authenticate(&key).await.unwrap().is_none());
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreadable_store_fails_closed() {
        let (store, cache, key) = setup(Duration::from_millis(50));
        store.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            cache.authenticate(&key).await,
            Err(LookupError::Store(_))
        ));
        tokio::time::sleep(Duration::from_millis(80)).await;
        // Past the staleness bound without a successful poll: refused even for cached keys.
        assert!(matches!(
            cache.authenticate(&key).await,
            Err(LookupError::Stale)
        ));
        cache.note_revision(1);
        store.fail.store(false, Ordering::SeqCst);
        assert!(cache.authenticate(&key).await.unwrap().is_some());
    }
}
