//! The SSE latency probe of the side-by-side benchmark (`benches/compare.py`): opens S
//! concurrent HTTP/1.1 streams over TLS (trusting only the CA in `--ca`) to an SSE endpoint of
//! the bench upstream fixture (directly or through a proxy), reads the body frame by frame and,
//! for every event `data: SEQ SEND_NS`, computes CLOCK_MONOTONIC now − SEND_NS (both ends run
//! on this machine, so the clocks are the same).
//!
//! It prints one JSON object on stdout: events expected and received, event latency p50 / p99 /
//! max in µs, time to first body byte p50 / max in ms (from before the TCP connect, so it
//! includes the TLS handshake), events per read (events ÷ data frames read) and errors (failed
//! streams, bad status, missing, unparsable or out-of-order events), with the first few error
//! messages.
//!
//! ```text
//! sse-probe --url https://127.0.0.1:8543/sse --ca certs/ca.pem [--key KEY] \
//!     --streams 20 --events 300 --gap-ms 10 [--timeout-s T]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

struct Args {
    url: hyper::Uri,
    ca: std::path::PathBuf,
    key: Option<String>,
    streams: usize,
    events: u64,
    gap_ms: u64,
    timeout: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut ca = None;
    let mut key = None;
    let mut streams = 20usize;
    let mut events = 300u64;
    let mut gap_ms = 10u64;
    let mut timeout = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = Some(value()?),
            "--ca" => ca = Some(value()?),
            "--key" => key = Some(value()?),
            "--streams" => streams = value()?.parse().map_err(|e| format!("--streams: {e}"))?,
            "--events" => events = value()?.parse().map_err(|e| format!("--events: {e}"))?,
            "--gap-ms" => gap_ms = value()?.parse().map_err(|e| format!("--gap-ms: {e}"))?,
            "--timeout-s" => {
                let s: u64 = value()?.parse().map_err(|e| format!("--timeout-s: {e}"))?;
                timeout = Some(Duration::from_secs(s));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=10_000).contains(&streams) {
        return Err("--streams must be between 1 and 10000".into());
    }
    if !(1..=1_000_000).contains(&events) || gap_ms > 60_000 {
        return Err("--events must be between 1 and 1000000, --gap-ms at most 60000".into());
    }
    let url: hyper::Uri = url
        .ok_or("--url is required")?
        .parse()
        .map_err(|e| format!("--url: {e}"))?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err("--url must be https://HOST[:PORT]/PATH".into());
    }
    Ok(Args {
        url,
        ca: ca.ok_or("--ca is required")?.into(),
        key,
        streams,
        events,
        gap_ms,
        timeout,
    })
}

fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

#[derive(Default)]
struct StreamResult {
    latencies_ns: Vec<u64>,
    frames: u64,
    ttfb: Option<Duration>,
    errors: Vec<String>,
}

struct Target {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    addr: String,
    authority: String,
    path: String,
    key: Option<String>,
    events: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca)
        .map_err(|e| format!("{}: {e}", args.ca.display()))?
    {
        roots.add(cert.map_err(|e| format!("{}: {e}", args.ca.display()))?)?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", args.ca.display()).into());
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(keygate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = args
        .url
        .host()
        .ok_or("--url has no host")?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = args.url.port_u16().unwrap_or(443);
    let base = args.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let sep = if base.contains('?') { '&' } else { '?' };
    let target = Arc::new(Target {
        connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        server_name: ServerName::try_from(host.clone())?,
        addr: if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        },
        authority: args
            .url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default(),
        path: format!("{base}{sep}n={}&gap_ms={}", args.events, args.gap_ms),
        key: args.key.clone(),
        events: args.events,
    });
    let timeout = args.timeout.unwrap_or_else(|| {
        Duration::from_millis(args.events.saturating_mul(args.gap_ms)) + Duration::from_secs(30)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(async {
        let mut handles = Vec::with_capacity(args.streams);
        for _ in 0..args.streams {
            let target = target.clone();
            handles.push(tokio::spawn(async move {
                match tokio::time::timeout(timeout, one_stream(&target)).await {
                    Ok(r) => r,
                    Err(_) => StreamResult {
                        errors: vec![format!("stream timed out after {timeout:?}")],
                        ..Default::default()
                    },
                }
            }));
        }
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.unwrap_or_else(|e| StreamResult {
                errors: vec![format!("stream task failed: {e}")],
                ..Default::default()
            }));
        }
        out
    });
    report(&args, &results);
    Ok(())
}

async fn one_stream(t: &Target) -> StreamResult {
    let mut r = StreamResult::default();
    if let Err(e) = read_stream(t, &mut r).await {
        r.errors.push(e);
    }
    let got = r.latencies_ns.len() as u64;
    if got < t.events {
        r.errors
            .push(format!("stream ended after {got} of {} events", t.events));
    }
    r
}

async fn read_stream(t: &Target, r: &mut StreamResult) -> Result<(), String> {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(&t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    let _ = tcp.set_nodelay(true);
    let tls = t
        .connector
        .connect(t.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(t.path.as_str())
        .header(hyper::header::HOST, t.authority.as_str())
        .header(hyper::header::ACCEPT, "text/event-stream");
    if let Some(k) = &t.key {
        req = req.header("x-api-key", k.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut next_seq = 0u64;
    let max_frames = t.events.saturating_mul(4) + 64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = monotonic_ns();
        if r.ttfb.is_none() {
            r.ttfb = Some(start.elapsed());
        }
        r.frames += 1;
        if r.frames > max_frames {
            return Err("too many frames".into());
        }
        buf.extend_from_slice(data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event[..end]).into_owned();
            let mut parts = line
                .strip_prefix("data: ")
                .ok_or_else(|| format!("unexpected event {line:?}"))?
                .split(' ');
            let seq: u64 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad event {line:?}"))?;
            let sent: u64 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad event {line:?}"))?;
            if seq != next_seq {
                return Err(format!("event {seq} arrived when {next_seq} was due"));
            }
            next_seq += 1;
            r.latencies_ns.push(now.saturating_sub(sent));
        }
        if buf.len() > 4096 {
            return Err("no event boundary in 4 KiB".into());
        }
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn report(args: &Args, results: &[StreamResult]) {
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut ttfb: Vec<u64> = results
        .iter()
        .filter_map(|r| r.ttfb.map(|d| d.as_micros() as u64))
        .collect();
    ttfb.sort_unstable();
    let frames: u64 = results.iter().map(|r| r.frames).sum();
    let errors: usize = results.iter().map(|r| r.errors.len()).sum();
    let messages: Vec<&String> = results
        .iter()
        .flat_map(|r| r.errors.iter())
        .take(5)
        .collect();
    let us = |v: Option<u64>| v.map(|ns| (ns as f64 / 100.0).round() / 10.0);
    let ms = |v: Option<u64>| v.map(|us| (us as f64 / 10.0).round() / 100.0);
    let doc = serde_json::json!({
        "streams": args.streams,
        "events_expected": args.events.saturating_mul(args.streams as u64),
        "events": lat.len(),
        "p50_us": us(pct(&lat, 0.50)),
        "p99_us": us(pct(&lat, 0.99)),
        "max_us": us(lat.last().copied()),
        "ttfb_p50_ms": ms(pct(&ttfb, 0.50)),
        "ttfb_max_ms": ms(ttfb.last().copied()),
        "data_frames": frames,
        "events_per_read": if frames > 0 {
            Some(((lat.len() as f64 / frames as f64) * 1000.0).round() / 1000.0)
        } else {
            None
        },
        "errors": errors,
        "error_messages": messages,
    });
    println!("{doc}");
}
