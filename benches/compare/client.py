"""A small TLS HTTP/1.1 client (standard library) for what the load generators do not do: the
tier checks, keygate's /readyz, W2-slow's slow uploads and W6's idle connections."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

def tls_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies the chain and the name
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_response(sock: ssl.SSLSocket, deadline: float, max_body: int = 1 << 20) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response: (status, body). Content-Length, chunked, or until close."""
    buf = b""
    for _ in range(10_000):
        if b"\r\n\r\n" in buf:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("response head")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the response head ({len(buf)} bytes)")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        for _ in range(10_000):
            if len(rest) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("response body")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            rest += chunk
        return status, rest[:n]
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        for _ in range(10_000):
            if time.monotonic() > deadline:
                raise TimeoutError("chunked body")
            line_end = rest.find(b"\r\n")
            if line_end >= 0:
                size = int(rest[:line_end].split(b";")[0], 16)
                if size == 0 and rest.find(b"\r\n", line_end + 2) >= 0:
                    return status, body
                if size and len(rest) >= line_end + 2 + size + 2:
                    body += rest[line_end + 2:line_end + 2 + size]
                    rest = rest[line_end + 2 + size + 2:]
                    continue
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a chunked body")
            rest += chunk
            if len(body) + len(rest) > max_body:
                raise ValueError("body too large")
        raise ValueError("too many chunks")
    body = rest
    for _ in range(10_000):
        if time.monotonic() > deadline or len(body) > max_body:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def open_tls(port: int, ctx: ssl.SSLContext, timeout: float,
             session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(s, server_hostname="127.0.0.1", session=session)
    except BaseException:
        s.close()
        raise


def http_get(port: int, ctx: ssl.SSLContext, path: str, key: str | None,
             timeout: float = 5.0) -> tuple[int, bytes]:
    sock = open_tls(port, ctx, timeout)
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        if key:
            head += f"x-api-key: {key}\r\n"
        sock.sendall((head + "\r\n").encode())
        return read_response(sock, time.monotonic() + timeout)
    finally:
        sock.close()
