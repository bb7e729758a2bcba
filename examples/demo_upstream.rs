//! A small local upstream to try keygate offline: HTTPS on 127.0.0.1:9443 with a certificate
//! issued from keygate's development CA (certs/ca.pem + certs/ca-key.pem, created by the first
//! `keygate serve`).
//!
//! Every path answers with JSON describing what arrived, with credential headers shown only as
//! previews; `/sse` streams five server-sent events half a second apart.
//!
//! ```text
//! cargo run --release --example demo-upstream [-- --listen 127.0.0.1:9443 --certs certs]
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type DemoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:9443".to_string();
    let mut certs = std::path::PathBuf::from("certs");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--certs" => certs = args.next().ok_or("--certs needs a directory")?.into(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let ca_cert = std::fs::read_to_string(certs.join("ca.pem")).map_err(|e| {
        format!(
            "{}/ca.pem: {e} (run `keygate serve` once to create it)",
            certs.display()
        )
    })?;
    let ca_key = std::fs::read_to_string(certs.join("ca-key.pem"))
        .map_err(|e| format!("{}/ca-key.pem: {e}", certs.display()))?;
    let ca = keygate::tls::Ca::from_pem(&ca_cert, &ca_key)?;
    let (cert_pem, key_pem) = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let dir = std::env::temp_dir().join(format!("keygate-demo-upstream-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cert.pem"), cert_pem)?;
    std::fs::write(dir.join("key.pem"), key_pem)?;
    let tls = keygate::tls::server_config(&dir.join("cert.pem"), &dir.join("key.pem"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!(
        "demo upstream listening on https://{}",
        listener.local_addr()?
    );
    let acceptor = Arc::new(acceptor);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(answer(req).await) },
                );
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Response<DemoBody> {
    if req.uri().path() == "/sse" {
        let stream = futures_util::stream::unfold(0u32, |i| async move {
            if i == 5 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
            Some((Ok::<_, Infallible>(frame), i + 1))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(StreamBody::new(stream).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let shown = match name.as_str() {
            "authorization" | "x-api-key" | "api-key" | "x-goog-api-key" => {
                let v = value.to_str().unwrap_or("");
                let tail: String = v
                    .chars()
                    .rev()
                    .take(4)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let scheme = v
                    .split_once(' ')
                    .map(|(s, _)| format!("{s} "))
                    .unwrap_or_default();
                format!("{scheme}****{tail} (preview; {} bytes)", v.len())
            }
            _ => value.to_str().unwrap_or("(binary)").to_owned(),
        };
        headers.insert(name.as_str().to_owned(), serde_json::Value::String(shown));
    }
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let doc = serde_json::json!({
        "upstream": "keygate demo upstream",
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_bytes": body_len,
    });
    let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
