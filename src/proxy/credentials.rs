//! The upstream credential of each route, decrypted once and kept as a prebuilt, sensitive
//! header value, so the hot path does one atomic load and no store access or formatting.
//!
//! ```text
//!  poller sees the secrets revision move ──▶ refresh(): read + decrypt every route's secret
//!                                            ──▶ swap in a new table (ArcSwap)
//!  request ──▶ load the table ──▶ clone the header value of its route
//! ```
//!
//! A request that loaded the old table keeps the old credential to its end; the next one uses
//! the new table: rotation without errors.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::{Inject, Route};
use crate::store::{Store, StoreError};

/// One route's credential, or why it has none.
#[derive(Clone)]
pub enum Credential {
    /// The `Authorization` value to send.
    Ready(HeaderValue),
    /// The named secret does not exist, or holds no usable value.
    Missing,
}

/// The credentials of all routes, indexed like the configured routes.
pub struct Credentials {
    table: ArcSwap<Vec<Credential>>,
}

impl Credentials {
    /// An empty table (every route `Missing`) until the first refresh.
    pub fn new(routes: usize) -> Self {
        Credentials {
            table: ArcSwap::from_pointee(vec![Credential::Missing; routes]),
        }
    }

    /// The credential of route `index`.
    pub fn get(&self, index: usize) -> Credential {
        self.table
            .load()
            .get(index)
            .cloned()
            .unwrap_or(Credential::Missing)
    }

    /// Re-reads every route's secret from the store and swaps the table. Blocking.
    /// Warns (without the value) about each route left without a credential.
    pub fn refresh(
        &self,
        store: &dyn Store,
        org_id: &str,
        routes: &[Route],
    ) -> Result<(), StoreError> {
        let mut table = Vec::with_capacity(routes.len());
        for route in routes {
            let Inject::AiSecret(name) = &route.inject;
            let cred = match store.ai_secret_value(org_id, name)? {
                None => {
                    tracing::warn!(route = %route.prefix, ai_secret = %name,
                        "route names an ai_secret that does not exist; it answers 503 until it does");
                    Credential::Missing
                }
                Some((_, value)) => {
                    match HeaderValue::from_str(&format!("Bearer {}", value.expose())) {
                        Ok(mut v) => {
                            v.set_sensitive(true);
                            Credential::Ready(v)
                        }
                        Err(_) => {
                            tracing::warn!(route = %route.prefix, ai_secret = %name,
                                "ai_secret holds characters not allowed in an HTTP header; route answers 503");
                            Credential::Missing
                        }
                    }
                }
            };
            table.push(cred);
        }
        self.table.store(Arc::new(table));
        Ok(())
    }
}
