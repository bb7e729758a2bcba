//! Configuration: the TOML file as parsed (`RawConfig`, serde, unknown fields refused) and the
//! validated `Config` the rest of keygate uses, which cannot be invalid.
//!
//! Validation names the field and the reason (`` `route[2].upstream`: must be https:// ``), never
//! panics and never prints a value that could be a secret. `keygate check-config FILE` runs the
//! same code. Relative paths are relative to the working directory keygate runs in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::Deserialize;

/// The built-in defaults: the same text as `config/keygate.toml`, so that running without a
/// config file and running with the example behave alike.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config/keygate.toml");

/// A configuration error: file, line and column, field, and why. Never carries the text of
/// the file or a value from it: the error reaches `/readyz`, `/-/reload`, the log and
/// `check-config`, and a config line may hold a literal credential.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}{at}: `{field}`: {reason}")]
    Parse {
        origin: String,
        at: Location,
        field: String,
        reason: String,
    },
    #[error("{origin}{at}: `{field}`: {reason}")]
    Invalid {
        origin: String,
        at: Location,
        field: String,
        reason: String,
    },
}

/// Where in the file an error is: 1-based line and column (in characters), when known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location(Option<(usize, usize)>);

impl Location {
    /// The location of byte offset `at` in `text`.
    fn of(text: &str, at: usize) -> Location {
        let Some(before) = text.get(..at.min(text.len())) else {
            return Location(None);
        };
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location(Some((line, column)))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw: what the file says.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    default: Option<RawLimit>,
    auth_failures: Option<RawLimit>,
    admin: Option<RawLimit>,
    backend: Option<String>,
    /// May carry a password: held as a secret from the start.
    redis_url: Option<crate::secret::Secret>,
    redis_prefix: Option<String>,
    /// `KEYGATE_REDIS_URL`, read by [`Config::parse_with_env`], used when `redis_url` is unset.
    #[serde(skip)]
    redis_url_env: Option<crate::secret::Secret>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    per_second: f64,
    burst: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    proxy: Option<String>,
    admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    dev_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<PathBuf>,
    master_key_file: Option<PathBuf>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    response_header_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    http2: Option<bool>,
    body_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    cache_ttl: Option<String>,
    negative_cache_ttl: Option<String>,
    cache_capacity: Option<u64>,
    poll_interval: Option<String>,
    staleness_bound: Option<String>,
    on_cleartext: Option<String>,
    usage_flush_interval: Option<String>,
    track_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    header_read_timeout: Option<String>,
    max_headers: Option<usize>,
    max_connections: Option<usize>,
    drain_timeout: Option<String>,
    worker_threads: Option<usize>,
    max_uri_length: Option<usize>,
    max_body_size: Option<u64>,
    body_idle_timeout: Option<String>,
    idle_timeout: Option<String>,
    #[serde(default)]
    allow_encoded_slashes: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    prefix: String,
    host: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    upstream: String,
    // Read as a plain value so that errors can name the exact field (an untagged enum would only
    // say "did not match any variant").
    inject: toml::Value,
    #[serde(default)]
    set_headers: std::collections::BTreeMap<String, String>,
    validate: Option<RawValidate>,
    limit: Option<RawLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValidate {
    path: Option<String>,
    ttl: Option<String>,
    negative_ttl: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated.

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub tls: TlsSource,
    pub store: StoreConfig,
    pub upstream: UpstreamConfig,
    pub keys: KeysConfig,
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub routes: Vec<Route>,
    /// The file this was read from (`None`: the built-in defaults, or text parsed directly).
    /// A reload reads it again.
    pub source: Option<PathBuf>,
}

/// A GCRA quota: a sustained rate per second and a burst. Hashable (the rate is kept in
/// thousandths) so that limiters can be shared by quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    milli_per_second: u64,
    /// The most requests admitted at once.
    pub burst: u32,
}

impl LimitSpec {
    /// The bounds [`LimitSpec::new`] enforces, in the words every error about a quota uses.
    pub const BOUNDS: &'static str =
        "per_second must be between 0.001 and 1000000 and burst between 1 and 1000000";

    /// A quota of `per_second` (0.001 to 1,000,000) with `burst` (1 to 1,000,000).
    pub fn new(per_second: f64, burst: u32) -> Option<LimitSpec> {
        let valid = per_second.is_finite()
            && (0.001..=1_000_000.0).contains(&per_second)
            && (1..=1_000_000).contains(&burst);
        valid.then(|| LimitSpec {
            milli_per_second: (per_second * 1000.0).round() as u64,
            burst,
        })
    }

    /// The sustained rate.
    pub fn per_second(&self) -> f64 {
        self.milli_per_second as f64 / 1000.0
    }

    /// The rate in thousandths per second, exactly as kept (names the quota's shared state).
    pub fn milli_per_second(&self) -> u64 {
        self.milli_per_second
    }
}

/// Rate limits.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Every key's quota unless the key has its own.
    pub default: LimitSpec,
    /// Failed authentications per client IP.
    pub auth_failures: LimitSpec,
    /// Admin API calls per admin key.
    pub admin: LimitSpec,
    /// Where the per-key and per-route quotas live.
    pub backend: LimitsBackend,
}

/// Where the per-key and per-route quotas are kept (`limits.backend`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LimitsBackend {
    /// In this process (governor): each instance has its own quotas.
    #[default]
    Local,
    /// In one Redis shared by a fleet: quotas are global.
    Redis(RedisLimits),
}

/// The Redis of `limits.backend = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLimits {
    pub url: RedisUrl,
    /// Prefix of every key keygate writes (`limits.redis_prefix`).
    pub prefix: String,
}

/// A `redis://` or `rediss://` URL. It may carry a password, so `Debug` and `Display` show it
/// with the user info replaced by `***`; only [`RedisUrl::expose`] gives the whole URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: crate::secret::Secret,
    shown: String,
}

impl RedisUrl {
    /// Parses a Redis URL; the error names what is wrong, never the URL.
    pub fn parse(url: crate::secret::Secret) -> Result<RedisUrl, &'static str> {
        const SHAPE: &str =
            "must be a URL like \"redis://host:6379/0\" or \"rediss://host:6380/0\"";
        let text = url.expose();
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            return Err(SHAPE);
        }
        let parsed = redis::parse_redis_url(text).ok_or(SHAPE)?;
        if parsed.fragment().is_some() {
            // The client reads `#insecure` as "skip certificate verification".
            return Err("must not have a #fragment (no switch skips TLS verification)");
        }
        if parsed.host_str().is_none_or(str::is_empty)
            || redis::IntoConnectionInfo::into_connection_info(text).is_err()
        {
            return Err(SHAPE);
        }
        let userinfo = if parsed.username().is_empty() && parsed.password().is_none() {
            ""
        } else {
            "***@"
        };
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let shown = format!(
            "{}://{userinfo}{}{port}{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default(),
            parsed.path()
        );
        Ok(RedisUrl { url, shown })
    }

    /// The whole URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Listener addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

/// Where the server certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files named in the config.
    Files { cert: PathBuf, key: PathBuf },
    /// A development CA and server certificate generated into (and reused from) this directory.
    Generated { dir: PathBuf },
}

/// The store: SQLite at `path` unless a PostgreSQL `url` is set (here or in
/// `KEYGATE_STORE_URL`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub master_key_file: PathBuf,
    /// A `postgres://` URL: the fleet's shared store. May carry a password, so it is never
    /// printed (see [`StoreUrl`]).
    pub url: Option<StoreUrl>,
    /// A CA trusted for the database's certificate, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL connections per instance.
    pub pool_size: usize,
    /// How long one store call may take before it counts as "unavailable".
    pub timeout: Duration,
}

/// A database URL. Its `Debug` shows only that it is set: the URL may hold a password.
#[derive(Clone, PartialEq)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreUrl(not shown)")
    }
}

impl StoreUrl {
    /// Whether `text` names a PostgreSQL database (the only URL store so far).
    pub fn is_postgres(text: &str) -> bool {
        text.starts_with("postgres://") || text.starts_with("postgresql://")
    }
}

/// How keygate talks to upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// An extra CA trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Offer h2 by ALPN to upstreams (else http/1.1 only).
    pub http2: bool,
    /// An upstream response body with no data for this long is cut (abnormal end).
    pub body_idle_timeout: Duration,
}

/// What to do with a valid key that was seen in a cleartext request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCleartext {
    /// Flag the key as exposed (shown by `keygate keys list`); it keeps working.
    Flag,
    /// Flag and delete it at once.
    Revoke,
}

/// The key cache and how fresh it must be.
#[derive(Debug, Clone, PartialEq)]
pub struct KeysConfig {
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub cache_capacity: u64,
    /// How often the store is asked whether keys or secrets changed.
    pub poll_interval: Duration,
    /// When the store could not be read for longer than this, requests fail closed (503).
    pub staleness_bound: Duration,
    pub on_cleartext: OnCleartext,
    /// How often key usage gathered in memory is written to the store (also at shutdown).
    pub usage_flush_interval: Duration,
    /// Whether requests count towards their key's usage at all (`last_used` and the counts).
    pub track_usage: bool,
}

/// Listener hardening.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// Runtime worker threads (default: one per core).
    pub worker_threads: Option<usize>,
    /// Longer request targets get 414.
    pub max_uri_length: usize,
    /// Request bodies over this many bytes get 413 (declared) or are cut (streamed); none: no cap.
    pub max_body_size: Option<u64>,
    /// A client that leaves the upstream waiting this long for the next piece of its request
    /// body gets 408 and the upstream request is aborted.
    pub body_idle_timeout: Duration,
    /// A connection with no request in progress for this long is closed (h2: GOAWAY first).
    /// For HTTP/1.1 the wait for the next request head is also bounded by
    /// `header_read_timeout`, so an idle h1 connection closes at the shorter of the two.
    pub idle_timeout: Duration,
    /// Whether a request path may carry `%2F` or `%5C` (kept encoded, matched as ordinary
    /// characters). Off: such a path gets 400, since an upstream that decodes them would see
    /// other path segments than the route was chosen by.
    pub allow_encoded_slashes: bool,
}

/// One route: requests whose path starts with `prefix` (and whose host is `host`, when set)
/// go to `upstream` with a credential.
#[derive(Debug, Clone)]
pub struct Route {
    /// How keys name this route in their permissions (default: the prefix). Shared, because
    /// every request carries it to the access log and metrics.
    pub name: std::sync::Arc<str>,
    pub prefix: String,
    /// Lower-case host (with a port only if the config gave one) the request must be for.
    pub host: Option<String>,
    /// Whether `prefix` is removed from the path sent upstream.
    pub strip_prefix: bool,
    pub upstream: Upstream,
    pub inject: Inject,
    /// Extra upstream headers, templated from the org's env vars.
    pub set_headers: Vec<(http::HeaderName, Template)>,
    /// A per-key quota on this route, on top of the key's own.
    pub limit: Option<LimitSpec>,
}

/// A header value with `{env:NAME}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<TemplatePart>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Env(String),
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{env:") {
            if start > 0 {
                parts.push(TemplatePart::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 5..];
            let end = after
                .find('}')
                .ok_or_else(|| "has an unclosed {env:...} placeholder".to_owned())?;
            let name = &after[..end];
            if name.is_empty() || name.contains(['{', '=']) {
                return Err("has a bad env var name in a {env:...} placeholder".to_owned());
            }
            parts.push(TemplatePart::Env(name.to_owned()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        for p in &parts {
            if let TemplatePart::Literal(l) = p {
                crate::proxy::headers::added_value(l).map_err(str::to_owned)?;
            }
        }
        Ok(Template(parts))
    }

    /// The env var names the template uses.
    pub fn env_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            TemplatePart::Env(n) => Some(n.as_str()),
            TemplatePart::Literal(_) => None,
        })
    }

    /// The value with every placeholder filled, or the first missing env var name.
    pub fn render<'a>(&'a self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, &'a str>
    where
        Self: 'a,
    {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                TemplatePart::Literal(l) => out.push_str(l),
                TemplatePart::Env(n) => out.push_str(lookup(n).ok_or(n.as_str())?),
            }
        }
        Ok(out)
    }
}

/// An `https://` upstream, split for cheap URI building.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream's own path prefix, without a trailing `/` (empty for the root).
    pub base_path: String,
}

/// The credential a route injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inject {
    /// The stored ai_secret of this name, in the header its type calls for unless `header` and
    /// `prefix` override it.
    AiSecret {
        name: String,
        header: Option<http::HeaderName>,
        prefix: Option<String>,
    },
    /// The client's own key, forwarded as `Authorization: Bearer`, validated upstream first.
    Passthrough(Validate),
}

/// How a passthrough route validates a client key upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validate {
    /// Path and query of the validation call (`GET`), on the route's upstream.
    pub path: String,
    /// How long an accepted key is remembered.
    pub ttl: Duration,
    /// How long a refused key is remembered.
    pub negative_ttl: Duration,
}

impl Config {
    /// Loads the config: `path` if given, else `config/keygate.toml` when it exists, else the
    /// embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let default = Path::new("config/keygate.toml");
        let chosen = match path {
            Some(p) => Some(p),
            None if default.exists() => Some(default),
            None => None,
        };
        match chosen {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let mut config = Config::parse(&text, &p.display().to_string())?;
                config.source = Some(p.to_path_buf());
                Ok(config)
            }
            None => Config::parse(EMBEDDED_DEFAULTS, "built-in defaults"),
        }
    }

    /// What a reload reads: the file `path` again, or the built-in defaults when keygate
    /// started on them.
    pub fn load_source(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(Some(p)),
            None => Config::parse(EMBEDDED_DEFAULTS, "built-in defaults"),
        }
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, origin, &|name| std::env::var(name).ok())
    }

    /// [`Config::parse`] with the environment read through `env` (`KEYGATE_REDIS_URL`), so that
    /// tests never set process variables.
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            // Where the error points at a bare key (a duplicate key or table), that key is the
            // field; the span's text is shown for nothing else, as it may be a value.
            let key = e
                .span()
                .and_then(|s| text.get(s))
                .filter(|k| e.message().starts_with("duplicate key") && is_bare_key_path(k));
            ConfigError::Parse {
                origin: origin.to_owned(),
                at: e
                    .span()
                    .map_or_else(Location::default, |s| Location::of(text, s.start)),
                field: key.map_or_else(|| "(syntax)".into(), str::to_owned),
                reason: without_values(e.message()),
            }
        })?;
        let mut raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .span()
                .map(|s| Location::of(text, s.start))
                .or_else(|| field_location(text, &field))
                .unwrap_or_default();
            ConfigError::Parse {
                origin: origin.to_owned(),
                at,
                field,
                reason: without_values(inner.message()),
            }
        })?;
        raw.limits.redis_url_env = env("KEYGATE_REDIS_URL").map(crate::secret::Secret::new);
        validate(raw, origin).map_err(|e| match e {
            ConfigError::Invalid {
                origin,
                field,
                reason,
                ..
            } => ConfigError::Invalid {
                at: field_location(text, &field).unwrap_or_default(),
                origin,
                field,
                reason,
            },
            other => other,
        })
    }
}

/// Whether `s` is a dotted path of bare TOML keys (`limits`, `server.max_headers`).
fn is_bare_key_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// An error message with every value it quotes blanked out. serde quotes the offending value
/// (`invalid type: string "sk-…", expected a boolean`, ``unknown variant `sk-…` ``); the
/// message must not carry it. Field names and expected values stay.
fn without_values(message: &str) -> String {
    let one = one_line(message);
    let mut out = String::with_capacity(one.len());
    let mut chars = one.chars();
    // `unknown variant `X`, expected …`: the first backquoted word is the value.
    let mut redact_backquote = one.starts_with("unknown variant `");
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push_str("\"(value not shown)\"");
                let mut escaped = false;
                for c in chars.by_ref() {
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => escaped = false,
                    }
                }
            }
            '`' => {
                // Backquoted text is an expected token or a field name (quotes in it are
                // literal), except the value of an unknown variant.
                let mut quoted = String::new();
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                    quoted.push(c);
                }
                if std::mem::take(&mut redact_backquote) {
                    quoted = "(value not shown)".into();
                }
                out.push('`');
                out.push_str(&quoted);
                out.push('`');
            }
            c => out.push(c),
        }
    }
    out
}

/// Where the value of `field` (`route[2].upstream`, `server.max_headers`) starts in `text`,
/// found by walking the spanned document.
fn field_location(text: &str, field: &str) -> Option<Location> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = doc.get_ref();
    let mut span = None;
    let mut segments = field.split('.').peekable();
    while let Some(seg) = segments.next() {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.strip_suffix(']')?.parse::<usize>().ok()),
            None => (seg, None),
        };
        let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        let mut value = value;
        if let Some(i) = index {
            let DeValue::Array(items) = value.get_ref() else {
                return None;
            };
            value = items.get(i)?;
        }
        span = Some(value.span());
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ if segments.peek().is_some() => return None,
            _ => {}
        }
    }
    span.map(|s| Location::of(text, s.start))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

struct Check<'a> {
    origin: &'a str,
}

impl Check<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            at: Location::default(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn addr(
        &self,
        field: &str,
        v: Option<String>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let s = v.unwrap_or_else(|| default.to_owned());
        s.parse().map_err(|_| {
            self.err(
                field,
                "must be an IP address and port, like \"127.0.0.1:8443\"",
            )
        })
    }

    fn limit(
        &self,
        field: &str,
        v: Option<RawLimit>,
        default: (f64, u32),
    ) -> Result<LimitSpec, ConfigError> {
        let (per_second, burst) = v.map(|l| (l.per_second, l.burst)).unwrap_or(default);
        LimitSpec::new(per_second, burst).ok_or_else(|| self.err(field, LimitSpec::BOUNDS))
    }

    fn duration(
        &self,
        field: &str,
        v: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = v else { return Ok(default) };
        let d = humantime::parse_duration(s.trim()).map_err(|_| {
            self.err(
                field,
                "must be a duration like \"30s\", \"500ms\" or \"2m\"",
            )
        })?;
        if d.is_zero() {
            return Err(self.err(field, "must be longer than zero"));
        }
        Ok(d)
    }
}

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let c = Check { origin };
    let listen = Listen {
        proxy: c.addr("listen.proxy", raw.listen.proxy, "127.0.0.1:8443")?,
        admin: c.addr("listen.admin", raw.listen.admin, "127.0.0.1:8444")?,
    };
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        return Err(c.err("listen.admin", "must differ from listen.proxy"));
    }
    let tls = match (raw.tls.cert, raw.tls.key) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        (None, None) => TlsSource::Generated {
            dir: raw.tls.dev_dir.unwrap_or_else(|| PathBuf::from("certs")),
        },
        (Some(_), None) => return Err(c.err("tls.key", "must be set when tls.cert is")),
        (None, Some(_)) => return Err(c.err("tls.cert", "must be set when tls.key is")),
    };
    let store = StoreConfig {
        path: raw
            .store
            .path
            .unwrap_or_else(|| PathBuf::from("data/keygate.db")),
        master_key_file: raw
            .store
            .master_key_file
            .unwrap_or_else(|| PathBuf::from("data/master.key")),
        url: match raw.store.url {
            None => None,
            Some(u) if StoreUrl::is_postgres(&u) => Some(StoreUrl(u)),
            Some(_) => {
                return Err(c.err(
                    "store.url",
                    "must be a postgres:// or postgresql:// URL (the value is not shown: it may hold a password)",
                ))
            }
        },
        ca_file: raw.store.ca_file,
        pool_size: match raw.store.pool_size {
            None => 8,
            Some(n) if (1..=1000).contains(&n) => n,
            Some(_) => return Err(c.err("store.pool_size", "must be between 1 and 1000")),
        },
        timeout: c.duration("store.timeout", raw.store.timeout, Duration::from_secs(3))?,
    };
    let upstream = UpstreamConfig {
        ca_file: raw.upstream.ca_file,
        connect_timeout: c.duration(
            "upstream.connect_timeout",
            raw.upstream.connect_timeout,
            Duration::from_secs(5),
        )?,
        response_header_timeout: c.duration(
            "upstream.response_header_timeout",
            raw.upstream.response_header_timeout,
            Duration::from_secs(30),
        )?,
        pool_idle_timeout: c.duration(
            "upstream.pool_idle_timeout",
            raw.upstream.pool_idle_timeout,
            Duration::from_secs(60),
        )?,
        http2: raw.upstream.http2.unwrap_or(true),
        body_idle_timeout: c.duration(
            "upstream.body_idle_timeout",
            raw.upstream.body_idle_timeout,
            Duration::from_secs(300),
        )?,
    };
    let keys = KeysConfig {
        cache_ttl: c.duration(
            "keys.cache_ttl",
            raw.keys.cache_ttl,
            Duration::from_secs(300),
        )?,
        negative_cache_ttl: c.duration(
            "keys.negative_cache_ttl",
            raw.keys.negative_cache_ttl,
            Duration::from_secs(5),
        )?,
        cache_capacity: match raw.keys.cache_capacity {
            Some(0) => return Err(c.err("keys.cache_capacity", "must be at least 1")),
            Some(n) => n,
            None => 1_000_000,
        },
        poll_interval: c.duration(
            "keys.poll_interval",
            raw.keys.poll_interval,
            Duration::from_millis(250),
        )?,
        staleness_bound: c.duration(
            "keys.staleness_bound",
            raw.keys.staleness_bound,
            Duration::from_secs(10),
        )?,
        on_cleartext: match raw.keys.on_cleartext.as_deref() {
            None | Some("flag") => OnCleartext::Flag,
            Some("revoke") => OnCleartext::Revoke,
            Some(_) => return Err(c.err("keys.on_cleartext", "must be \"flag\" or \"revoke\"")),
        },
        usage_flush_interval: c.duration(
            "keys.usage_flush_interval",
            raw.keys.usage_flush_interval,
            Duration::from_secs(10),
        )?,
        track_usage: raw.keys.track_usage.unwrap_or(true),
    };
    if keys.usage_flush_interval < Duration::from_millis(100) {
        return Err(c.err("keys.usage_flush_interval", "must be at least 100ms"));
    }
    if keys.negative_cache_ttl > keys.cache_ttl {
        return Err(c.err(
            "keys.negative_cache_ttl",
            "must not be longer than keys.cache_ttl",
        ));
    }
    if keys.staleness_bound <= keys.poll_interval {
        return Err(c.err(
            "keys.staleness_bound",
            "must be longer than keys.poll_interval",
        ));
    }
    let server = ServerConfig {
        header_read_timeout: c.duration(
            "server.header_read_timeout",
            raw.server.header_read_timeout,
            Duration::from_secs(10),
        )?,
        max_headers: match raw.server.max_headers {
            Some(n) if !(1..=1000).contains(&n) => {
                return Err(c.err("server.max_headers", "must be between 1 and 1000"))
            }
            Some(n) => n,
            None => 100,
        },
        max_connections: match raw.server.max_connections {
            Some(0) => return Err(c.err("server.max_connections", "must be at least 1")),
            Some(n) => n,
            None => 10_000,
        },
        drain_timeout: c.duration(
            "server.drain_timeout",
            raw.server.drain_timeout,
            Duration::from_secs(30),
        )?,
        worker_threads: match raw.server.worker_threads {
            Some(n) if !(1..=256).contains(&n) => {
                return Err(c.err("server.worker_threads", "must be between 1 and 256"))
            }
            n => n,
        },
        allow_encoded_slashes: raw.server.allow_encoded_slashes,
        max_uri_length: match raw.server.max_uri_length {
            Some(n) if !(256..=65_535).contains(&n) => {
                return Err(c.err("server.max_uri_length", "must be between 256 and 65535"))
            }
            Some(n) => n,
            None => 8192,
        },
        max_body_size: match raw.server.max_body_size {
            Some(0) => {
                return Err(c.err(
                    "server.max_body_size",
                    "must be at least 1 (omit it for no cap)",
                ))
            }
            n => n,
        },
        body_idle_timeout: c.duration(
            "server.body_idle_timeout",
            raw.server.body_idle_timeout,
            Duration::from_secs(60),
        )?,
        idle_timeout: c.duration(
            "server.idle_timeout",
            raw.server.idle_timeout,
            Duration::from_secs(75),
        )?,
    };
    let limits = LimitsConfig {
        default: c.limit("limits.default", raw.limits.default, (10.0, 20))?,
        auth_failures: c.limit("limits.auth_failures", raw.limits.auth_failures, (10.0, 20))?,
        admin: c.limit("limits.admin", raw.limits.admin, (20.0, 40))?,
        backend: limits_backend(&c, &raw.limits)?,
    };
    let mut routes = Vec::with_capacity(raw.route.len());
    for (i, r) in raw.route.into_iter().enumerate() {
        routes.push(validate_route(&c, i, r)?);
    }
    for (i, r) in routes.iter().enumerate() {
        if routes[..i]
            .iter()
            .any(|o| o.prefix == r.prefix && o.host == r.host)
        {
            return Err(c.err(
                format!("route[{i}].prefix"),
                format!(
                    "duplicates an earlier route's prefix {:?} (for the same host)",
                    r.prefix
                ),
            ));
        }
        if routes[..i].iter().any(|o| o.name == r.name) {
            return Err(c.err(
                format!("route[{i}].name"),
                format!("duplicates an earlier route's name {:?}", r.name),
            ));
        }
    }
    Ok(Config {
        listen,
        tls,
        store,
        upstream,
        keys,
        server,
        limits,
        routes,
        source: None,
    })
}

/// `limits.backend` and the Redis settings that go with it.
fn limits_backend(c: &Check<'_>, raw: &RawLimits) -> Result<LimitsBackend, ConfigError> {
    let url = raw.redis_url.clone();
    let from_env = raw.redis_url_env.clone();
    let prefix = raw.redis_prefix.clone();
    match raw.backend.as_deref() {
        None | Some("local") => {
            if url.is_some() || prefix.is_some() {
                let field = if url.is_some() {
                    "limits.redis_url"
                } else {
                    "limits.redis_prefix"
                };
                return Err(c.err(field, "only applies to limits.backend = \"redis\""));
            }
            Ok(LimitsBackend::Local)
        }
        Some("redis") => {
            let (field, url) = match (url, from_env) {
                (Some(u), _) => ("limits.redis_url", u),
                (None, Some(u)) => ("KEYGATE_REDIS_URL (environment)", u),
                (None, None) => {
                    return Err(c.err(
                        "limits.backend",
                        "\"redis\" needs limits.redis_url or the KEYGATE_REDIS_URL environment variable",
                    ))
                }
            };
            let url = RedisUrl::parse(url).map_err(|why| c.err(field, why))?;
            let prefix = prefix.unwrap_or_else(|| "keygate:".to_owned());
            if prefix.is_empty()
                || prefix.len() > 64
                || prefix.chars().any(|ch| ch.is_control() || ch == ' ')
            {
                return Err(c.err(
                    "limits.redis_prefix",
                    "must be 1 to 64 characters, no spaces or control characters",
                ));
            }
            Ok(LimitsBackend::Redis(RedisLimits { url, prefix }))
        }
        Some(_) => Err(c.err("limits.backend", "must be \"local\" or \"redis\"")),
    }
}

fn validate_inject(
    c: &Check<'_>,
    i: usize,
    v: toml::Value,
    validate: Option<RawValidate>,
) -> Result<Inject, ConfigError> {
    let field = format!("route[{i}].inject");
    let shape =
        "must be { ai_secret = \"NAME\" } (optionally with header and prefix) or \"passthrough\"";
    match v {
        toml::Value::String(s) if s == "passthrough" => {
            let raw = validate.unwrap_or(RawValidate {
                path: None,
                ttl: None,
                negative_ttl: None,
            });
            let vf = format!("route[{i}].validate");
            let path = raw.path.unwrap_or_else(|| "/v1/api_key?limit=1".to_owned());
            if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                return Err(c.err(
                    format!("{vf}.path"),
                    "must be a path like \"/v1/api_key?limit=1\"",
                ));
            }
            let ttl = c.duration(&format!("{vf}.ttl"), raw.ttl, Duration::from_secs(300))?;
            let negative_ttl = c.duration(
                &format!("{vf}.negative_ttl"),
                raw.negative_ttl,
                Duration::from_secs(30),
            )?;
            Ok(Inject::Passthrough(Validate {
                path,
                ttl,
                negative_ttl,
            }))
        }
        toml::Value::Table(mut t) => {
            if validate.is_some() {
                return Err(c.err(
                    format!("route[{i}].validate"),
                    "only applies to inject = \"passthrough\"",
                ));
            }
            let name = match t.remove("ai_secret") {
                Some(toml::Value::String(n)) if !n.trim().is_empty() => n.trim().to_owned(),
                Some(_) => {
                    return Err(c.err(
                        format!("{field}.ai_secret"),
                        "must be the name of an ai_secret",
                    ))
                }
                None => return Err(c.err(&field, shape)),
            };
            let header = match t.remove("header") {
                None => None,
                Some(toml::Value::String(h)) => Some(
                    crate::proxy::headers::credential_name(&h)
                        .map_err(|why| c.err(format!("{field}.header"), why))?,
                ),
                Some(_) => return Err(c.err(format!("{field}.header"), "must be a header name")),
            };
            let prefix = match t.remove("prefix") {
                None => None,
                Some(toml::Value::String(p)) => Some(p),
                Some(_) => {
                    return Err(c.err(
                        format!("{field}.prefix"),
                        "must be a string, like \"Bearer \"",
                    ))
                }
            };
            if let Some(k) = t.keys().next() {
                return Err(c.err(
                    format!("{field}.{k}"),
                    "unknown field; expected ai_secret, header or prefix",
                ));
            }
            Ok(Inject::AiSecret {
                name,
                header,
                prefix,
            })
        }
        _ => Err(c.err(&field, shape)),
    }
}

fn validate_route(c: &Check<'_>, i: usize, r: RawRoute) -> Result<Route, ConfigError> {
    if !r.prefix.starts_with('/') {
        return Err(c.err(format!("route[{i}].prefix"), "must start with /"));
    }
    if r.prefix
        .chars()
        .any(|ch| ch.is_ascii_control() || ch == '?' || ch == '#')
    {
        return Err(c.err(
            format!("route[{i}].prefix"),
            "must be a plain path (no control characters, ? or #)",
        ));
    }
    // Requests are matched on their normalised path, so a prefix that is not normalised
    // could never match.
    if !matches!(crate::proxy::path::normalize(&r.prefix, true), Ok(None)) {
        return Err(c.err(
            format!("route[{i}].prefix"),
            "must be a normalised path (no . or .. segments, no //, no percent-encoded unreserved characters)",
        ));
    }
    let field = format!("route[{i}].upstream");
    let uri: http::Uri = r
        .upstream
        .parse()
        .map_err(|_| c.err(&field, "must be a URL like https://host:port"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(_) => {
            return Err(c.err(
                &field,
                "must be https:// (keygate never sends credentials in cleartext)",
            ))
        }
        None => return Err(c.err(&field, "must be an absolute https:// URL")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| c.err(&field, "must name a host"))?;
    if authority.as_str().contains('@') {
        return Err(c.err(
            &field,
            "must not carry user info; credentials are injected by route",
        ));
    }
    if uri.query().is_some() {
        return Err(c.err(&field, "must not have a query string"));
    }
    let host = match r.host {
        None => None,
        Some(h) => {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() || h.parse::<Authority>().is_err() || h.contains(['/', '@']) {
                return Err(c.err(
                    format!("route[{i}].host"),
                    "must be a host name, like \"api.local\" or \"api.local:8443\"",
                ));
            }
            Some(h)
        }
    };
    let name = match r.name {
        Some(n) if n.trim().is_empty() => {
            return Err(c.err(format!("route[{i}].name"), "must not be empty"))
        }
        Some(n) => n.into(),
        None => r.prefix.as_str().into(),
    };
    let inject = validate_inject(c, i, r.inject, r.validate)?;
    let limit = r
        .limit
        .map(|l| c.limit(&format!("route[{i}].limit"), Some(l), (0.0, 0)))
        .transpose()?;
    let mut set_headers = Vec::with_capacity(r.set_headers.len());
    for (k, v) in r.set_headers {
        let f = format!("route[{i}].set_headers.{k}");
        let h = crate::proxy::headers::added_name(&k).map_err(|why| c.err(&f, why))?;
        let t = Template::parse(&v).map_err(|reason| c.err(&f, reason))?;
        set_headers.push((h, t));
    }
    Ok(Route {
        name,
        prefix: r.prefix,
        host,
        strip_prefix: r.strip_prefix,
        upstream: Upstream {
            scheme: Scheme::HTTPS,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        },
        inject,
        set_headers,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::parse(EMBEDDED_DEFAULTS, "built-in").unwrap();
        assert_eq!(c.listen.proxy.to_string(), "127.0.0.1:8443");
        assert_eq!(c.listen.admin.to_string(), "127.0.0.1:8444");
        assert!(matches!(c.tls, TlsSource::Generated { .. }));
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn empty_file_means_all_defaults() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.store.path, PathBuf::from("data/keygate.db"));
        assert_eq!(c.upstream.response_header_timeout, Duration::from_secs(30));
        assert!(c.routes.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(
            "[[route]]\nprefix = \"/\"\nupstream = \"http://x\"\ninject = { ai_secret = \"A\" }\n",
        );
        assert!(
            e.contains("`route[0].upstream`") && e.contains("https://"),
            "{e}"
        );
        let e = err("[listen]\nproxy = \"nope\"\n");
        assert!(e.contains("`listen.proxy`"), "{e}");
        let e = err("[upstream]\nresponse_header_timeout = \"soon\"\n");
        assert!(e.contains("`upstream.response_header_timeout`"), "{e}");
        let e = err("[listen]\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("[store]\npath = 5\n");
        assert!(e.contains("`store.path`"), "{e}");
        let e = err("[[route]]\nprefix = \"api\"\nupstream = \"https://x\"\ninject = { ai_secret = \"A\" }\n");
        assert!(e.contains("`route[0].prefix`"), "{e}");
        let e = err("[tls]\ncert = \"a.pem\"\n");
        assert!(e.contains("`tls.key`"), "{e}");
        let e = err("this is not toml");
        assert!(e.contains("t.toml"), "{e}");
    }

    #[test]
    fn errors_give_line_and_column_and_never_the_text() {
        const S: &str = "sk-SENTINEL1234567890";
        let route =
            "[[route]]\nprefix = \"/\"\nupstream = \"https://x\"\ninject = { ai_secret = \"A\" }\n";
        let cases = [
            // Syntax errors on the line holding a literal credential.
            format!("{route}set_headers = {{ \"x-static\" = \"Bearer {S} }}\n"),
            format!("{route}set_headers = {{ \"x-static\" = \"Bearer {S}\" }} junk\n"),
            format!("{route}set_headers = {{ \"x-static\" = Bearer {S} }}\n"),
            format!("[server]\nmax_headers = {S}\n"),
            // Type and value errors, where serde quotes the value.
            format!("{route}strip_prefix = \"{S}\"\n"),
            format!("[keys]\non_cleartext = \"{S}\"\n"),
            format!("[listen]\nproxy = \"{S}\"\n"),
            format!("[store]\npath = [\"{S}\"]\n"),
            format!("{route}set_headers = {{ \"x-static\" = \"Bearer {S}\\r\\n\" }}\n"),
            format!("{route}set_headers = {{ \"x-static\" = \"{{env:{S}\" }}\n"),
            format!("[[route]]\nprefix = \"/{S}/..\"\nupstream = \"https://x\"\ninject = {{ ai_secret = \"A\" }}\n"),
        ];
        for text in &cases {
            let e = err(text);
            assert!(!e.contains("SENTINEL"), "config text echoed: {e}");
            assert!(
                e.starts_with("t.toml:")
                    && e[7..].split(':').next().unwrap().parse::<u32>().is_ok(),
                "no line number: {e}"
            );
        }
        let e = err(&format!("{route}strip_prefix = \"{S}\"\n"));
        assert!(e.starts_with("t.toml:5:16: `route[0].strip_prefix`"), "{e}");
        let e = err("[server]\nmax_headers = 0\n");
        assert!(e.starts_with("t.toml:2:15: `server.max_headers`"), "{e}");
    }

    #[test]
    fn upstream_is_split_for_uri_building() {
        let c = Config::parse(
            "[[route]]\nprefix = \"/v1\"\nupstream = \"https://api.example.com:8443/base/\"\ninject = { ai_secret = \"K\" }\n",
            "t",
        )
        .unwrap();
        let u = &c.routes[0].upstream;
        assert_eq!(u.authority.as_str(), "api.example.com:8443");
        assert_eq!(u.base_path, "/base");
        assert_eq!(
            c.routes[0].inject,
            Inject::AiSecret {
                name: "K".into(),
                header: None,
                prefix: None
            }
        );
    }
}
