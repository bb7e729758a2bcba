//! The cached key list: key digest → `Principal`, so that the hot path never touches the store
//! for a known key.
//!
//! ```text
//!  key ──shape ok?──no──▶ unknown (no lookup, nothing cached)
//!        │yes
//!   keyed hash ──▶ slot (key id, shared profile or "unknown", revision read at, expiry)
//!        │              │ hit, revision current, not expired ──▶ answer
//!        │              │ miss or stale ──▶ HMAC digest, one store read per key (concurrent misses wait
//!        │              ▼                  on the same once-cell)
//!        │         positive TTL (known) / negative TTL (unknown)
//!  poller ──every poll_interval──▶ store.revisions() ──▶ `current` revision, `last_sync`
//!  timer ──every 10 s──▶ evict_expired(); inserts beyond capacity evict too
//! ```
//!
//! An entry read at an older keys revision than the poller last saw is never served: so a key
//! deleted by any process is refused within one poll interval, and one deleted through this
//! process (admin API) at once, by [`KeyCache::note_revision`]. When the store has not been
//! read successfully for longer than the staleness bound, lookups fail closed.
//!
//! Memory: a slot is 32 bytes (+16 for its key) in a DashMap keyed by a 128-bit keyed hash of the key; the
//! profile (org, user, role, routes, quota) is interned, so the thousands of keys that share one
//! cost nothing more. (moka cost ~700 bytes per key here: its per-entry bookkeeping is built for
//! admission policies this cache does not need.)

use std::collections::HashSet;
use std::hash::RandomState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;
// tokio's clock: std's outside a paused test runtime, so the tests can pause and advance it.
use tokio::time::Instant;

use crate::crypto::{is_well_formed_key, MasterKey};
use crate::store::{KeyLookup, Principal, Profile, StoreError};

#[derive(Clone)]
struct Slot {
    key_uid: u128,
    /// `None`: the key is unknown (negative entry).
    profile: Option<Arc<Profile>>,
    /// The keys revision it was read at, modulo 2^32 (u32 and whole seconds keep the slot at
    /// 32 bytes); compared with [`at_least`], which is exact while the cache is fewer than
    /// 2^31 key writes behind the store, and so past 2^32 writes too.
    revision: u32,
    /// Whole seconds since the cache started, rounded up.
    expires_s: u32,
}

/// Whether a slot read at `slot` (a revision modulo 2^32) is at least at revision `current`:
/// the wrapping distance from `current` to `slot` is zero or "forward" (under 2^31).
fn at_least(slot: u32, current: u64) -> bool {
    slot.wrapping_sub(current as u32) < 1 << 31
}

impl Slot {
    fn principal(&self) -> Option<Principal> {
        self.profile.as_ref().map(|p| Principal {
            key_uid: self.key_uid,
            profile: p.clone(),
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
    slots: DashMap<u128, Slot>,
    hashers: (RandomState, RandomState),
    inflight: DashMap<u128, Arc<OnceCell<Slot>>>,
    profiles: Mutex<HashSet<Arc<Profile>>>,
    store: Arc<dyn KeyLookup>,
    master: Arc<MasterKey>,
    current: AtomicU64,
    started: Instant,
    last_sync_ms: AtomicU64,
    staleness_bound_ms: u64,
    ttl_ms: u64,
    negative_ttl_ms: u64,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
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
        KeyCache {
            slots: DashMap::new(),
            hashers: (RandomState::new(), RandomState::new()),
            inflight: DashMap::new(),
            profiles: Mutex::new(HashSet::new()),
            store,
            master,
            current: AtomicU64::new(initial_revision),
            started: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            staleness_bound_ms: s.staleness_bound.as_millis() as u64,
            ttl_ms: s.ttl.as_millis() as u64,
            negative_ttl_ms: s.negative_ttl.as_millis() as u64,
            capacity: s.capacity.clamp(1, usize::MAX as u64) as usize,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The slot of a key: a 128-bit keyed hash (two SipHash-1-3 with independent random keys
    /// of this process). Not the HMAC digest: SipHash costs ~200 instructions where HMAC-SHA-256
    /// costs ~4,000, and a PRF under keys nobody outside this process knows is as good as a
    /// digest for finding a slot. The HMAC digest is computed on a miss, for the store.
    fn slot_id(&self, key: &str) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.hashers.0.hash_one(key)) << 64) | u128::from(self.hashers.1.hash_one(key))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The principal of `key` if the cache already knows it as valid now (a fresh positive
    /// entry at the current revision), without reading the store. `None` says nothing about
    /// the key, only that answering would take a store read.
    pub fn cached(&self, key: &str) -> Option<Principal> {
        let now = self.now_ms();
        if self.stale(now) || !is_well_formed_key(key) {
            return None;
        }
        self.fresh(self.slot_id(key), now).flatten()
    }

    /// Whether the store has gone unread for longer than the staleness bound.
    fn stale(&self, now: u64) -> bool {
        now.saturating_sub(self.last_sync_ms.load(Ordering::Acquire)) > self.staleness_bound_ms
    }

    /// The cached answer of slot `id` when it is fresh (read at the current revision, not
    /// expired): `Some(None)` for a key known to be unknown.
    fn fresh(&self, id: u128, now: u64) -> Option<Option<Principal>> {
        let slot = self.slots.get(&id)?;
        (at_least(slot.revision, self.current.load(Ordering::Acquire))
            && u64::from(slot.expires_s) * 1000 > now)
            .then(|| slot.principal())
    }

    /// The principal of `key`, or `None` for any key that is not valid now.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Principal>, LookupError> {
        let now = self.now_ms();
        if self.stale(now) {
            return Err(LookupError::Stale);
        }
        if !is_well_formed_key(key) {
            return Ok(None);
        }
        let id = self.slot_id(key);
        if let Some(answer) = self.fresh(id, now) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(answer);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A miss: one store read per digest, however many requests wait for it. A read that
        // began before the revision moved is not trusted: read again.
        for _ in 0..3 {
            let cell = self
                .inflight
                .entry(id)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone();
            let slot = cell
                .get_or_try_init(|| self.load(self.master.digest(key)))
                .await
                .map_err(Arc::new)?
                .clone();
            self.inflight.remove_if(&id, |_, c| Arc::ptr_eq(c, &cell));
            if at_least(slot.revision, self.current.load(Ordering::Acquire)) {
                self.insert(id, slot.clone());
                return Ok(slot.principal());
            }
        }
        Err(LookupError::Stale)
    }

    async fn load(&self, digest: crate::crypto::KeyDigest) -> Result<Slot, StoreError> {
        let store = self.store.clone();
        let (principal, revision) =
            tokio::task::spawn_blocking(move || store.principal_by_digest(&digest))
                .await
                .map_err(|e| StoreError::TaskFailed(e.to_string()))??;
        let now = self.now_ms();
        // Modulo 2^32, on purpose: see `at_least`.
        let revision = revision as u32;
        let expires =
            |ttl_ms: u64| u32::try_from((now + ttl_ms).div_ceil(1000)).unwrap_or(u32::MAX);
        Ok(match principal {
            Some(p) => Slot {
                key_uid: p.key_uid,
                profile: Some(self.intern(p.profile)),
                revision,
                expires_s: expires(self.ttl_ms),
            },
            None => Slot {
                key_uid: 0,
                profile: None,
                revision,
                expires_s: expires(self.negative_ttl_ms),
            },
        })
    }

    fn intern(&self, profile: Arc<Profile>) -> Arc<Profile> {
        let mut set = self.profiles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = set.get(&*profile) {
            return existing.clone();
        }
        set.insert(profile.clone());
        profile
    }

    fn insert(&self, id: u128, slot: Slot) {
        self.slots.insert(id, slot);
        if self.slots.len() > self.capacity {
            self.evict_expired();
            if self.slots.len() > self.capacity {
                // Still full of live entries: drop every eighth one (arbitrary, cheap) so that
                // the next inserts do not sweep again at once.
                let mut n = 0u32;
                self.slots.retain(|_, _| {
                    n = n.wrapping_add(1);
                    n % 8 != 0
                });
            }
        }
    }

    /// Drops expired entries and profiles no entry uses any more.
    pub fn evict_expired(&self) {
        let now = self.now_ms();
        self.slots
            .retain(|_, s| u64::from(s.expires_s) * 1000 > now);
        self.slots.shrink_to_fit();
        let mut set = self.profiles.lock().unwrap_or_else(|p| p.into_inner());
        set.retain(|p| Arc::strong_count(p) > 1);
    }

    /// Records the keys revision the store is at now, and that it was readable.
    pub fn note_revision(&self, revision: u64) {
        self.current.fetch_max(revision, Ordering::AcqRel);
        self.last_sync_ms.store(self.now_ms(), Ordering::Release);
    }

    /// How long since the store was last read successfully.
    pub fn staleness(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_sync_ms.load(Ordering::Acquire)),
        )
    }

    /// (hits, misses) of well-formed keys since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Entries currently cached.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyDigest;
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
                key_uid: 1,
                profile: Arc::new(crate::store::Profile {
                    org_id: "o".into(),
                    user_id: "u".into(),
                    role: Role::Proxy,
                    routes: None,
                    limit: None,
                }),
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

    #[tokio::test(start_paused = true)]
    async fn a_known_key_is_read_from_the_store_once() {
        let (store, cache, key) = setup(Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(cache.authenticate(&key).await.unwrap().unwrap().key_uid, 1);
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
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

    #[test]
    fn revisions_compare_across_the_u32_wrap() {
        assert!(at_least(5, 5));
        assert!(
            at_least(6, 5),
            "read after a write the poller has not seen yet"
        );
        assert!(!at_least(4, 5));
        let past = (1u64 << 32) + 3;
        assert!(
            at_least(past as u32, past),
            "past 2^32 writes a current slot is current"
        );
        assert!(!at_least((past - 1) as u32, past));
        assert!(
            at_least(2, u64::from(u32::MAX)),
            "a slot read just after the wrap"
        );
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_store_fails_closed() {
        let (store, cache, key) = setup(Duration::from_millis(50));
        store.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            cache.authenticate(&key).await,
            Err(LookupError::Store(_))
        ));
        tokio::time::advance(Duration::from_millis(80)).await;
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
