//! Key usage (`last_used`, `request_count`, `rate_limited_count`), gathered in memory on the
//! hot path and written to the store in one batched statement per flush
//! (`keys.usage_flush_interval`, and at shutdown).
//!
//! The hot path never touches the store for this: a request costs one read-locked map lookup
//! (a write lock only for a key's first request since the last flush) and three relaxed
//! atomics. A flush takes the counts out shard by shard; what a failed flush took is put
//! back, so a store outage delays usage but does not lose it. A crash loses at most one
//! interval. In a fleet every instance flushes its own deltas: the store keeps the latest
//! time and adds the counts.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::store::KeyUsage;

#[derive(Default)]
struct Counts {
    /// Milliseconds since the Unix epoch of the latest request.
    last_ms: AtomicU64,
    requests: AtomicU64,
    limited: AtomicU64,
}

/// Usage not yet written to the store, by key.
#[derive(Default)]
pub struct Usage {
    pending: DashMap<u128, Counts>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Usage {
    /// One request authenticated with key `key_uid`; `limited`: it was refused with 429.
    pub fn note(&self, key_uid: u128, limited: bool) {
        self.add(key_uid, now_ms(), 1, u64::from(limited));
    }

    fn add(&self, key_uid: u128, last_ms: u64, requests: u64, limited: u64) {
        let bump = |c: &Counts| {
            c.last_ms.fetch_max(last_ms, Ordering::Relaxed);
            c.requests.fetch_add(requests, Ordering::Relaxed);
            if limited > 0 {
                c.limited.fetch_add(limited, Ordering::Relaxed);
            }
        };
        if let Some(c) = self.pending.get(&key_uid) {
            bump(&c);
            return;
        }
        bump(&self.pending.entry(key_uid).or_default());
    }

    /// Takes everything gathered so far, for a flush.
    pub fn take(&self) -> Vec<KeyUsage> {
        let mut out = Vec::new();
        // `retain` holds each shard's write lock while it runs: no request can add to an
        // entry between its counts being read and the entry being removed.
        self.pending.retain(|uid, c| {
            let requests = c.requests.swap(0, Ordering::Relaxed);
            let limited = c.limited.swap(0, Ordering::Relaxed);
            let last_ms = c.last_ms.swap(0, Ordering::Relaxed);
            if requests > 0 || limited > 0 {
                out.push(KeyUsage {
                    key_id: uuid::Uuid::from_u128(*uid).to_string(),
                    last_used_ms: last_ms,
                    requests,
                    rate_limited: limited,
                });
            }
            false
        });
        out
    }

    /// Puts back what a failed flush took.
    pub fn restore(&self, taken: Vec<KeyUsage>) {
        for u in taken {
            if let Ok(id) = uuid::Uuid::parse_str(&u.key_id) {
                self.add(id.as_u128(), u.last_used_ms, u.requests, u.rate_limited);
            }
        }
    }

    /// How many keys have usage waiting for the next flush.
    pub fn pending_keys(&self) -> usize {
        self.pending.len()
    }
}

/// The stored form of a usage time: RFC 3339 with milliseconds and `Z`, like every time.
pub fn format_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    crate::store::format_time(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_are_taken_once_and_survive_a_failed_flush() {
        let u = Usage::default();
        for i in 0..10 {
            u.note(7, i % 3 == 0);
        }
        u.note(8, false);
        let mut taken = u.take();
        taken.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].requests, taken[0].rate_limited), (10, 4));
        assert_eq!((taken[1].requests, taken[1].rate_limited), (1, 0));
        assert!(u.take().is_empty(), "taken twice");
        u.restore(taken);
        u.note(7, false);
        let again = u.take();
        let k7 = again
            .iter()
            .find(|k| k.key_id == uuid::Uuid::from_u128(7).to_string())
            .unwrap();
        assert_eq!((k7.requests, k7.rate_limited), (11, 4));
        assert!(format_ms(k7.last_used_ms).ends_with('Z'));
    }
}
