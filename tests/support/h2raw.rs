//! Raw clients for the hostile batteries: TLS connections made by hand (with the ALPN asked for
//! and checked), and an HTTP/2 client that writes frames by hand and reads them back one by one.
//!
//! Nothing here panics on what the server sends: frames are parsed with bounds checks, and a
//! malformed payload gives `None`, not an index out of range.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::TestCa;

// ---------------------------------------------------------------------------------------------
// TLS, by hand
// ---------------------------------------------------------------------------------------------

/// A TLS connector that trusts the test CA only and offers exactly `alpn`.
pub fn connector(ca: &TestCa, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca.ca_file).expect("read the test CA") {
        roots.add(c.expect("the test CA's PEM")).expect("add CA");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(keygate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// Connects over TCP and TLS and asserts that `alpn` was negotiated.
pub async fn connect(tls: &TlsConnector, addr: SocketAddr, alpn: &[u8]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    handshake(tls, tcp, addr, alpn).await
}

/// Like [`connect`], with the socket's receive buffer set to `rcvbuf` bytes before connecting
/// (a small one makes the server's writes back up quickly when the client does not read).
pub async fn connect_rcvbuf(
    tls: &TlsConnector,
    addr: SocketAddr,
    alpn: &[u8],
    rcvbuf: u32,
) -> TlsStream<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    let tcp = sock.connect(addr).await.expect("TCP connect");
    handshake(tls, tcp, addr, alpn).await
}

async fn handshake(
    tls: &TlsConnector,
    tcp: TcpStream,
    addr: SocketAddr,
    alpn: &[u8],
) -> TlsStream<TcpStream> {
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    let s = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("TLS handshake with keygate");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    s
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 frames and HPACK, by hand
// ---------------------------------------------------------------------------------------------

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// END_STREAM on HEADERS and DATA, ACK on SETTINGS and PING: the same bit.
pub const DATA_OR_END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const T_DATA: u8 = 0x0;
pub const T_HEADERS: u8 = 0x1;
pub const T_RST: u8 = 0x3;
pub const T_SETTINGS: u8 = 0x4;
pub const T_PING: u8 = 0x6;
pub const T_GOAWAY: u8 = 0x7;
pub const T_WINDOW_UPDATE: u8 = 0x8;
pub const T_CONTINUATION: u8 = 0x9;

/// SETTINGS identifiers (RFC 9113 6.5.2).
pub const S_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const S_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// One frame: (type, flags, stream id, payload).
pub type RawFrame = (u8, u8, u32, Vec<u8>);

/// A frame with its 9-byte header.
pub fn frame(ty: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&(sid & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A SETTINGS payload.
pub fn settings_payload(settings: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(settings.len() * 6);
    for (id, v) in settings {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

/// The (identifier, value) pairs of a SETTINGS payload; a trailing partial entry is ignored.
pub fn parse_settings(p: &[u8]) -> Vec<(u16, u32)> {
    p.chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

/// A GOAWAY payload's (last stream id, error code), if it is long enough to have them.
pub fn goaway_parts(p: &[u8]) -> Option<(u32, u32)> {
    let last = u32::from_be_bytes(p.get(0..4)?.try_into().ok()?) & 0x7fff_ffff;
    let code = u32::from_be_bytes(p.get(4..8)?.try_into().ok()?);
    Some((last, code))
}

/// An RST_STREAM payload's error code.
pub fn rst_code(p: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(0..4)?.try_into().ok()?))
}

/// The `:status` of a response header block when the server sent it as an indexed field of
/// the HPACK static table (RFC 7541 appendix A: 8..=14), which is how it sends those seven.
pub fn indexed_status(block: &[u8]) -> Option<u16> {
    match block.first()? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        _ => None,
    }
}

/// An HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 5.1).
pub fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman.
pub fn hpack_lit(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, value.len());
    out.extend_from_slice(value);
}

/// The header block of a keyed request for `path` (GET).
pub fn request_block(path: &str, key: &str) -> Vec<u8> {
    method_block("GET", path, key)
}

/// The header block of a keyed request.
pub fn method_block(method: &str, path: &str, key: &str) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_lit(&mut b, ":method", method.as_bytes());
    hpack_lit(&mut b, ":scheme", b"https");
    hpack_lit(&mut b, ":path", path.as_bytes());
    hpack_lit(&mut b, ":authority", b"127.0.0.1");
    hpack_lit(&mut b, "x-api-key", key.as_bytes());
    b
}

/// Takes one whole frame off the front of `buf`, if one is there.
pub fn take_frame(buf: &mut Vec<u8>) -> Option<RawFrame> {
    let head = buf.get(0..9)?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let (ty, flags) = (head[3], head[4]);
    let sid = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let p = buf.get(9..9 + len)?.to_vec();
    buf.drain(..9 + len);
    Some((ty, flags, sid, p))
}

const WRITE_LIMIT: Duration = Duration::from_secs(5);

/// An HTTP/2 connection to keygate, by hand: the read half here, the write half here or given
/// to a task.
pub struct H2 {
    pub r: tokio::io::ReadHalf<TlsStream<TcpStream>>,
    pub w: Option<tokio::io::WriteHalf<TlsStream<TcpStream>>>,
    buf: Vec<u8>,
    pub server_settings: Vec<(u16, u32)>,
}

impl H2 {
    /// Connects, exchanges empty SETTINGS (and acknowledges keygate's).
    pub async fn open(ca: &TestCa, addr: SocketAddr) -> H2 {
        let c = connect(&connector(ca, b"h2"), addr, b"h2").await;
        Self::handshake(c, &[]).await
    }

    /// Connects with these client SETTINGS and, when given, a small socket receive buffer.
    pub async fn open_with(
        ca: &TestCa,
        addr: SocketAddr,
        settings: &[(u16, u32)],
        rcvbuf: Option<u32>,
    ) -> H2 {
        let tls = connector(ca, b"h2");
        let c = match rcvbuf {
            Some(n) => connect_rcvbuf(&tls, addr, b"h2", n).await,
            None => connect(&tls, addr, b"h2").await,
        };
        Self::handshake(c, settings).await
    }

    async fn handshake(c: TlsStream<TcpStream>, settings: &[(u16, u32)]) -> H2 {
        let (r, w) = tokio::io::split(c);
        let mut h = H2 {
            r,
            w: Some(w),
            buf: Vec::new(),
            server_settings: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(T_SETTINGS, 0, 0, &settings_payload(settings)));
        assert!(h.send(&hello).await, "writing the preface");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (ty, flags, _, p) = h.next(deadline).await.expect("keygate's SETTINGS");
            if ty == T_SETTINGS && flags & ACK == 0 {
                h.server_settings = parse_settings(&p);
                break;
            }
        }
        assert!(
            h.send(&frame(T_SETTINGS, ACK, 0, &[])).await,
            "acknowledging keygate's SETTINGS"
        );
        h
    }

    /// The next frame, or None when the connection ends or `deadline` passes.
    pub async fn next(&mut self, deadline: Instant) -> Option<RawFrame> {
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Some(f);
            }
            let mut tmp = [0u8; 16384];
            match tokio::time::timeout_at(deadline.into(), self.r.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Like [`H2::next`], and tells an end of the connection (`Err(true)`) from the deadline
    /// passing (`Err(false)`).
    pub async fn next_or_end(&mut self, deadline: Instant) -> Result<RawFrame, bool> {
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Ok(f);
            }
            let mut tmp = [0u8; 16384];
            match tokio::time::timeout_at(deadline.into(), self.r.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(true),
                Err(_) => return Err(false),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Writes and flushes `bytes` (bounded at 5 s); false when that failed or the write half
    /// was given away.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        let Some(w) = self.w.as_mut() else {
            return false;
        };
        matches!(
            tokio::time::timeout(WRITE_LIMIT, async {
                w.write_all(bytes).await?;
                w.flush().await
            })
            .await,
            Ok(Ok(()))
        )
    }

    /// Writes `chunks` from a task (so reading goes on meanwhile); the task gives back how
    /// many bytes went out before an error, if any.
    pub fn send_in_background(
        &mut self,
        chunks: Vec<Vec<u8>>,
    ) -> tokio::task::JoinHandle<(usize, bool)> {
        let mut w = self.w.take().expect("one writer");
        tokio::spawn(async move {
            let mut sent = 0;
            for c in chunks {
                match tokio::time::timeout(WRITE_LIMIT, w.write_all(&c)).await {
                    Ok(Ok(())) => sent += c.len(),
                    _ => return (sent, false),
                }
            }
            let ok = w.flush().await.is_ok();
            // Keep the write half open a while: closing it is not what is tested.
            tokio::time::sleep(Duration::from_secs(3)).await;
            (sent, ok)
        })
    }
}
