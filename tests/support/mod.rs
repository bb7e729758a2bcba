//! Test support: a CA made per run, a fake TLS upstream that records what it received, keygate
//! started in-process on listeners bound to 127.0.0.1:0 or as a child process, and a client
//! that trusts the per-run CA. No fixed ports, no skipped verification, no sleeping until ready.
#![allow(dead_code)]

pub mod h2raw;
pub mod harness;
pub mod postgres;
pub mod redis;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use keygate::app::{self, Running};
use keygate::config::Config;
use keygate::secret::Secret;
use keygate::store::{issue_key, AiSecretWrite, KeyOptions, Role, Store, WriteMode};
use keygate::tls::Ca;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

/// Installs Debian packages with apt-get (as `.ci/run` does), for tests that need a server or a
/// browser on a fresh machine of this project's image (root, Debian's registry reachable).
/// Whether it worked.
pub fn apt_install(packages: &[&str]) -> bool {
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    apt(&["update", "-qq"]) && apt(&install)
}

/// The request body type the test client sends.
pub type TestBody = BoxBody<Bytes, std::io::Error>;

/// An empty request body.
pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A full request body.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The one key the fake upstream's `/v1/api_key` accepts (passthrough validation).
pub const PASSTHROUGH_GOOD_KEY: &str = "pt-good-key-4242";

/// The upstream secret every test route injects unless told otherwise.
pub const UPSTREAM_SECRET: &str = "upstream-secret-Zq9Xw4Lm";

/// A CA made for this test, with its certificate written to a file.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("keygate test CA").expect("generate CA");
        let ca_file = dir.path().join("test-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
        TestCa { dir, ca, ca_file }
    }

    /// Issues a server certificate for 127.0.0.1/localhost into files; returns (cert, key).
    pub fn issue(&self, label: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self
            .ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("issue");
        let c = self.dir.path().join(format!("{label}.pem"));
        let k = self.dir.path().join(format!("{label}-key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    /// A client that trusts this CA only.
    pub fn client(&self, h2: bool) -> Client<HttpsConnector<HttpConnector>, TestBody> {
        client_trusting(&self.ca_file, h2)
    }
}

/// A client that trusts `ca_file` only; HTTP/2 (by ALPN, h2 only) or HTTP/1.1.
pub fn client_trusting(
    ca_file: &Path,
    h2: bool,
) -> Client<HttpsConnector<HttpConnector>, TestBody> {
    client_from(ca_file, h2, None)
}

/// Like [`client_trusting`], connecting from `local` (another loopback address, to be another
/// client IP).
pub fn client_from(
    ca_file: &Path,
    h2: bool,
    local: Option<std::net::IpAddr>,
) -> Client<HttpsConnector<HttpConnector>, TestBody> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).expect("read CA");
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).expect("add CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(keygate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_local_address(local);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let https = if h2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(h2);
    builder.build(https)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM")
}

/// What the fake upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request's trailer fields (empty when it had none or its body was not read whole).
    pub trailers: HeaderMap,
}

/// A TLS upstream on 127.0.0.1:0 that records every request.
///
/// Paths: `/sse?n=N&gap_ms=G` streams N events G ms apart (send instants recorded);
/// `/slow` waits 5 s before answering; `/sink` counts the body without keeping it;
/// `/trailers` records the request and answers with a streamed body and the trailers
/// `x-echo-t` (the `authorization` value it received: a careless upstream) and `x-ok: 1`;
/// anything else records the request with its body and answers 201 with a JSON body and an
/// `x-upstream` header.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub sse_sent: Arc<Mutex<Vec<Instant>>>,
    pub connections: Arc<AtomicUsize>,
    pub sink_bytes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Offers h2 and http/1.1 by ALPN.
    pub async fn start(ca: &TestCa) -> Self {
        Self::start_with(ca, true).await
    }

    pub async fn start_with(ca: &TestCa, offer_h2: bool) -> Self {
        Self::start_inner(ca, offer_h2, false).await
    }

    /// Like [`FakeUpstream::start`], with room for large request heads (1 MiB of h2 header
    /// list, 1,000 h1 headers): a request that keygate forwards is recorded, not refused by the
    /// upstream's own limits.
    pub async fn start_roomy(ca: &TestCa) -> Self {
        Self::start_inner(ca, true, true).await
    }

    async fn start_inner(ca: &TestCa, offer_h2: bool, roomy: bool) -> Self {
        let (cert, key) = ca.issue(&format!("upstream-{}", uuid_like()));
        let cfg = keygate::tls::server_config(&cert, &key).expect("upstream TLS");
        let mut cfg = Arc::try_unwrap(cfg).unwrap_or_else(|a| (*a).clone());
        if !offer_h2 {
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sse_sent = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let sink_bytes = Arc::new(AtomicUsize::new(0));
        let (r, s, c, k) = (
            requests.clone(),
            sse_sent.clone(),
            connections.clone(),
            sink_bytes.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                c.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (r, s, k) = (r.clone(), s.clone(), k.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (r, s, k) = (r.clone(), s.clone(), k.clone());
                        async move { Ok::<_, Infallible>(upstream_answer(req, r, s, k).await) }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if roomy {
                        builder.http1().max_headers(1000);
                        builder.http2().max_header_list_size(1 << 20);
                    }
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        FakeUpstream {
            addr,
            requests,
            sse_sent,
            connections,
            sink_bytes,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Whether a request for `path` has been recorded (as the handler began, for `/slow` and
    /// `/sse`).
    pub fn has(&self, path: &str) -> bool {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.uri.path() == path)
    }
}

fn uuid_like() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

type UpBody = BoxBody<Bytes, Infallible>;

async fn upstream_answer(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    sse_sent: Arc<Mutex<Vec<Instant>>>,
    sink: Arc<AtomicUsize>,
) -> Response<UpBody> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let (parts, body) = req.into_parts();
    let mut rec = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: Bytes::new(),
        trailers: HeaderMap::new(),
    };
    match path.as_str() {
        "/sink" => {
            let mut body = body;
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len();
                            sink.fetch_add(d.len(), Ordering::SeqCst);
                        }
                    }
                    Err(_) => break,
                }
            }
            requests.lock().unwrap().push(rec);
            Response::new(Full::new(Bytes::from(format!("{{\"bytes\":{n}}}"))).boxed())
        }
        "/sse" => {
            requests.lock().unwrap().push(rec);
            let param = |name: &str, default: u64| -> u64 {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(default)
            };
            let (n, gap) = (param("n", 5), param("gap_ms", 200));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(gap)).await;
                    }
                    sse_sent.lock().unwrap().push(Instant::now());
                    let ev = format!("id: {i}\ndata: event {i}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "/slow" => {
            requests.lock().unwrap().push(rec);
            let ms = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(Full::new(Bytes::from_static(b"late")).boxed())
        }
        // A passthrough validation endpoint that accepts exactly one key.
        "/v1/api_key" => {
            let ok = rec
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {PASSTHROUGH_GOOD_KEY}"));
            requests.lock().unwrap().push(rec);
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"{\"objects\":[]}")).boxed())
                .unwrap()
        }
        "/validate-500" => {
            requests.lock().unwrap().push(rec);
            Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        }
        // Echoes the credential headers it got back in response headers (a careless upstream).
        "/echo" => {
            let mut b = Response::builder().header("x-safe", "1");
            for h in ["authorization", "x-api-key", "x-goog-api-key", "api-key"] {
                if let Some(v) = rec.headers.get(h) {
                    b = b.header(format!("x-echo-{h}"), v.clone());
                    b = b.header("x-debug", format!("saw {h}={}", v.to_str().unwrap_or("")));
                }
            }
            requests.lock().unwrap().push(rec);
            b.body(Full::new(Bytes::new()).boxed()).unwrap()
        }
        "/trailers" => {
            if let Ok(c) = body.collect().await {
                rec.trailers = c.trailers().cloned().unwrap_or_default();
                rec.body = c.to_bytes();
            }
            let echo = rec.headers.get("authorization").cloned();
            requests.lock().unwrap().push(rec);
            let mut trailers = HeaderMap::new();
            if let Some(v) = echo {
                trailers.insert("x-echo-t", v);
            }
            trailers.insert("x-ok", http::HeaderValue::from_static("1"));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"part one;"))),
                Ok(Frame::data(Bytes::from_static(b"part two"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .header("content-type", "text/plain")
                .header("trailer", "x-echo-t, x-ok")
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                .unwrap()
        }
        _ => {
            if let Ok(c) = body.collect().await {
                rec.trailers = c.trailers().cloned().unwrap_or_default();
                rec.body = c.to_bytes();
            }
            requests.lock().unwrap().push(rec);
            Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .header("x-upstream", "fake")
                .body(Full::new(Bytes::from_static(b"{\"from\":\"upstream\"}")).boxed())
                .unwrap()
        }
    }
}

/// Config text for a test keygate: listeners on 127.0.0.1:0, certificates from the test CA,
/// store in `dir`, upstream CA = the test CA, one route per `(prefix, upstream, secret)`.
pub fn config_text(ca: &TestCa, dir: &Path, routes: &[(&str, &str, &str)], extra: &str) -> String {
    let (cert, key) = ca.issue("keygate");
    let mut t = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [store]\npath = {db:?}\nmaster_key_file = {mk:?}\n\
         [upstream]\nca_file = {ca_file:?}\n{extra}\n",
        db = dir.join("keygate.db"),
        mk = dir.join("master.key"),
        ca_file = ca.ca_file,
    );
    for (prefix, upstream, secret) in routes {
        t.push_str(&format!(
            "[[route]]\nprefix = {prefix:?}\nupstream = {upstream:?}\ninject = {{ ai_secret = {secret:?} }}\n"
        ));
    }
    t
}

/// keygate running in this process.
pub struct Keygate {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// A proxy-role key.
    pub key: String,
    pub key_id: String,
}

impl Keygate {
    /// Starts keygate with `routes`, stores [`UPSTREAM_SECRET`] under every secret name the
    /// routes use, and creates a proxy key. `extra` is TOML put in the `[upstream]` table and
    /// after it (start it with a table header to leave that table).
    pub async fn start(ca: &TestCa, routes: &[(&str, &str, &str)], extra: &str) -> Self {
        let secrets: Vec<(&str, &str)> = routes.iter().map(|r| (r.2, UPSTREAM_SECRET)).collect();
        let text = |dir: &Path| config_text(ca, dir, routes, extra);
        Self::start_text(text, &secrets).await
    }

    /// Starts keygate with the config `extra` then `routes_toml` (raw `[[route]]` tables),
    /// `secrets` stored before it starts (so every route has its credential from the first
    /// request), and a proxy key.
    pub async fn start_toml(
        ca: &TestCa,
        extra: &str,
        routes_toml: &str,
        secrets: &[(&str, &str)],
    ) -> Self {
        let text = |dir: &Path| format!("{}{routes_toml}", config_text(ca, dir, &[], extra));
        Self::start_text(text, secrets).await
    }

    async fn start_text(text: impl FnOnce(&Path) -> String, secrets: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = text(dir.path());
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, &text).unwrap();
        let mut config = Config::parse(&text, &config_path.display().to_string())
            .unwrap_or_else(|e| panic!("keygate refused the test config: {e}"));
        // What a reload reads again.
        config.source = Some(config_path.clone());
        let (key, key_id) = {
            let (master, store) = app::open_store(&config, None).unwrap();
            for (name, value) in secrets {
                put_secret(store.as_ref(), name, value);
            }
            let t = store.tenant().unwrap();
            let owner = (t.org_id.as_str(), t.user_id.as_str());
            let (k, rec) = issue_key(
                store.as_ref(),
                &master,
                owner,
                "test",
                KeyOptions::role(Role::Proxy),
                &keygate::audit::Actor::Keygate,
            )
            .unwrap();
            (k.expose().to_owned(), rec.id)
        };
        let running = app::start(config, None).await.expect("keygate starts");
        Keygate {
            proxy: running.proxy_addr,
            admin: running.admin_addr,
            running: Some(running),
            dir,
            config_path,
            key,
            key_id,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.proxy.port(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.admin.port(), path)
    }

    /// The running keygate's shared state (key cache, metrics), to wait on.
    pub fn state(&self) -> &keygate::app::AppState {
        &self.running.as_ref().expect("keygate running").state
    }

    /// Open connections on the proxy listener (the `keygate_connections` gauge).
    pub fn proxy_connections(&self) -> i64 {
        self.state().plane.metrics.connections[0].get()
    }

    /// The store, opened as the CLI would (a second connection).
    pub fn store(&self) -> (Arc<keygate::crypto::MasterKey>, Arc<dyn Store>) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let config = Config::parse(&text, "test").unwrap();
        app::open_store(&config, None).unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A GET with the given headers.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// Sends a request and collects the answer: (status, headers, body).
pub async fn send(
    client: &Client<HttpsConnector<HttpConnector>, TestBody>,
    req: Request<TestBody>,
) -> (StatusCode, HeaderMap, Bytes) {
    let res = client.request(req).await.expect("request");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

/// The keygate binary run as a child process, with stderr captured line by line.
pub struct KeygateProcess {
    pub child: tokio::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub stdout_lines: Vec<String>,
    pub stderr: Arc<Mutex<String>>,
    /// Copies stderr into `stderr` until the process closes it.
    stderr_reader: tokio::task::JoinHandle<()>,
}

/// The `keygate` command, run in `cwd`, with its environment limited to what is given.
pub fn keygate_cmd(cwd: &Path, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.current_dir(cwd).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        c.env("PATH", path);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.kill_on_drop(true);
    c
}

/// Runs a keygate CLI command in `dir`, feeding `stdin`; returns (exit code, stdout, stderr).
pub async fn cli(
    dir: &std::path::Path,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut cmd = keygate_cmd(dir, env);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin)
        .await
        .unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl KeygateProcess {
    /// Runs `keygate serve` with `args` in `cwd` and waits until both listeners are announced.
    pub async fn serve(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = keygate_cmd(cwd, env);
        cmd.args(args).arg("serve");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn keygate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut proxy, mut admin, mut banner_done) = (None, None, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.is_none() || admin.is_none() || !banner_done {
            let line = tokio::time::timeout_at(deadline.into(), err_lines.next_line())
                .await
                .expect("keygate announced its listeners in time")
                .expect("read stderr")
                .unwrap_or_else(|| panic!("keygate exited early: {}", stderr.lock().unwrap()));
            stderr.lock().unwrap().push_str(&line);
            stderr.lock().unwrap().push('\n');
            if let Some(a) = line.strip_prefix("keygate: proxy listening on https://") {
                proxy = Some(a.trim().parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("keygate: admin listening on https://") {
                admin = Some(a.trim().parse().unwrap());
                banner_done = !line.is_empty();
            }
        }
        // The first admin key, when one was created, is the only thing on stdout.
        let mut stdout_lines = Vec::new();
        if let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_millis(300), out_lines.next_line()).await
        {
            stdout_lines.push(l);
        }
        let sink = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(l)) = err_lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        KeygateProcess {
            child,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
            stdout_lines,
            stderr,
            stderr_reader,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.proxy.port(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.admin.port(), path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Resident memory of the process now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// SIGTERM, then wait for the exit; returns its code.
    pub async fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.pid();
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("keygate exits after SIGTERM")
            .expect("wait");
        // The whole log: the reader has copied everything up to the end of the stream.
        tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_reader)
            .await
            .expect("keygate's stderr ends after its exit")
            .expect("stderr reader");
        let log = self.stderr.lock().unwrap().clone();
        (status.code(), log)
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Stores an ai_secret of type openai in the default org (the CLI's `secrets put`).
pub fn put_secret(store: &dyn Store, name: &str, value: &str) {
    put_typed(store, name, "openai", value, None);
}

/// Stores (replaces) an ai_secret with a type and metadata in the default org.
pub fn put_typed(
    store: &dyn Store,
    name: &str,
    ty: &str,
    value: &str,
    metadata: Option<serde_json::Value>,
) {
    let org = store.tenant().unwrap().org_id;
    let w = AiSecretWrite {
        name: name.into(),
        secret_type: Some(ty.into()),
        metadata: metadata.and_then(|m| m.as_object().cloned()),
        secret: Some(Secret::new(value.into())),
    };
    store
        .write_ai_secret(&org, w, WriteMode::Replace, &keygate::audit::Actor::Keygate)
        .unwrap();
}

/// Creates a key in the default org; returns (key, id).
pub fn make_key(kg: &Keygate, role: Role) -> (String, String) {
    let (master, store) = kg.store();
    let t = store.tenant().unwrap();
    let owner = (t.org_id.as_str(), t.user_id.as_str());
    let (k, rec) = issue_key(
        store.as_ref(),
        &master,
        owner,
        "made",
        KeyOptions::role(role),
        &keygate::audit::Actor::Keygate,
    )
    .unwrap();
    (k.expose().to_owned(), rec.id)
}

/// An admin API call with an optional JSON body; returns (status, headers, parsed JSON body).
pub async fn admin_call(
    client: &Client<HttpsConnector<HttpConnector>, TestBody>,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<serde_json::Value>,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(v) => full(v.to_string()),
        None => empty(),
    };
    let (status, headers, bytes) = send(client, b.body(body).unwrap()).await;
    let v = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"))
    };
    (status, headers, v)
}

/// A plain-HTTP `GET /leak` carrying `key` in `x-api-key`, sent to a TLS port at `addr`; the
/// whole answer, read until keygate closes the connection (at most 5 s).
pub async fn cleartext_get(addr: SocketAddr, key: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /leak HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    answer
}
