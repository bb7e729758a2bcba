//! keygate: a local authenticating reverse proxy and secret injector.
//!
//! Apps call keygate with a key of its own in `x-api-key`; keygate checks it against a cached
//! key list, removes it, injects the real upstream credential, and forwards the request over
//! verified TLS with bodies streamed both ways.
//!
//! # Layout
//! - [`config`]: TOML → validated `Config`.
//! - [`app`]: wiring of store, caches, listeners, poller and shutdown; `AppState`.
//! - [`server`]: the accept loop: connection cap, cleartext detection, TLS, h1/h2, lingering
//!   close.
//! - [`proxy`]: the data plane, one file per stage: `path` (normalise), `routes` (select),
//!   `authenticate`, `limit` (the `Quotas` seam: in-process, or `limit::fleet` in Redis),
//!   `inject`, `forward`; with `headers` (the header and trailer
//!   rules), `bodies` (body caps and timeouts), `credentials` (what each route injects) and
//!   `passthrough` (verdicts on passthrough keys).
//! - [`admin`]: the control plane listener and the admin API.
//! - [`actions`]: what the CLI and the admin API both do (create keys, store secrets, …).
//! - [`cli`]: the command line's arguments, `serve` with its signals and pid file, `run`.
//! - [`run`]: `keygate run`, env vars into a child process.
//! - [`keycache`]: key digest → principal, positive and negative TTL, revision-exact invalidation.
//! - [`store`]: the `Store` trait and its SQLite implementation; secrets sealed at rest.
//! - [`crypto`]: master key, key digests, sealing, key generation.
//! - [`tls`]: rustls configurations and the development CA.
//! - [`secret`]: the `Secret` type whose `Debug` prints `***`.
//! - [`error`]: the one mapping from `ProxyError` / `AdminError` to a response.
//! - [`access`]: the access log line of each request.
//! - [`audit`]: the tamper-evident audit trail (events, their MAC chain, verification).
//! - [`usage`]: key usage gathered on the hot path, flushed to the store in batches.
//! - [`metrics`]: the counters and the Prometheus exposition of `/metrics`.
//! - `fuzzing`: entry points for the cargo-fuzz targets (hidden from the docs).

pub mod access;
pub mod actions;
pub mod admin;
pub mod app;
pub mod audit;
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
pub mod usage;

/// The body of every response keygate sends: a streamed upstream body, or a small full one.
pub type Body = http_body_util::Either<
    proxy::bodies::IdleGuard<hyper::body::Incoming>,
    http_body_util::Full<bytes::Bytes>,
>;
