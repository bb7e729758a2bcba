//! keygate: a local authenticating reverse proxy and secret injector.
//!
//! Apps call keygate with a key of its own in `x-api-key`; keygate checks it against a cached
//! key list, removes it, injects the real upstream credential, and forwards the request over
//! verified TLS with bodies streamed both ways.
//!
//! # Layout
//! - [`config`]: TOML → validated `Config`.
//! - [`app`]: wiring of store, caches, listeners, poller and shutdown.
//! - [`server`]: the accept loop: connection cap, cleartext detection, TLS, h1/h2.
//! - [`proxy`]: the data plane, one file per stage (authenticate, routes, inject, forward).
//! - [`admin`]: the control plane listener and the admin API.
//! - [`run`]: `keygate run`, env vars into a child process.
//! - [`keycache`]: key digest → principal, positive and negative TTL, revision-exact invalidation.
//! - [`store`]: the `Store` trait and its SQLite implementation; secrets sealed at rest.
//! - [`crypto`]: master key, key digests, sealing, key generation.
//! - [`tls`]: rustls configurations and the development CA.
//! - [`secret`]: the `Secret` type whose `Debug` prints `***`.
//! - [`error`]: the one mapping from `ProxyError` to a response.

pub mod access;
pub mod actions;
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod keycache;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;

/// The body of every response keygate sends: a streamed upstream body, or a small full one.
pub type Body = http_body_util::Either<
    proxy::bodies::IdleGuard<hyper::body::Incoming>,
    http_body_util::Full<bytes::Bytes>,
>;
