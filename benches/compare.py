#!/usr/bin/env python3
"""Side-by-side benchmark of keygate against a direct connection, nginx and HAProxy.

The method is the team's bench.md (tiers, workloads, metrics, peer configs). One command:

    python3 benches/compare.py [--quick] [--rounds N] [--only W1,W3,...] [--tiers direct,keygate]
                               [--no-build] [--no-restart] [--unpinned]

It builds keygate and the two bench examples (release), makes a fresh work directory under
benches/results/tmp/run, generates the certificates with keygate's development CA, creates
10,000 keys (plus one key with a quota of 1,000,000 r/s for the workloads that use one key),
starts the upstream fixture (core 1), keygate, nginx and HAProxy (each on core 0, one worker
thread each; HAProxy in master-worker mode, -W, so that it can be reloaded), checks that every
proxy rewrites the credential headers, warms up, and then runs every workload on the tiers
direct, keygate, nginx, HAProxy in turn, round after round. W7 (4 reloads during a W1-h1
load; not on the direct tier) runs after W1 on the long-running processes and leaves them
serving an equivalent config. The memory workloads (W2-slow, W6) run last in a round, each on a
freshly restarted process. Output:
benches/results/latest.{json,md,svg}; scratch files in benches/results/tmp.

Python 3.11 standard library only. Traffic goes to 127.0.0.1 only. Every process it starts is
stopped on exit (normal, error or Ctrl-C); every loop is bounded in count and time. Nothing is
installed: missing tools are named with the command that installs them, and what needs them is
recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
TEMPLATES = BENCHES / "templates"
RESULTS = BENCHES / "results"
TMP = RESULTS / "tmp"
WORK = TMP / "run"
RELEASE = ROOT / "target" / "release"
KEYGATE = RELEASE / "keygate"
FIXTURE = RELEASE / "examples" / "bench-upstream"
PROBE = RELEASE / "examples" / "sse-probe"

TOKEN = "bench-upstream-token"
N_KEYS = 10_000
TIERS = ["direct", "keygate", "nginx", "haproxy"]
PEERS = ["direct", "nginx", "haproxy"]
PROXY_CORE = 0
LOAD_CORE = 1

# Per mode: durations in seconds, sizes, counts.
MODES = {
    "quick": dict(rounds=2, warmup_s=1, wrk_s=2, h2_s=2, rate_s=2, upload_s=1, handshake_s=1,
                  sse_events=60, slow_uploads=64, slow_bytes=1 << 20, idle_conns=600,
                  budget_s=180),  # W7 alone is ~30 s a round (3 tiers x 8 s + reload checks)
    "full": dict(rounds=5, warmup_s=3, wrk_s=10, h2_s=5, rate_s=4, upload_s=4, handshake_s=4,
                 sse_events=300, slow_uploads=64, slow_bytes=4 << 20, idle_conns=5000,
                 budget_s=23 * 60),
}
SSE_STREAMS = 20
SSE_GAP_MS = 10
SLOW_RATE = 1 << 20  # bytes per second the fixture reads each slow upload at
FIXED_RATE = 5000    # requests per second of W1-rate (open loop)
W7_RELOADS = 4       # reloads during W7, evenly spaced
W7_MIN_QUICK_S = 8   # W7's load lasts the mode's W1 duration, but at least this in quick mode

WORKLOADS = {
    "W1-h1": dict(title="W1 small GET, HTTP/1.1 over TLS, keep-alive",
                  load="wrk -t1 -c64 --latency, the next of 10,000 keys on each request",
                  tools=["wrk"]),
    "W1-h2": dict(title="W1 small GET, HTTP/2 over TLS",
                  load="h2load -t1 -c16 -m16, one key (exempt from the 1000 r/s per-key limit)",
                  tools=["h2load"]),
    "W1-rate": dict(title=f"W1 small GET, HTTP/1.1 over TLS at a fixed {FIXED_RATE} r/s",
                    load=f"oha -q {FIXED_RATE} --latency-correction (else h2load --h1 -c16 -m1 "
                         f"--rps {FIXED_RATE // 16}), one key; latency is the point",
                    tools=[], full_only=True),
    "W7-reload": dict(title=f"W7 {W7_RELOADS} config / key-set reloads during a W1-h1 load",
                      load=f"wrk -t1 -c64 (W1-h1: the next of 10,000 keys on each request, same "
                           f"per-key limits) for the W1 duration (at least {W7_MIN_QUICK_S} s in "
                           f"quick mode); {W7_RELOADS} reloads evenly spaced, on the long-running "
                           f"processes. keygate: alternately a harmless config change (the "
                           f"[limits] admin quota, put back by the third reload) + `keygate "
                           f"reload`, and `keygate keys create` (a key-set change) + `keygate "
                           f"reload`; each checked by the config generation in /readyz (and the "
                           f"new key answering 200). nginx: SIGHUP to the master (nginx -s "
                           f"reload), checked by a new worker pid. HAProxy: master-worker mode "
                           f"(-W), SIGUSR2 to the master, checked by a new worker pid and the "
                           f"master's \"Loading success\" (the next signal waits for it: one sent "
                           f"while the re-executed master loads is lost). direct: no "
                           f"proxy, not run. Errors (non-2xx/3xx answers + wrk socket errors) "
                           f"are the figure that matters: the target is 0",
                      tools=["wrk"]),
    "W2-upload": dict(title="W2 1 MiB POST upload, streamed",
                      load="wrk -t1 -c8 --latency, POST 1 MiB, 64 keys rotating",
                      tools=["wrk"]),
    "W2-slow": dict(title="W2 64 slow uploads (the fixture reads 1 MiB/s each): proxy RSS",
                    load="64 concurrent Python TLS clients; RSS sampled every 100 ms",
                    tools=[]),
    "W3-sse": dict(title=f"W3 SSE: {SSE_STREAMS} streams, events {SSE_GAP_MS} ms apart",
                   load="sse-probe (receive time - send time per event, CLOCK_MONOTONIC)",
                   tools=[]),
    "W5-full": dict(title="W5 a new TLS connection per request, full handshakes (ECDSA P-256)",
                    load="h2load --h1 -t1 -c200 -n200 run back to back: every client makes one "
                         "connection with a full handshake (no session resumption) and one request; "
                         "one key",
                    tools=["h2load"]),
    "W5-resumed": dict(title="W5 a new TLS connection per request, wrk (resumes the TLS session)",
                       load="wrk -t1 -c32 with Connection: close, keys rotating. wrk resumes "
                            "its TLS session when it reconnects (checked with nginx's "
                            "$ssl_session_reused), so these are resumed handshakes, without the "
                            "certificate signature; W5-full has the full ones",
                       tools=["wrk"]),
    "W6-idle": dict(title="W6 idle TLS connections kept open after one request each",
                    load="Python TLS client (4 threads, TLS sessions resumed after the first "
                         "connection); (RSS after - RSS before) / N",
                    tools=[]),
}
# These restart the process under test (fresh allocator) and so run last in each round.
MEMORY_WORKLOADS = ("W2-slow", "W6-idle")
# These do their own accounting (no CPU/RSS of the proxy pids around the run): the memory
# workloads restart the process, and W7 replaces nginx's and HAProxy's workers mid-run.
OWN_ACCOUNTING = MEMORY_WORKLOADS + ("W7-reload",)
# Workloads without a proxy process to act on: not run on the direct tier.
PROXY_ONLY = {"W7-reload": "no proxy to reload"}
NOT_MEASURED = {
    "W4": "many keys (10k/100k/1M, Zipf): not measured by this harness",
}

# What each workload's table shows: (metric, header, format, higher_is_better or None).
COLUMNS = {
    "W1-h1": [("rps", "req/s", "k", True), ("cpu_us_per_req", "CPU µs/req", "f1", False),
              ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
              ("rss_mib", "RSS MiB", "f1", False), ("proxy_cpu_pct", "proxy CPU %", "f0", None),
              ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)],
    "W1-h2": [("rps", "req/s", "k", True), ("cpu_us_per_req", "CPU µs/req", "f1", False),
              ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
              ("rss_mib", "RSS MiB", "f1", False), ("proxy_cpu_pct", "proxy CPU %", "f0", None),
              ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)],
    "W1-rate": [("rps", "req/s", "k", None), ("p50_ms", "p50 ms", "f3", False),
                ("p99_ms", "p99 ms", "f3", False), ("cpu_us_per_req", "CPU µs/req", "f1", False)],
    "W2-upload": [("rps", "uploads/s", "f0", True), ("cpu_us_per_req", "CPU µs/upload", "f0", False),
                  ("p50_ms", "p50 ms", "f1", False), ("p99_ms", "p99 ms", "f1", False),
                  ("rss_mib", "RSS MiB", "f1", False), ("proxy_cpu_pct", "proxy CPU %", "f0", None)],
    "W2-slow": [("rss_base_mib", "RSS before MiB", "f1", None),
                ("rss_max_mib", "RSS max MiB", "f1", False),
                ("rss_growth_mib", "growth MiB", "f2", False),
                ("rss_growth_kib_per_upload", "growth KiB/upload", "f0", None),
                ("seconds", "seconds", "f1", None)],
    "W3-sse": [("p50_us", "event p50 µs", "f0", False), ("p99_us", "event p99 µs", "f0", False),
               ("max_us", "max µs", "f0", False), ("ttfb_p50_ms", "TTFB p50 ms", "f2", False),
               ("events_per_read", "events/read", "f2", None),
               ("cpu_us_per_event", "CPU µs/event", "f1", False)],
    "W5-full": [("rps", "handshakes/s", "f0", True),
                ("cpu_us_per_req", "CPU µs/handshake", "f0", False),
                ("proxy_cpu_pct", "proxy CPU %", "f0", None),
                ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)],
    "W5-resumed": [("rps", "handshakes/s", "f0", True),
                   ("cpu_us_per_req", "CPU µs/handshake", "f0", False),
                   ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
                   ("proxy_cpu_pct", "proxy CPU %", "f0", None)],
    "W7-reload": [("requests", "requests", "k", None), ("rps", "req/s", "k", True),
                  ("reloads", "reloads done", "f0", None),
                  ("reload_ms_max", "slowest reload ms", "f0", None),
                  ("generation", "keygate generation", "f0", None),
                  ("non_2xx", "non-2xx/3xx", "f0", None),
                  ("socket_errors", "socket errors", "f0", None)],
    "W6-idle": [("kib_per_conn", "KiB/conn", "f2", False), ("rss_before_mib", "RSS before MiB", "f1", None),
                ("rss_after_mib", "RSS after MiB", "f1", None),
                ("cpu_us_per_conn", "CPU µs/conn", "f0", False), ("open_seconds", "open s", "f1", None)],
}
# The bar chart: (workload, metric, label, higher_is_better).
CHART = [
    ("W1-h1", "rps", "W1 h1 TLS keep-alive: req/s", True),
    ("W1-h1", "cpu_us_per_req", "W1 h1 TLS: proxy CPU µs per request", False),
    ("W1-h2", "rps", "W1 h2 TLS 16×16: req/s", True),
    ("W1-h2", "cpu_us_per_req", "W1 h2 TLS: proxy CPU µs per request", False),
    ("W1-rate", "p99_ms", f"W1 at {FIXED_RATE} r/s: latency p99 ms", False),
    ("W2-upload", "rps", "W2 1 MiB uploads/s", True),
    ("W2-slow", "rss_growth_mib", "W2 64 slow uploads: RSS growth MiB", False),
    ("W3-sse", "p50_us", "W3 SSE event latency p50 µs", False),
    ("W3-sse", "p99_us", "W3 SSE event latency p99 µs", False),
    ("W5-full", "rps", "W5 full TLS handshakes/s (generator-bound)", True),
    ("W5-full", "cpu_us_per_req", "W5 proxy CPU µs per full handshake + request", False),
    ("W6-idle", "kib_per_conn", "W6 KiB per idle TLS connection", False),
    ("W7-reload", "errors", f"W7 errors during {W7_RELOADS} reloads under load (target 0)", False, "f0"),
    ("W7-reload", "rps", f"W7 req/s during {W7_RELOADS} reloads (h1 TLS, wrk -c64)", True),
]
COLORS = {"direct": "#9e9e9e", "keygate": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#ff7f0e"}

INSTALL = {
    "wrk": "apt-get install wrk",
    "h2load": "apt-get install nghttp2-client",
    "nginx": "apt-get install nginx",
    "haproxy": "apt-get install haproxy",
    "taskset": "apt-get install util-linux",
    "oha": "cargo install oha",
}
APT_PKG = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "haproxy": "haproxy",
           "taskset": "util-linux"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stop(BaseException):
    """SIGTERM: unwind like Ctrl-C (not caught by `except Exception`) so that every started
    process is stopped."""


def on_sigterm(_signum, _frame):
    raise Stop("SIGTERM")


# ---------------------------------------------------------------- processes


class Processes:
    """Every process the harness starts, each in its own session so that a whole tree (nginx
    master + worker) can be signalled; stop_all() ends them all, children first."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.started: list[tuple[str, subprocess.Popen]] = []

    def argv(self, argv: list[str], core: int | None) -> list[str]:
        if self.pin and core is not None:
            return ["taskset", "-c", str(core)] + argv
        return argv

    def start(self, name: str, argv: list[str], core: int | None, log_path: Path,
              env: dict | None = None) -> subprocess.Popen:
        full = self.argv(argv, core)
        offset = log_path.stat().st_size if log_path.exists() else 0
        logf = open(log_path, "ab")
        try:
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, env=env, cwd=WORK)
        finally:
            logf.close()
        p.log_offset = offset  # where this instance's lines start in a shared log
        self.started.append((name, p))
        return p

    def run(self, argv: list[str], core: int | None, timeout: float,
            stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a short-lived command to completion (killed when it overruns the timeout)."""
        full = self.argv(argv, core)
        p = subprocess.Popen(full, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env=env, cwd=WORK)
        self.started.append((argv[0], p))
        try:
            out, err = p.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p, grace=1.0)
            out, err = p.communicate()
            raise RuntimeError(f"{shlex.join(argv[:3])}... overran {timeout:.0f} s; "
                               f"stderr: {err.decode(errors='replace')[-400:]}")
        except BaseException:
            self.stop(p, grace=1.0)
            raise
        finally:
            if p.poll() is not None:
                self.started = [(n, q) for (n, q) in self.started if q is not p]
        return subprocess.CompletedProcess(full, p.returncode, out, err)

    @staticmethod
    def stop(p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                p.send_signal(sig)
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may hold children (nginx worker) that outlive the leader.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def forget(self, p: subprocess.Popen) -> None:
        self.started = [(n, q) for (n, q) in self.started if q is not p]

    def stop_all(self) -> None:
        for name, p in reversed(self.started):
            if p.poll() is None:
                log(f"stopping {name} (pid {p.pid})")
            self.stop(p)
        self.started.clear()


def wait_for_line(p: subprocess.Popen, log_path: Path, needle: str, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    offset = getattr(p, "log_offset", 0)
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited ({p.returncode}); log {log_path}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: no '{needle}' within {timeout:.0f} s; log {log_path}")


def wait_for_port(p: subprocess.Popen, port: int, timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited ({p.returncode}); log {log_path}:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: port {port} not open within {timeout:.0f} s; log {log_path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- /proc


TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def cpu_us(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in µs."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) * TICK_US
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d.name))
    return out


def machine_cpu_us() -> tuple[float, float]:
    """(user + nice + system of all CPUs, steal), in µs, from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    return (f[0] + f[1] + f[2]) * TICK_US, f[7] * TICK_US


def own_cpu_us() -> float:
    """CPU of the harness and everything it started: itself, its reaped children (the load
    generators) and its live descendants (fixture, proxies, nginx worker)."""
    t = os.times()
    total = (t.user + t.system + t.children_user + t.children_system) * 1e6
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    me, ours = os.getpid(), []
    for pid in parent:
        p, hops = pid, 0
        while p > 1 and hops < 64:
            p, hops = parent.get(p, 0), hops + 1
            if p == me:
                ours.append(pid)
                break
    return total + cpu_us(ours)


class OtherLoad:
    """How much CPU the rest of the machine used meanwhile (a shared 2-core machine: a build
    running next to the benchmark skews it), as % of one core."""

    def __init__(self):
        self.busy0, self.steal0 = machine_cpu_us()
        self.own0, self.t0 = own_cpu_us(), time.monotonic()

    def done(self) -> tuple[float, float]:
        busy, steal = machine_cpu_us()
        wall = max(1e-3, time.monotonic() - self.t0) * 1e6
        other = (busy - self.busy0) - (own_cpu_us() - self.own0)
        return max(0.0, 100 * other / wall), 100 * (steal - self.steal0) / wall


# ---------------------------------------------------------------- small TLS HTTP/1.1 client


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


# ---------------------------------------------------------------- tool output parsers

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(out: str) -> dict:
    m = {}
    r = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", out, re.M)
    if not r:
        raise ValueError(f"wrk output without a request count:\n{out[-1500:]}")
    m["requests"] = int(r.group(1))
    r = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    m["rps"] = float(r.group(1)) if r else None
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        r = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
        m[key] = float(r.group(1)) * UNIT_MS[r.group(2)] if r else None
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    m["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    if sock:
        m["socket_errors_detail"] = dict(zip(("connect", "read", "write", "timeout"),
                                             (int(x) for x in sock.groups())))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    m["non_2xx"] = int(bad.group(1)) if bad else 0
    m["errors"] = m["socket_errors"] + m["non_2xx"]
    return m


def percentile(sorted_vals: list, p: float):
    if not sorted_vals:
        return None
    rank = min(len(sorted_vals), max(1, math.ceil(p * len(sorted_vals))))
    return sorted_vals[rank - 1]


def parse_h2load(out: str, log_file: Path | None) -> dict:
    m = {}
    r = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    if not r:
        raise ValueError(f"h2load output without a summary:\n{out[-1500:]}")
    m["rps"] = float(r.group(3))
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not r:
        raise ValueError(f"h2load output without request counts:\n{out[-1500:]}")
    total, started, done, ok, failed, errored, timeout = (int(x) for x in r.groups())
    m["requests"] = done
    m["errors"] = failed
    m["errored"] = errored
    r = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if r:
        m["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(x) for x in r.groups())))
    if log_file and log_file.exists():
        lat = []
        with open(log_file) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
        lat.sort()
        m["p50_ms"] = percentile(lat, 0.50) / 1000 if lat else None
        m["p99_ms"] = percentile(lat, 0.99) / 1000 if lat else None
        log_file.unlink()
    return m


def parse_oha(out: str) -> dict:
    doc = json.loads(out)
    summary = doc["summary"]
    pct = doc.get("latencyPercentiles", {})
    codes = doc.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if str(k).startswith(("2", "3")))
    bad = sum(v for k, v in codes.items() if not str(k).startswith(("2", "3")))
    errs = sum(doc.get("errorDistribution", {}).values())
    return {
        "rps": summary["requestsPerSec"],
        "requests": ok + bad,
        "p50_ms": pct["p50"] * 1000 if pct.get("p50") is not None else None,
        "p99_ms": pct["p99"] * 1000 if pct.get("p99") is not None else None,
        "non_2xx": bad,
        "socket_errors": errs,
        "errors": bad + errs,
    }


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args, procs: Processes, tools: dict[str, str | None]):
        self.args = args
        self.mode = MODES["quick" if args.quick else "full"]
        self.procs = procs
        self.tools = tools
        self.certs = WORK / "certs"
        self.ca = self.certs / "ca.pem"
        self.keys: list[str] = []
        self.big_key = ""
        self.ports: dict[str, int] = {}
        self.proc: dict[str, subprocess.Popen] = {}
        self.ctx: ssl.SSLContext | None = None
        self.measurements: list[dict] = []
        self.skipped: list[dict] = []
        self.notes: list[str] = []
        self.needs_warmup: set[str] = set()
        self.started_at = time.monotonic()

    # ---- setup

    def pids(self, tier: str) -> list[int]:
        if tier == "direct":
            return []
        p = self.proc[tier]
        if tier in ("nginx", "haproxy"):
            # The worker(s); the master only supervises (HAProxy runs master-worker, -W, so
            # that W7 can reload it gracefully). Right after a reload an old worker may still
            # be finishing its connections: it is counted too while it lives.
            return children(p.pid)
        return [p.pid]

    def fixture_pids(self) -> list[int]:
        return [self.proc["fixture"].pid]

    def keygate_config(self, path: Path, proxy: int, admin: int, certgen: bool) -> None:
        if certgen:
            tls = f'dev_dir = "{self.certs}"'
            upstream = ""
        else:
            tls = f'cert = "{self.certs}/server.pem"\nkey = "{self.certs}/server-key.pem"'
            h2 = "true" if self.args.keygate_upstream == "h2" else "false"
            upstream = f'[upstream]\nca_file = "{self.ca}"\nhttp2 = {h2}\n'
        path.write_text(f"""# written by benches/compare.py
[listen]
proxy = "127.0.0.1:{proxy}"
admin = "127.0.0.1:{admin}"

[tls]
{tls}

[store]
path = "{WORK}/kg/keygate.db"
master_key_file = "{WORK}/kg/master.key"

{upstream}
[keys]
cache_ttl = "1h"      # the run is <= 20 min: no mass expiry of the 10,000 warmed keys mid-run

[limits]
default = {{ per_second = 1000, burst = 2000 }}
admin = {{ per_second = 100000, burst = 100000 }}

[server]
worker_threads = 1
max_connections = 20000
header_read_timeout = "60s"   # it also ends idle keep-alive connections: W6 holds them ~10 s

[[route]]
prefix = "/"
upstream = "https://127.0.0.1:{self.ports.get('fixture', 1)}"
inject = {{ ai_secret = "UP" }}
""")

    def setup(self) -> None:
        if WORK.exists():
            shutil.rmtree(WORK)
        (WORK / "kg").mkdir(parents=True)
        (WORK / "nginx-tmp").mkdir()
        for name in ("fixture", "fixture_plain", "keygate", "keygate_admin", "nginx", "haproxy"):
            self.ports[name] = free_port()

        # Certificates: keygate writes its development CA and server certificate on start.
        log("generating certificates (keygate serve with [tls] dev_dir)")
        cfg0 = WORK / "certgen.toml"
        self.keygate_config(cfg0, free_port(), free_port(), certgen=True)
        lp = WORK / "certgen.log"
        env = dict(os.environ, KEYGATE_LOG="warn")
        p = self.procs.start("keygate (certgen)", [str(KEYGATE), "--config", str(cfg0), "serve"],
                             None, lp, env=env)
        wait_for_line(p, lp, "proxy listening on", 30, "keygate (certificate generation)")
        self.procs.stop(p)
        for f in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem"):
            if not (self.certs / f).exists():
                raise RuntimeError(f"keygate did not write {self.certs / f}")
        (WORK / "certkey.pem").write_text((self.certs / "server.pem").read_text()
                                          + (self.certs / "server-key.pem").read_text())
        self.ctx = tls_context(self.ca)

        cfg = WORK / "keygate.toml"
        self.keygate_config(cfg, self.ports["keygate"], self.ports["keygate_admin"], certgen=False)
        kg = [str(KEYGATE), "--config", str(cfg)]
        r = self.procs.run(kg + ["secrets", "put", "UP", "--type", "openai"], None, 30,
                           stdin=f"{TOKEN}\n".encode(), env=env)
        if r.returncode:
            raise RuntimeError(f"secrets put failed: {r.stderr.decode(errors='replace')}")
        r = self.procs.run(kg + ["keys", "create", "--name", "bench", "--count", str(N_KEYS)],
                           None, 60, env=env)
        self.keys = [k for k in r.stdout.decode().split("\n") if k.strip()]
        if r.returncode or len(self.keys) != N_KEYS:
            raise RuntimeError(f"keys create gave {len(self.keys)} keys: {r.stderr.decode(errors='replace')}")
        r = self.procs.run(kg + ["keys", "create", "--name", "bench-h2", "--rate", "1000000",
                                 "--burst", "1000000"], None, 30, env=env)
        self.big_key = r.stdout.decode().strip()
        if r.returncode or not self.big_key.startswith("sk-"):
            raise RuntimeError(f"keys create (h2 key) failed: {r.stderr.decode(errors='replace')}")
        (WORK / "keys.txt").write_text("\n".join(self.keys) + "\n")
        all_keys = self.keys + [self.big_key]
        (WORK / "keys.nginx").write_text("".join(f'"{k}" "{TOKEN}";\n' for k in all_keys))
        (WORK / "keys.map").write_text("".join(f"{k} {TOKEN}\n" for k in all_keys))

        subst = {
            "WORK": str(WORK), "CERT": str(self.certs / "server.pem"),
            "KEY": str(self.certs / "server-key.pem"), "CERTKEY": str(WORK / "certkey.pem"),
            "CA": str(self.ca), "UPSTREAM_PORT": str(self.ports["fixture"]),
            "BIG_KEY": self.big_key,
        }
        for tier, tmpl, out in (("nginx", "nginx.conf.tmpl", "nginx.conf"),
                                ("haproxy", "haproxy.cfg.tmpl", "haproxy.cfg")):
            text = (TEMPLATES / tmpl).read_text()
            for k, v in dict(subst, PORT=str(self.ports[tier])).items():
                text = text.replace("{{" + k + "}}", v)
            left = re.findall(r"\{\{\w+\}\}", text)
            if left:
                raise RuntimeError(f"{tmpl}: unfilled placeholders {left}")
            (WORK / out).write_text(text)

        # The fixture on the load generator's core, the proxies on the other one.
        self.proc["fixture"] = self.start_fixture(self.ports["fixture"], self.ports["fixture_plain"],
                                                  "fixture")
        self.port = {"direct": self.ports["fixture"], "keygate": self.ports["keygate"],
                     "nginx": self.ports["nginx"], "haproxy": self.ports["haproxy"]}
        for tier in self.tiers():
            if tier != "direct":
                if tier == "nginx":
                    r = self.procs.run(self.nginx_argv() + ["-t"], None, 30)
                    if r.returncode:
                        raise RuntimeError(f"nginx -t: {r.stderr.decode(errors='replace')}")
                if tier == "haproxy":
                    r = self.procs.run([self.tools["haproxy"], "-c", "-f", str(WORK / "haproxy.cfg")],
                                       None, 30)
                    if r.returncode:
                        raise RuntimeError(f"haproxy -c: {(r.stdout + r.stderr).decode(errors='replace')}")
                self.start_proxy(tier)
        self.check_tiers()

    def start_fixture(self, tls_port: int, plain_port: int | None, name: str) -> subprocess.Popen:
        lp = WORK / f"{name}.log"
        argv = [str(FIXTURE), "--tls", f"127.0.0.1:{tls_port}", "--certs", str(self.certs),
                "--threads", "1"]
        if plain_port:
            argv += ["--plain", f"127.0.0.1:{plain_port}"]
        p = self.procs.start(name, argv, LOAD_CORE, lp)
        wait_for_line(p, lp, "bench-upstream: ready", 15, name)
        return p

    def nginx_argv(self) -> list[str]:
        return [self.tools["nginx"], "-e", str(WORK / "nginx-error.log"), "-p", str(WORK),
                "-c", str(WORK / "nginx.conf")]

    def haproxy_argv(self) -> list[str]:
        return [self.tools["haproxy"], "-W", "-db", "-f", str(WORK / "haproxy.cfg")]

    def start_proxy(self, tier: str) -> None:
        lp = WORK / f"{tier}.log"
        if tier == "keygate":
            env = dict(os.environ, KEYGATE_LOG="warn")
            p = self.procs.start("keygate", [str(KEYGATE), "--config", str(WORK / "keygate.toml"),
                                             "serve"], PROXY_CORE, lp, env=env)
            wait_for_line(p, lp, "proxy listening on", 30, "keygate")
        else:
            if tier == "nginx":
                p = self.procs.start("nginx", self.nginx_argv() + ["-g", "daemon off;"],
                                     PROXY_CORE, lp)
            else:
                # Master-worker mode (-W; -db keeps the master in the foreground, as the child
                # of the harness): SIGUSR2 to the master reloads gracefully (W7). The worker
                # does the work and is what pids() measures, as for nginx.
                p = self.procs.start("haproxy", self.haproxy_argv(), PROXY_CORE, lp)
            wait_for_port(p, self.ports[tier], 15, tier, lp)
            for _ in range(100):  # the worker is forked after the listener opens
                if children(p.pid):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{tier}: no worker process 5 s after its port opened; log {lp}")
        self.proc[tier] = p

    def fresh(self, tier: str):
        """A freshly started process for the memory workloads (W2-slow, W6): an allocator that
        kept the memory of earlier workloads would hide growth. Proxies are restarted (and
        warmed again before the next round); the direct tier gets a second fixture instance,
        stopped afterwards (the proxies keep pooled connections to the first one)."""
        if self.args.no_restart:
            return self.port[tier], None
        if tier == "direct":
            port = free_port()
            return port, self.start_fixture(port, None, "fixture-fresh")
        self.restart_proxy(tier)
        return self.port[tier], None

    def restart_proxy(self, tier: str) -> None:
        old = self.proc.pop(tier)
        self.procs.stop(old)
        self.procs.forget(old)
        self.start_proxy(tier)
        self.needs_warmup.add(tier)

    def tiers(self) -> list[str]:
        out = []
        for t in self.args.tier_list:
            if t in ("nginx", "haproxy") and not self.tools.get(t):
                continue
            out.append(t)
        return out

    def check_tiers(self) -> None:
        """Before measuring: every tier answers 200, every proxy injects the token and strips
        the key, and refuses an unknown key with 401."""
        for tier in self.tiers():
            port = self.port[tier]
            status, body = http_get(port, self.ctx, "/whoami", self.keys[0])
            text = body.decode(errors="replace")
            if status != 200:
                raise RuntimeError(f"{tier}: GET /whoami answered {status}: {text[:300]}")
            if tier != "direct":
                if f"authorization=Bearer {TOKEN}" not in text or "x-api-key=absent" not in text:
                    raise RuntimeError(f"{tier}: the upstream saw {text!r}; expected the injected "
                                       f"token and no x-api-key")
                status, _ = http_get(port, self.ctx, "/", "sk-" + "0" * 48)
                if status != 401:
                    raise RuntimeError(f"{tier}: an unknown key got {status}, not 401")
                status, _ = http_get(port, self.ctx, "/", self.big_key)
                if status != 200:
                    raise RuntimeError(f"{tier}: the h2 key got {status}")
            log(f"{tier}: OK on 127.0.0.1:{port} (credential rewritten, unknown key 401)"
                if tier != "direct" else f"direct: OK on 127.0.0.1:{port}")

    # ---- workloads

    def url(self, tier: str, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.port[tier]}{path}"

    def lua(self) -> str:
        return str(TEMPLATES / "rotate_keys.lua")

    def wrk_argv(self, tier: str, conns: int, secs: int, path: str, extra: list[str]) -> list[str]:
        return [self.tools["wrk"], "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s",
                "-s", self.lua(), self.url(tier, path), "--", str(WORK / "keys.txt")] + extra

    def wrk(self, tier: str, conns: int, secs: int, path: str, extra: list[str]) -> tuple[dict, str]:
        argv = self.wrk_argv(tier, conns, secs, path, extra)
        r = self.procs.run(argv, LOAD_CORE, secs + 30)
        out = r.stdout.decode(errors="replace")
        if r.returncode:
            raise RuntimeError(f"wrk exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
        return dict(parse_wrk(out), load_s=secs), shlex.join(self.procs.argv(argv, LOAD_CORE))

    def w1_h1(self, tier: str) -> tuple[dict, str]:
        return self.wrk(tier, 64, self.mode["wrk_s"], "/", ["GET", "0"])

    def w1_h2(self, tier: str, secs: int | None = None) -> tuple[dict, str]:
        secs = secs or self.mode["h2_s"]
        logf = TMP / f"h2load-{tier}.log"
        argv = [self.tools["h2load"], "-t1", "-c16", "-m16", "-D", str(secs),
                "-H", f"x-api-key: {self.big_key}", "--log-file", str(logf), self.url(tier)]
        r = self.procs.run(argv, LOAD_CORE, secs + 30)
        if r.returncode:
            raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
        return dict(parse_h2load(r.stdout.decode(errors="replace"), logf), load_s=secs), shlex.join(
            self.procs.argv(argv, LOAD_CORE))

    def w1_rate(self, tier: str) -> tuple[dict, str]:
        secs = self.mode["rate_s"]
        if self.tools.get("oha"):
            argv = [self.tools["oha"], "--no-tui", "-j", "-z", f"{secs}s", "-c", "16",
                    "-q", str(FIXED_RATE), "--latency-correction", "--cacert", str(self.ca),
                    "-H", f"x-api-key: {self.big_key}", self.url(tier)]
            try:
                r = self.procs.run(argv, LOAD_CORE, secs + 30)
                m = dict(parse_oha(r.stdout.decode(errors="replace")), load_s=secs)
                return m, shlex.join(self.procs.argv(argv, LOAD_CORE))
            except Exception as e:  # untested here (oha not installed): fall back, say so
                self.note(f"W1-rate: oha failed ({e}); used h2load --rps instead")
        logf = TMP / f"h2load-rate-{tier}.log"
        argv = [self.tools["h2load"], "--h1", "-t1", "-c16", "-m1", "--rps", str(FIXED_RATE // 16),
                "-D", str(secs), "-H", f"x-api-key: {self.big_key}", "--log-file", str(logf),
                self.url(tier)]
        r = self.procs.run(argv, LOAD_CORE, secs + 30)
        if r.returncode:
            raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
        return dict(parse_h2load(r.stdout.decode(errors="replace"), logf), load_s=secs), shlex.join(
            self.procs.argv(argv, LOAD_CORE))

    def w2_upload(self, tier: str) -> tuple[dict, str]:
        return self.wrk(tier, 8, self.mode["upload_s"], "/upload", ["POST", str(1 << 20)])

    def w5_resumed(self, tier: str) -> tuple[dict, str]:
        return self.wrk(tier, 32, self.mode["handshake_s"], "/", ["GET", "0", "close"])

    def w5_full(self, tier: str) -> tuple[dict, str]:
        """Full handshakes: h2load clients each open one connection (a fresh TLS session) for
        one request; batches of 200 (under every listener's accept backlog) back to back."""
        secs, batch = self.mode["handshake_s"], 200
        argv = [self.tools["h2load"], "--h1", "-t1", f"-c{batch}", f"-n{batch}",
                "-H", f"x-api-key: {self.big_key}", self.url(tier)]
        done = errors = batches = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < secs and batches < 10_000:
            r = self.procs.run(argv, LOAD_CORE, 60)
            if r.returncode:
                raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
            m = parse_h2load(r.stdout.decode(errors="replace"), None)
            done += m["requests"]
            errors += m["errors"] + (batch - m["requests"])
            batches += 1
        wall = time.monotonic() - t0
        return ({"requests": done, "rps": done / wall, "errors": errors, "batches": batches,
                 "load_s": wall},
                f"{shlex.join(self.procs.argv(argv, LOAD_CORE))}  (x{batches}, back to back)")

    def w3_sse(self, tier: str) -> tuple[dict, str]:
        events = self.mode["sse_events"]
        argv = [str(PROBE), "--url", self.url(tier, "/sse"), "--ca", str(self.ca),
                "--streams", str(SSE_STREAMS), "--events", str(events), "--gap-ms", str(SSE_GAP_MS),
                "--timeout-s", str(int(events * SSE_GAP_MS / 1000) + 20)]
        if tier != "direct":
            argv += ["--key", self.keys[1]]
        r = self.procs.run(argv, LOAD_CORE, events * SSE_GAP_MS / 1000 + 40)
        if r.returncode:
            raise RuntimeError(f"sse-probe exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
        m = json.loads(r.stdout.decode())
        m["requests"] = m["events"]
        m["load_s"] = events * SSE_GAP_MS / 1000
        return m, shlex.join(self.procs.argv(argv, LOAD_CORE))

    def fresh_target(self, tier: str) -> tuple[int, list[int], subprocess.Popen | None]:
        """(port, pids to watch, extra fixture to stop) on a freshly started process, after one
        request through it (pools, caches and lazy state set up)."""
        port, extra = self.fresh(tier)
        try:
            pids = [extra.pid] if extra else (self.pids(tier) or self.fixture_pids())
            status, body = http_get(port, self.ctx, "/", self.big_key)
            if status != 200:
                raise RuntimeError(f"first request after the restart: {status} {body[:200]!r}")
            time.sleep(0.2)
        except BaseException:
            if extra:
                self.procs.stop(extra)
                self.procs.forget(extra)
            raise
        return port, pids, extra

    def process_label(self, tier: str) -> str:
        if self.args.no_restart:
            return "fixture" if tier == "direct" else tier
        return "a fresh fixture" if tier == "direct" else f"{tier} (restarted)"

    def w2_slow(self, tier: str) -> tuple[dict, str]:
        """64 concurrent uploads that the fixture reads at 1 MiB/s; RSS every 100 ms."""
        n, nbytes = self.mode["slow_uploads"], self.mode["slow_bytes"]
        port, pids, extra = self.fresh_target(tier)
        try:
            budget = nbytes / SLOW_RATE + 20
            deadline = time.monotonic() + budget
            results: list[str | None] = ["not finished"] * n
            chunk = memoryview(b"\0" * 65536)

            def upload(i: int) -> None:
                try:
                    sock = open_tls(port, self.ctx, 10)
                    try:
                        sock.settimeout(budget)
                        sock.sendall((f"POST /upload?rate={SLOW_RATE} HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{port}\r\nx-api-key: {self.big_key}\r\n"
                                      f"Content-Length: {nbytes}\r\nConnection: close\r\n\r\n").encode())
                        sent = 0
                        while sent < nbytes and time.monotonic() < deadline:
                            k = min(len(chunk), nbytes - sent)
                            sock.sendall(chunk[:k])
                            sent += k
                        status, body = read_response(sock, deadline)
                        if status != 200 or body.strip() != str(nbytes).encode():
                            results[i] = f"status {status}, body {body[:80]!r}"
                        else:
                            results[i] = None
                    finally:
                        sock.close()
                except Exception as e:
                    results[i] = f"{type(e).__name__}: {e}"

            base = rss_kib(pids)
            c0 = cpu_us(pids)
            samples = [base]
            t0 = time.monotonic()
            threads = [threading.Thread(target=upload, args=(i,), daemon=True) for i in range(n)]
            for t in threads:
                t.start()
            for _ in range(int(budget * 10) + 10):
                if not any(t.is_alive() for t in threads) or time.monotonic() > deadline:
                    break
                samples.append(rss_kib(pids))
                time.sleep(0.1)
            secs = time.monotonic() - t0
            for t in threads:
                t.join(timeout=max(0.1, deadline - time.monotonic()))
            samples.append(rss_kib(pids))
            cpu = cpu_us(pids) - c0
        finally:
            if extra:
                self.procs.stop(extra)
                self.procs.forget(extra)
        errs = [r for r in results if r]
        m = {
            "requests": n, "upload_bytes": nbytes, "seconds": secs, "samples": len(samples),
            "rss_base_mib": base / 1024, "rss_max_mib": max(samples) / 1024,
            "rss_end_mib": samples[-1] / 1024, "rss_growth_mib": (max(samples) - base) / 1024,
            "rss_growth_kib_per_upload": (max(samples) - base) / n,
            "cpu_us_per_req": cpu / n,
            "errors": len(errs), "error_messages": errs[:3],
            "process": self.process_label(tier),
        }
        return m, (f"{n} Python TLS clients: POST /upload?rate={SLOW_RATE} of {nbytes} bytes each, "
                   f"one key; RSS of {m['process']} every 100 ms")

    def w6_idle(self, tier: str) -> tuple[dict, str]:
        """N TLS connections, one request each, kept open; (RSS after - RSS before) / N. Opened
        by 4 threads that resume the first connection's TLS session (verified when it was
        made; it halves the client's cost). keygate's header_read_timeout and HAProxy's
        http-keep-alive timeout, 10 s by default, are 60 s in the bench configs so that the
        first connections are still open when the last one is made."""
        n, nthreads = self.mode["idle_conns"], 4
        port, pids, extra = self.fresh_target(tier)
        socks: list[ssl.SSLSocket] = []
        errors: list[str] = []
        lock = threading.Lock()
        req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {self.big_key}\r\n\r\n".encode()
        closed = 0

        def one(session) -> ssl.SSLSocket | None:
            try:
                s = open_tls(port, self.ctx, 5, session)
            except OSError as e:
                with lock:
                    errors.append(f"connect: {e}")
                return None
            with lock:
                socks.append(s)
            try:
                s.sendall(req)
                status, _ = read_response(s, time.monotonic() + 5)
                if status != 200:
                    with lock:
                        errors.append(f"status {status}")
            except (OSError, ValueError) as e:
                with lock:
                    errors.append(f"request: {type(e).__name__}: {e}")
            return s

        def opener(count: int, session, deadline: float) -> None:
            for _ in range(count):
                if time.monotonic() > deadline or len(errors) > 20:
                    return
                one(session)

        try:
            before = rss_kib(pids)
            c0 = cpu_us(pids)
            t0 = time.monotonic()
            deadline = t0 + 40.0  # idle timeouts: keygate and HAProxy 60 s here, nginx 75 s
            first = one(None)
            session = first.session if first else None
            threads = [threading.Thread(target=opener, daemon=True,
                                        args=((n - 1) // nthreads + (1 if i < (n - 1) % nthreads else 0),
                                              session, deadline))
                       for i in range(nthreads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(0.1, deadline + 6 - time.monotonic()))
            open_s = time.monotonic() - t0
            if len(socks) < n and not errors:
                self.note(f"W6 on {tier}: opened only {len(socks)} of {n} connections in "
                          f"{open_s:.1f} s (a slow client, not a server error); KiB/conn is over "
                          f"those opened")
            if open_s > 50:
                errors.append(f"opening took {open_s:.0f} s: the first connections may have "
                              f"reached an idle timeout")
            cpu = cpu_us(pids) - c0
            time.sleep(0.2)
            after = rss_kib(pids)
            # Still open? A connection the server closed polls readable (EOF).
            with lock:
                held = list(socks)
            poller = select.poll()
            for s in held:
                poller.register(s.fileno(), select.POLLIN)
            closed = len(poller.poll(0))
            reused = sum(1 for s in held if s.session_reused)
        finally:
            with lock:
                for s in socks:
                    try:
                        s.close()
                    except OSError:
                        pass
            if extra:
                self.procs.stop(extra)
                self.procs.forget(extra)
        if closed:
            errors.append(f"{closed} connections were closed by the server before the RSS reading")
        opened = len(held)
        m = {
            "requests": opened, "connections": opened, "connections_wanted": n,
            "open_seconds": open_s,
            "resumed_sessions": reused,
            "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
            "kib_per_conn": (after - before) / opened if opened else None,
            "cpu_us_per_conn": cpu / opened if opened else None,
            "errors": len(errors), "error_messages": errors[:3],
            "process": self.process_label(tier),
        }
        return m, (f"Python TLS client, {nthreads} threads: {n} connections (TLS session resumed "
                   f"after the first), one GET each (one key), kept open; RSS of {m['process']}")

    # ---- W7: reloads under load

    def kg_readyz(self) -> dict:
        """keygate's /readyz on the admin listener (no key needed): {"config": {"generation"...}}."""
        status, body = http_get(self.ports["keygate_admin"], self.ctx, "/readyz", None, timeout=3.0)
        try:
            return json.loads(body)
        except ValueError:
            raise RuntimeError(f"/readyz answered {status}: {body[:200]!r}") from None

    def kg_generation(self) -> int:
        return int(self.kg_readyz()["config"]["generation"])

    def kg_config_state(self) -> tuple[int, str | None]:
        """(config generation, the last reload's refusal or None), from /readyz."""
        cfg = self.kg_readyz()["config"]
        return int(cfg["generation"]), cfg.get("last_reload_error")

    def kg_cli(self, args: list[str], timeout: float = 30) -> str:
        """A keygate command on the bench config (on the harness's core, as the load generator)."""
        env = dict(os.environ, KEYGATE_LOG="warn")
        r = self.procs.run([str(KEYGATE), "--config", str(WORK / "keygate.toml")] + args, None,
                           timeout, env=env)
        if r.returncode:
            raise RuntimeError(f"keygate {' '.join(args[:2])} exited {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        return r.stdout.decode(errors="replace")

    def kg_reload(self, t0: float, state0: tuple[int, str | None]) -> dict:
        """`keygate reload`, then wait (<= 10 s) for /readyz to show a newer generation (state0:
        kg_config_state() before). ms: from t0 to the new generation seen; cli_ms: the
        `keygate reload` command alone (it checks the file, then signals the server)."""
        gen0, err0 = state0
        self.kg_cli(["reload"])
        cli_ms = round(1000 * (time.monotonic() - t0), 1)
        deadline = time.monotonic() + 10
        while True:
            cfg = self.kg_readyz()["config"]
            if cfg["generation"] > gen0:
                if cfg.get("last_reload_error"):
                    raise RuntimeError(f"reload error: {cfg['last_reload_error']}")
                return {"ok": True, "generation": cfg["generation"],
                        "ms": round(1000 * (time.monotonic() - t0), 1), "cli_ms": cli_ms,
                        "needs_restart": cfg.get("needs_restart") or []}
            if cfg.get("last_reload_error") and cfg["last_reload_error"] != err0:
                raise RuntimeError(f"reload refused: {cfg['last_reload_error']}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"generation still {cfg['generation']} 10 s after `keygate "
                                   f"reload` (last reload error: {cfg.get('last_reload_error')})")
            time.sleep(0.05)

    def kg_config_text(self, changed: bool) -> str:
        """The bench config, or the same with a harmless change (the admin quota; the proxy
        plane does not use it)."""
        text = self.w7_original_cfg
        if not changed:
            return text
        old = "admin = { per_second = 100000, burst = 100000 }"
        if old not in text:
            raise RuntimeError("keygate.toml: the [limits] admin line to change was not found")
        return text.replace(old, "admin = { per_second = 99999, burst = 100000 }  "
                                 "# W7: a harmless change, put back by the next config reload")

    def reload_once(self, tier: str, i: int) -> dict:
        """The i-th reload of W7 on the tier; returns what happened (raises on a failure)."""
        t0 = time.monotonic()
        if tier == "keygate":
            state0 = self.kg_config_state()
            if i % 2 == 0:
                self.w7_cfg_changed = not self.w7_cfg_changed
                (WORK / "keygate.toml").write_text(self.kg_config_text(self.w7_cfg_changed))
                res = self.kg_reload(t0, state0)
                res["kind"] = "config " + ("changed" if self.w7_cfg_changed else "put back")
                return res
            key = self.kg_cli(["keys", "create", "--name", f"w7-reload-{i + 1}"]).strip()
            if not key.startswith("sk-"):
                raise RuntimeError("keys create printed no key")
            created_ms = round(1000 * (time.monotonic() - t0), 1)
            res = self.kg_reload(time.monotonic(), state0)
            res.update(kind="key created", keys_create_ms=created_ms)
            # The key-set change took effect: the new key is accepted (the server reads the
            # store's key revision every 250 ms).
            deadline = time.monotonic() + 3
            while True:
                status, _ = http_get(self.port[tier], self.ctx, "/", key, timeout=3.0)
                if status == 200:
                    res["new_key_ms"] = round(1000 * (time.monotonic() - t0), 1)
                    return res
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the new key still gets {status} 3 s after it was created")
                time.sleep(0.05)
        master = self.proc[tier].pid
        before = set(children(master))
        sig = signal.SIGHUP if tier == "nginx" else signal.SIGUSR2
        # HAProxy's master re-executes itself on SIGUSR2, and a SIGUSR2 that arrives before
        # the new master has finished loading is lost: a reload is done when the master logs
        # "Loading success." (a new worker is forked a little before that).
        lp = WORK / f"{tier}.log"
        off = lp.stat().st_size if lp.exists() else 0
        os.kill(master, sig)
        deadline = time.monotonic() + 15
        while True:
            new = set(children(master)) - before
            loaded = True
            if tier == "haproxy":
                with open(lp, "rb") as f:
                    f.seek(off)
                    text = f.read().decode(errors="replace")
                if "Loading failure" in text:
                    raise RuntimeError(f"HAProxy: {text.strip()[-300:]}")
                loaded = "Loading success" in text
            if new and loaded:
                return {"ok": True, "kind": f"{signal.Signals(sig).name} to the master",
                        "ms": round(1000 * (time.monotonic() - t0), 1),
                        "old_workers": sorted(before), "new_workers": sorted(new)}
            if self.proc[tier].poll() is not None:
                raise RuntimeError(f"the {tier} master exited ({self.proc[tier].returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tier}: no new worker (or not loaded) 15 s after "
                                   f"{signal.Signals(sig).name}")
            time.sleep(0.02)

    def kg_restore(self) -> None:
        """Puts keygate's config back as it was before W7 (after a failure midway)."""
        if not self.w7_cfg_changed:
            return
        (WORK / "keygate.toml").write_text(self.w7_original_cfg)
        self.w7_cfg_changed = False
        self.kg_reload(time.monotonic(), self.kg_config_state())
        self.note("W7: keygate's config was put back by an extra reload after the workload")

    def w7_reload(self, tier: str) -> tuple[dict, str]:
        """A W1-h1 load (wrk -c64, 10,000 keys rotating) with W7_RELOADS reloads evenly spaced
        (at 1/5, 2/5, ... of the duration), on the long-running processes."""
        secs = self.mode["wrk_s"]
        if self.args.quick:
            secs = max(secs, W7_MIN_QUICK_S)
        if tier == "keygate":
            self.w7_original_cfg = (WORK / "keygate.toml").read_text()
            self.w7_cfg_changed = False
            gen_start = self.kg_generation()
        argv = self.wrk_argv(tier, 64, secs, "/", ["GET", "0"])
        lp = TMP / f"w7-wrk-{tier}.log"
        lp.unlink(missing_ok=True)
        reloads: list[dict] = []
        p = self.procs.start("wrk (W7)", argv, LOAD_CORE, lp)
        t0 = time.monotonic()
        try:
            for i in range(W7_RELOADS):
                delay = t0 + secs * (i + 1) / (W7_RELOADS + 1) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                entry: dict = {"n": i + 1, "at_s": round(time.monotonic() - t0, 2)}
                if p.poll() is not None:
                    entry.update(ok=False, error=f"wrk ended early (exit {p.returncode})")
                    reloads.append(entry)
                    break
                try:
                    entry.update(self.reload_once(tier, i))
                except Exception as e:
                    entry.update(ok=False, error=f"{type(e).__name__}: {e}")
                reloads.append(entry)
                log(f"    W7 {tier} reload {i + 1} at {entry['at_s']:.2f} s: "
                    + (f"{entry.get('kind')}, applied in {entry.get('ms')} ms"
                       + (f" (the command: {entry['cli_ms']} ms)" if "cli_ms" in entry else "")
                       + (f", generation {entry['generation']}" if "generation" in entry else "")
                       + (f", workers {entry.get('old_workers')} -> {entry.get('new_workers')}"
                          if "new_workers" in entry else "")
                       if entry.get("ok") else f"FAILED: {entry.get('error')}"))
            try:
                p.wait(timeout=max(1.0, t0 + secs + 30 - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"wrk overran {secs + 30} s") from None
        finally:
            if p.poll() is None:
                self.procs.stop(p, grace=1.0)
            self.procs.forget(p)
            if tier == "keygate":
                self.kg_restore()
        out = lp.read_text(errors="replace")
        if p.returncode:
            raise RuntimeError(f"wrk exited {p.returncode}: {out[-500:]}")
        m = dict(parse_wrk(out), load_s=secs)
        r = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m|h)\b", out, re.M)
        m["max_ms"] = float(r.group(1)) * UNIT_MS[r.group(2)] if r else None
        ok = [e for e in reloads if e.get("ok")]
        m["reloads"] = len(ok)
        m["reloads_wanted"] = W7_RELOADS
        m["reloads_failed"] = len(reloads) - len(ok)
        m["reload_ms_max"] = max((e["ms"] for e in ok), default=None)
        m["reload_log"] = reloads
        if m["reloads_failed"] or len(reloads) < W7_RELOADS:
            m["error_messages"] = [f"reload {e['n']}: {e['error']}" for e in reloads
                                   if not e.get("ok")][:3] or ["fewer reloads than planned"]
        if tier == "keygate":
            m["generation_start"] = gen_start
            m["generation"] = self.kg_generation()
            m["generations"] = [e.get("generation") for e in reloads]
            if m["generation"] - gen_start < len(ok):
                self.note(f"W7: keygate's generation went from {gen_start} to {m['generation']} "
                          f"over {len(ok)} reloads")
        else:
            # Before the next workload: the old workers have finished their connections (wrk
            # has ended) and exited, so that pids() measures the new worker alone.
            master = self.proc[tier].pid
            deadline = time.monotonic() + 15
            while len(children(master)) > 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            m["workers_after"] = len(children(master))
            if m["workers_after"] != 1:
                self.note(f"W7 on {tier}: {m['workers_after']} worker processes 15 s after the "
                          f"load ended (old workers still draining?)")
        cmd = shlex.join(self.procs.argv(argv, LOAD_CORE))
        how = {"keygate": "keygate --config keygate.toml reload (after a config edit or keys create)",
               "nginx": "kill -HUP <nginx master>", "haproxy": "kill -USR2 <haproxy master (-W)>"}
        return m, f"{cmd}  + {W7_RELOADS} x {how[tier]}"

    # ---- running

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            log("note: " + msg)

    def workloads(self) -> list[str]:
        out = []
        order = [w for w in WORKLOADS if w not in MEMORY_WORKLOADS] + list(MEMORY_WORKLOADS)
        for w in order:
            spec = WORKLOADS[w]
            if self.args.only is not None:
                if not any(w == o or w.startswith(o + "-") for o in self.args.only):
                    continue
            elif spec.get("full_only") and self.args.quick:
                self.skipped.append({"workload": w, "tier": "*",
                                     "reason": "full mode only (run without --quick, or --only W1-rate)"})
                continue
            missing = [t for t in spec["tools"] if not self.tools.get(t)]
            how = "; ".join(INSTALL[t] for t in missing)
            if w == "W1-rate" and not (self.tools.get("h2load") or self.tools.get("oha")):
                missing, how = ["h2load or oha"], f"{INSTALL['h2load']}, or {INSTALL['oha']}"
            if missing:
                self.skipped.append({"workload": w, "tier": "*",
                                     "reason": f"needs {', '.join(missing)} ({how})"})
                continue
            out.append(w)
        return out

    def check_alive(self, when: str) -> None:
        for name, p in list(self.proc.items()):
            if p.poll() is None:
                continue
            tail = (WORK / f"{name}.log").read_text(errors="replace")[-600:] \
                if (WORK / f"{name}.log").exists() else ""
            if name == "fixture":
                raise RuntimeError(f"the fixture died (exit {p.returncode}) {when}: {tail}")
            self.note(f"{name} had exited (code {p.returncode}) {when}; restarted it. Log tail: {tail!r}")
            self.procs.forget(p)
            self.start_proxy(name)
            self.needs_warmup.add(name)

    def run_one(self, rnd: int, workload: str, tier: str) -> None:
        fn = {"W1-h1": self.w1_h1, "W1-h2": self.w1_h2, "W1-rate": self.w1_rate,
              "W2-upload": self.w2_upload, "W2-slow": self.w2_slow, "W3-sse": self.w3_sse,
              "W5-full": self.w5_full, "W5-resumed": self.w5_resumed,
              "W6-idle": self.w6_idle, "W7-reload": self.w7_reload}[workload]
        self.check_alive(f"before {workload} on {tier}, round {rnd}")
        own = workload in OWN_ACCOUNTING  # these replace the process(es) and account for themselves
        pids = [] if own else self.pids(tier)
        fpids = [] if own else self.fixture_pids()
        c0, f0, t0 = cpu_us(pids), cpu_us(fpids), time.monotonic()
        other = OtherLoad()
        rec = {"round": rnd, "tier": tier, "workload": workload}
        try:
            m, cmd = fn(tier)
            rec["command"] = re.sub(r"sk-[A-Za-z0-9]{48}", "KEY", cmd)  # no keys in the results
        except Exception as e:
            rec["failed"] = f"{type(e).__name__}: {e}"
            self.measurements.append(rec)
            log(f"  {workload:<13} {tier:<8} FAILED: {rec['failed'][:300]}")
            return
        c1, f1 = cpu_us(pids), cpu_us(fpids)
        reqs = m.get("requests") or 0
        m["wall_s"] = time.monotonic() - t0
        m["other_cpu_pct"], m["steal_pct"] = other.done()
        if pids:
            m["proxy_cpu_s"] = (c1 - c0) / 1e6
            if m.get("load_s"):
                m["proxy_cpu_pct"] = 100 * m["proxy_cpu_s"] / m["load_s"]
            if reqs:
                key = "cpu_us_per_event" if workload == "W3-sse" else "cpu_us_per_req"
                m[key] = (c1 - c0) / reqs
            m["rss_mib"] = rss_kib(pids) / 1024
        if fpids and reqs:
            m["fixture_cpu_us_per_req"] = (f1 - f0) / reqs
        rec["metrics"] = m
        self.measurements.append(rec)
        shown = {k: m.get(k) for k, *_ in COLUMNS[workload]}
        shown["other%"] = m["other_cpu_pct"]
        log(f"  {workload:<13} {tier:<8} " + " ".join(
            f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, (int, float)))
            + f" errors={m.get('errors', 0)}")
        if m.get("errors"):
            log(f"    errors: {m.get('error_messages') or m.get('socket_errors_detail') or ''} "
                f"non-2xx={m.get('non_2xx', '')}")

    def warm_up(self, tiers: list[str], secs: int, h2: bool) -> None:
        log(f"warm-up: {', '.join(tiers)} ({secs} s each)")
        for tier in tiers:
            try:
                if self.tools.get("wrk"):
                    self.wrk(tier, 64, secs, "/", ["GET", "0"])
                if h2 and self.tools.get("h2load"):
                    self.w1_h2(tier, secs)
            except Exception as e:
                self.note(f"warm-up on {tier} failed: {e}")

    def run(self) -> None:
        workloads = self.workloads()
        tiers = self.tiers()
        for t in self.args.tier_list:
            if t not in tiers:
                self.skipped.append({"workload": "*", "tier": t,
                                     "reason": f"{t} not installed ({INSTALL[t]})"})
        log(f"tiers: {', '.join(tiers)}; workloads: {', '.join(workloads)}; "
            f"rounds: {self.args.rounds}")
        quick = self.args.quick
        h2 = not quick and any(w in workloads for w in ("W1-h2", "W1-rate"))
        self.warm_up([t for t in tiers if not (quick and t == "direct")], self.mode["warmup_s"], h2)
        budget = self.mode["budget_s"]
        for rnd in range(1, self.args.rounds + 1):
            if self.needs_warmup:
                # The memory workloads of the last round left the proxies holding thousands of
                # connections' worth of memory: restart them once more so that every round
                # starts alike, and fill the key caches again (10,000 keys).
                again = [t for t in tiers if t in self.needs_warmup]
                for t in again:
                    self.restart_proxy(t)
                self.warm_up(again, 1 if quick else 2, False)
                self.needs_warmup.clear()
            log(f"round {rnd}/{self.args.rounds}")
            for w in workloads:
                for tier in tiers:
                    if tier == "direct" and w in PROXY_ONLY:
                        if rnd == 1:
                            self.skipped.append({"workload": w, "tier": tier,
                                                 "reason": PROXY_ONLY[w]})
                        continue
                    if time.monotonic() - self.started_at > budget:
                        self.skipped.append({"workload": w, "tier": tier, "round": rnd,
                                             "reason": f"time budget of {budget} s used up"})
                        continue
                    self.run_one(rnd, w, tier)


# ---------------------------------------------------------------- reporting


def fmt(v, how: str) -> str:
    if v is None:
        return "—"
    if how == "k":
        return f"{v / 1000:.1f}k" if abs(v) >= 1000 else f"{v:.0f}"
    return f"{v:.{int(how[1:])}f}"


def med_range(vals: list, how: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt(vals[0], how)
    return f"{fmt(statistics.median(vals), how)} ({fmt(min(vals), how)}–{fmt(max(vals), how)})"


def summarise(measurements: list[dict]) -> dict:
    """{workload: {tier: {metric: [per-round values]}}, plus per-round ratios keygate / peer."""
    out: dict = {}
    for rec in measurements:
        m = rec.get("metrics")
        if not m:
            continue
        w = out.setdefault(rec["workload"], {"tiers": {}, "ratios": {}})
        t = w["tiers"].setdefault(rec["tier"], {"_rounds": [], "_errors": 0, "_failed": 0})
        t["_rounds"].append(rec["round"])
        t["_errors"] += m.get("errors") or 0
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                t.setdefault(k, []).append(v)
    for rec in measurements:
        if rec.get("failed"):
            w = out.setdefault(rec["workload"], {"tiers": {}, "ratios": {}})
            w["tiers"].setdefault(rec["tier"], {"_rounds": [], "_errors": 0, "_failed": 0})["_failed"] += 1
    by_key = {(r["workload"], r["tier"], r["round"]): r.get("metrics") for r in measurements}
    for wname, w in out.items():
        for peer in PEERS:
            ratios: dict = {}
            for metric, *_ in COLUMNS.get(wname, []):
                vals = []
                for rnd in sorted({r["round"] for r in measurements}):
                    a = by_key.get((wname, "keygate", rnd))
                    b = by_key.get((wname, peer, rnd))
                    if a and b and a.get(metric) and b.get(metric):
                        vals.append(a[metric] / b[metric])
                if vals:
                    ratios[metric] = vals
            if ratios:
                w["ratios"][peer] = ratios
    return out


def write_markdown(path: Path, meta: dict, summary: dict, skipped: list, notes: list,
                   failed: list, measurements: list) -> None:
    commands: dict = {}
    for rec in measurements:
        if rec.get("command") and (rec["tier"] == "keygate" or rec["workload"] not in commands):
            commands.setdefault(rec["workload"], rec["command"])
            if rec["tier"] == "keygate":
                commands[rec["workload"]] = rec["command"]
    L = []
    L.append("# keygate side-by-side benchmark")
    L.append("")
    L.append(f"commit `{meta['commit']}`{' (dirty tree)' if meta.get('dirty') else ''}, "
             f"{meta['date']}, {meta['nproc']} CPUs, "
             f"{'quick' if meta['quick'] else 'full'} mode, {meta['rounds']} "
             f"round{'s' if meta['rounds'] != 1 else ''}, "
             f"{'pinned: proxy on core 0, fixture + load generator on core 1' if meta['pinned'] else 'unpinned'}, "
             f"keygate upstream {meta.get('keygate_upstream', 'h2')}, "
             f"{meta['seconds']:.0f} s.")
    L.append("")
    L.append("Each cell: median over the rounds (min–max). Ratios are keygate ÷ peer, taken round "
             "by round (the tiers run interleaved, one at a time), then median (min–max); for "
             "req/s higher is better for keygate, for CPU, latency and memory lower is. "
             "CPU is utime+stime of the proxy process (nginx, HAProxy: the worker) per request; "
             "\"fixture µs/req\" is the upstream's own cost. Errors are summed over the rounds "
             "(non-2xx/3xx answers + socket errors; must be 0). keygate talks HTTP/2 to the "
             "fixture (it offers h2 by ALPN), nginx and HAProxy HTTP/1.1 (their configs in "
             "benches/templates), so the fixture's share of the load generator's core differs "
             "by tier; the proxy's own CPU µs/req is the fairest figure. Every proxy injects the "
             "same token and enforces 1000 r/s (burst 2000) per key; the one key used alone "
             "(h2, W1-rate, W2-slow, W5-full, W6) has a quota of 1,000,000 r/s in keygate and "
             "no limit in nginx/HAProxy. Idle keep-alive timeouts are 60 s in keygate "
             "(server.header_read_timeout) and HAProxy (timeout http-keep-alive) instead of "
             "their 10 s defaults, so that W6 can hold its connections; nginx's is 75 s.")
    L.append("")
    if meta.get("other_cpu_pct_mean") is not None:
        L.append(f"Other processes on this machine used {meta['other_cpu_pct_mean']:.0f} % of a core "
                 f"on average during the measurements (max {meta['other_cpu_pct_max']:.0f} %), "
                 f"steal {meta['steal_pct_mean']:.0f} %."
                 + (" **The machine was not quiet: absolute numbers are disturbed; the per-round "
                    "ratios less so.**" if meta["other_cpu_pct_mean"] > 10 else ""))
        L.append("")
    for wname, spec in WORKLOADS.items():
        if wname not in summary:
            continue
        w = summary[wname]
        cols = COLUMNS[wname]
        L.append(f"## {wname}: {spec['title']}")
        L.append("")
        extra = ""
        if wname in MEMORY_WORKLOADS:
            extra = (" Measured on the long-running processes (--no-restart)." if meta.get("no_restart")
                     else " Measured on freshly started processes (each proxy restarted just before, "
                          "then warmed again before the next round; direct: a second fixture "
                          "instance), so that memory an allocator kept from earlier workloads does "
                          "not hide growth.")
        L.append(f"Load: {spec['load']}.{extra}")
        if commands.get(wname):
            L.append("")
            L.append(f"Command (keygate tier): `{commands[wname]}`")
        L.append("")
        L.append("| tier | " + " | ".join(c[1] for c in cols) + " | errors |")
        L.append("|---|" + "---|" * (len(cols) + 1))
        for tier in TIERS:
            t = w["tiers"].get(tier)
            if not t:
                continue
            cells = [med_range(t.get(c[0], []), c[2]) for c in cols]
            err = str(t["_errors"])
            if t["_failed"]:
                err += f" ({t['_failed']} runs failed)"
            if t["_errors"] or t["_failed"]:
                err = f"**{err}**"
            name = tier + ((" (fixture)" if meta.get("no_restart") else " (fresh fixture)")
                           if tier == "direct" and wname in MEMORY_WORKLOADS else "")
            L.append(f"| {name} | " + " | ".join(cells) + f" | {err} |")
        unsat = []
        for tier in TIERS:
            pct = w["tiers"].get(tier, {}).get("proxy_cpu_pct")
            if pct and statistics.median(pct) < 85:
                unsat.append(f"{tier} {statistics.median(pct):.0f} %")
        if unsat and any(c[0] == "proxy_cpu_pct" for c in cols):
            L.append("")
            L.append(f"Not saturated (median proxy CPU: {', '.join(unsat)}): the load generator "
                     f"and fixture core limited these runs, so req/s understates the proxy; "
                     f"its CPU µs/req is the figure to compare.")
        rcols = [c for c in cols if c[3] is not None]
        if w["ratios"] and rcols:
            L.append("")
            L.append("| keygate ÷ | " + " | ".join(c[1] for c in rcols) + " |")
            L.append("|---|" + "---|" * len(rcols))
            for peer in PEERS:
                r = w["ratios"].get(peer)
                if not r:
                    continue
                L.append(f"| {peer} | " + " | ".join(
                    (med_range(r.get(c[0], []), "f2") + ("×" if r.get(c[0]) else ""))
                    for c in rcols) + " |")
        if wname == "W7-reload":
            L.extend(w7_details(measurements))
        L.append("")
    if skipped or failed:
        L.append("## Skipped or failed")
        L.append("")
        for s in skipped:
            where = s["workload"] if s["tier"] == "*" else f"{s['workload']} on {s['tier']}"
            if "round" in s:
                where += f" (round {s['round']})"
            L.append(f"- {where}: {s['reason']}")
        for f in failed:
            L.append(f"- {f['workload']} on {f['tier']} (round {f['round']}) failed: {f['failed'][:300]}")
        L.append("")
    L.append("## Not measured by this harness")
    L.append("")
    for k, v in NOT_MEASURED.items():
        L.append(f"- {k}: {v}")
    L.append("")
    if notes:
        L.append("## Notes")
        L.append("")
        for n in notes:
            L.append(f"- {n}")
        L.append("")
    path.write_text("\n".join(L))


def w7_details(measurements: list) -> list[str]:
    """W7: what each reload was, when, how long it took to apply, and the errors per round."""
    L = ["", "Reloads (time into the load: what, trigger → applied):", ""]
    for rec in sorted((r for r in measurements if r["workload"] == "W7-reload"),
                      key=lambda r: (r["round"], TIERS.index(r["tier"]))):
        m = rec.get("metrics")
        if not m:
            continue
        parts = []
        for e in m.get("reload_log", []):
            if e.get("ok"):
                txt = f"{e['at_s']:.1f} s {e.get('kind', '')} {e['ms']:.0f} ms"
                if "generation" in e:
                    txt += f" → gen {e['generation']}"
                parts.append(txt)
            else:
                parts.append(f"{e['at_s']:.1f} s **failed**: {e.get('error', '')[:120]}")
        errs = m.get("errors", 0)
        detail = m.get("socket_errors_detail") or {}
        sock = ", ".join(f"{k} {v}" for k, v in detail.items() if v)
        tail = (f"{errs} errors in {m.get('requests', 0)} requests"
                + (f" (non-2xx {m.get('non_2xx', 0)}; socket: {sock})" if errs else "")
                + (f", max latency {m['max_ms']:.0f} ms" if m.get("max_ms") is not None else ""))
        gen = f", final generation {m['generation']}" if "generation" in m else ""
        L.append(f"- round {rec['round']}, {rec['tier']}: {m.get('reloads', 0)}/"
                 f"{m.get('reloads_wanted', W7_RELOADS)} reloads ({'; '.join(parts)}){gen}; {tail}")
    return L


def svg_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(path: Path, meta: dict, summary: dict) -> None:
    panels = [c for c in CHART if c[0] in summary
              and any(summary[c[0]]["tiers"].get(t, {}).get(c[1]) for t in TIERS)]
    pw, ph, cols = 470, 30 + 26 * len(TIERS) + 24, 2
    rows = max(1, math.ceil(len(panels) / cols))
    W, H = 20 + cols * (pw + 20), 70 + rows * (ph + 16) + 30
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="20" y="28" font-size="18" font-weight="bold">keygate vs direct vs nginx vs '
         f'HAProxy</text>',
         f'<text x="20" y="48" fill="#444">{svg_escape(meta["commit"])} · {meta["date"]} · '
         f'{meta["nproc"]} CPUs · {"quick" if meta["quick"] else "full"} · {meta["rounds"]} '
         f'round{"s" if meta["rounds"] != 1 else ""} · '
         f'bar = median, line = min–max over rounds</text>']
    legend_x = W - 20 - 4 * 90
    for i, t in enumerate(TIERS):
        x = legend_x + i * 90
        o.append(f'<rect x="{x}" y="20" width="12" height="12" fill="{COLORS[t]}"/>'
                 f'<text x="{x + 16}" y="30">{t}</text>')
    for i, (wname, metric, label, higher, *how) in enumerate(panels):
        px, py = 20 + (i % cols) * (pw + 20), 64 + (i // cols) * (ph + 16)
        tiers = summary[wname]["tiers"]
        vals = {t: [v for v in tiers.get(t, {}).get(metric, []) if v is not None] for t in TIERS}
        vmax = max((max(v) for v in vals.values() if v), default=1.0) or 1.0
        o.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ddd"/>')
        o.append(f'<text x="{px + 8}" y="{py + 18}" font-weight="bold">{svg_escape(label)}</text>')
        o.append(f'<text x="{px + pw - 8}" y="{py + 18}" text-anchor="end" fill="#666">'
                 f'{"higher" if higher else "lower"} is better</text>')
        bx, bw = px + 72, pw - 72 - 70
        for j, t in enumerate(TIERS):
            y = py + 30 + j * 26
            o.append(f'<text x="{bx - 6}" y="{y + 14}" text-anchor="end">{t}</text>')
            v = vals[t]
            if not v:
                why = ("n/a (no proxy process)" if t == "direct" and metric.startswith("cpu")
                       else f"n/a ({PROXY_ONLY[wname]})" if t == "direct" and wname in PROXY_ONLY
                       else "not measured")
                o.append(f'<text x="{bx + 4}" y="{y + 14}" fill="#999">{why}</text>')
                continue
            med = statistics.median(v)
            w_ = max(1.0, bw * med / vmax)
            o.append(f'<rect x="{bx}" y="{y + 3}" width="{w_:.1f}" height="16" fill="{COLORS[t]}"/>')
            if len(v) > 1:
                x0, x1 = bx + bw * min(v) / vmax, bx + bw * max(v) / vmax
                o.append(f'<line x1="{x0:.1f}" y1="{y + 11}" x2="{x1:.1f}" y2="{y + 11}" '
                         f'stroke="black" stroke-width="1.5"/>'
                         f'<line x1="{x0:.1f}" y1="{y + 6}" x2="{x0:.1f}" y2="{y + 16}" stroke="black"/>'
                         f'<line x1="{x1:.1f}" y1="{y + 6}" x2="{x1:.1f}" y2="{y + 16}" stroke="black"/>')
            if how:
                text = fmt(med, how[0])
            else:
                text = f"{med / 1000:.1f}k" if med >= 10_000 else (f"{med:.0f}" if med >= 100 else f"{med:.2f}")
            o.append(f'<text x="{bx + bw + 6}" y="{y + 14}">{text}</text>')
            errs = tiers.get(t, {}).get("_errors", 0) + tiers.get(t, {}).get("_failed", 0)
            if errs and metric != "errors":  # (the errors panel shows them as its bars)
                o.append(f'<text x="{bx + 4}" y="{y + 15}" fill="#d62728" font-weight="bold">'
                         f'{errs} errors</text>')
        # keygate ÷ each peer: the median of the per-round ratios
        ratios = summary[wname]["ratios"]
        parts = []
        for peer in ("nginx", "haproxy", "direct"):
            r = ratios.get(peer, {}).get(metric)
            if r:
                parts.append(f"{peer} {statistics.median(r):.2f}×")
        if parts:
            o.append(f'<text x="{px + 8}" y="{py + ph - 8}" fill="#1f77b4">keygate ÷ '
                     f'{svg_escape(", ".join(parts))}</text>')
    o.append(f'<text x="20" y="{H - 12}" fill="#666">benches/compare.py · details and errors in '
             f'latest.md / latest.json</text>')
    o.append("</svg>")
    path.write_text("\n".join(o) + "\n")


# ---------------------------------------------------------------- main


def find_tools() -> dict[str, str | None]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return {t: shutil.which(t, path=path) for t in INSTALL}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, short runs (< 3 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    ap.add_argument("--only", help="workloads, e.g. W1,W3,W7 or W1-h2 (W4 is not measured here)")
    ap.add_argument("--tiers", default=",".join(TIERS), help="default: direct,keygate,nginx,haproxy")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    ap.add_argument("--no-restart", action="store_true",
                    help="W2-slow and W6 on the long-running processes (default: restarted, since "
                         "memory kept by the allocator from earlier workloads hides growth)")
    ap.add_argument("--unpinned", action="store_true", help="no taskset (bench.md: also report an unpinned run)")
    ap.add_argument("--keygate-upstream", choices=["h2", "h1"], default="h2",
                    help="keygate's protocol to the fixture: h2 by ALPN (the default config) or "
                         "HTTP/1.1 only ([upstream] http2 = false, as nginx and HAProxy are run)")
    ap.add_argument("--report-only", action="store_true",
                    help="only render latest.md and latest.svg again from latest.json")
    args = ap.parse_args()
    if args.report_only:
        return report_only()
    mode = MODES["quick" if args.quick else "full"]
    args.rounds = args.rounds or mode["rounds"]
    if not 1 <= args.rounds <= 50:
        ap.error("--rounds must be between 1 and 50")
    names = {w.lower(): w for w in WORKLOADS}
    names.update({w.split("-")[0].lower(): w.split("-")[0] for w in WORKLOADS})
    names.update({k.lower(): k for k in NOT_MEASURED})
    if args.only:
        args.only = [o.strip() for o in args.only.split(",") if o.strip()]
        bad = [o for o in args.only if o.lower() not in names]
        if bad:
            ap.error(f"unknown workloads {bad}; choose from W1,W2,W3,W5,W6,W7 or {', '.join(WORKLOADS)}")
        args.only = [names[o.lower()] for o in args.only]
        for o in args.only:
            if o in NOT_MEASURED:
                print(f"{o}: {NOT_MEASURED[o]}")
    args.tier_list = [t.strip().lower() for t in args.tiers.split(",") if t.strip()]
    bad = [t for t in args.tier_list if t not in TIERS]
    if bad or not args.tier_list:
        ap.error(f"unknown tiers {bad}; choose from {TIERS}")

    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored

    tools = find_tools()
    missing = [t for t in ("wrk", "h2load", "nginx", "haproxy", "taskset") if not tools[t]]
    if missing:
        pkgs = " ".join(APT_PKG[t] for t in missing)
        print(f"missing: {', '.join(missing)}; install with:  apt-get install {pkgs}\n"
              f"(everything: apt-get install wrk nghttp2-client nginx haproxy; optional: cargo install oha)\n"
              f"running what can run without them.", flush=True)
    if not tools["oha"]:
        print("optional oha not found (cargo install oha); W1-rate uses h2load --rps instead.", flush=True)
    nproc = os.cpu_count() or 1
    pin = not args.unpinned and nproc >= 2 and bool(tools["taskset"])

    if not args.no_build:
        cmd = ["cargo", "build", "--release", "--bin", "keygate", "--example", "bench-upstream",
               "--example", "sse-probe"]
        log("building: " + shlex.join(cmd))
        r = subprocess.run(cmd, cwd=ROOT, timeout=1200)
        if r.returncode:
            print("build failed (if src/ is mid-edit, retry in a minute)", file=sys.stderr)
            return 1
    for b in (KEYGATE, FIXTURE, PROBE):
        if not b.exists():
            print(f"{b} is missing: run without --no-build", file=sys.stderr)
            return 1
    t_bench = time.monotonic()
    # What was built (read now: the tree may change while the benchmark runs).
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # The results of an earlier run are not part of what is measured.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benches/results"))

    # The harness itself (Python clients) runs on the load generator's core.
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * MODES["full"]["idle_conns"] + 2000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))

    TMP.mkdir(parents=True, exist_ok=True)
    procs = Processes(pin)
    bench = Bench(args, procs, tools)
    bench.started_at = t_bench
    if not pin:
        bench.note("unpinned run" + ("" if args.unpinned else " (fewer than 2 CPUs or no taskset)"))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        bench.note(f"RLIMIT_NOFILE is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; "
                   f"W6 may run out of descriptors")
    status = 0
    interrupted = None
    try:
        bench.setup()
        bench.run()
    except (KeyboardInterrupt, Stop) as e:
        interrupted = f"interrupted ({type(e).__name__})"
        log(interrupted)
        status = 130
    except Exception as e:
        interrupted = f"aborted: {type(e).__name__}: {e}"
        log(interrupted)
        status = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short (it is bounded: <= 7 s a process).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
    if interrupted:
        bench.note(interrupted)

    # Results (also for a partial run, so that what was measured is not lost).
    elapsed = time.monotonic() - t_bench
    meta = {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc, "quick": args.quick, "rounds": args.rounds, "pinned": pin,
        "no_restart": args.no_restart, "keygate_upstream": args.keygate_upstream,
        "seconds": elapsed, "seconds_with_build": time.monotonic() - t_start,
        "tools": {k: bool(v) for k, v in tools.items()},
    }
    meta["tiers"] = args.tier_list
    n_failed, n_errors = write_outputs(meta, bench.measurements, bench.skipped, bench.notes)
    log(f"wrote {RESULTS}/latest.json, latest.md, latest.svg in {elapsed:.0f} s "
        f"({len(bench.measurements)} measurements, {n_failed} failed, {n_errors} errors)")
    if n_failed or n_errors:
        status = status or 2
    return status


META_KEYS = ("commit", "dirty", "date", "nproc", "quick", "rounds", "pinned", "no_restart",
             "keygate_upstream",
             "seconds", "seconds_with_build", "tools", "tiers")


def write_outputs(meta: dict, measurements: list, skipped: list, notes: list) -> tuple[int, int]:
    """latest.json, latest.md, latest.svg; returns (failed runs, errors)."""
    meta = {k: meta[k] for k in META_KEYS if k in meta}
    other = [m["metrics"]["other_cpu_pct"] for m in measurements
             if m.get("metrics") and "other_cpu_pct" in m["metrics"]]
    steal = [m["metrics"].get("steal_pct", 0) for m in measurements
             if m.get("metrics") and "other_cpu_pct" in m["metrics"]]
    if other:
        meta.update(other_cpu_pct_mean=statistics.mean(other), other_cpu_pct_max=max(other),
                    steal_pct_mean=statistics.mean(steal))
    failed = [m for m in measurements if m.get("failed")]
    summary = summarise(measurements)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = dict(meta, workloads={k: v["title"] for k, v in WORKLOADS.items()},
               not_measured=NOT_MEASURED, skipped=skipped, notes=notes, measurements=measurements,
               summary={w: {"tiers": s["tiers"], "ratios_keygate_over": s["ratios"]}
                        for w, s in summary.items()})
    (RESULTS / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(RESULTS / "latest.md", meta, summary, skipped, notes, failed, measurements)
    write_svg(RESULTS / "latest.svg", meta, summary)
    errors = sum((m.get("metrics") or {}).get("errors") or 0 for m in measurements)
    return len(failed), errors


def report_only() -> int:
    """Render latest.md and latest.svg again from latest.json (after a change to the report)."""
    doc = json.loads((RESULTS / "latest.json").read_text())
    write_outputs(doc, doc["measurements"], doc.get("skipped", []), doc.get("notes", []))
    log(f"rendered {RESULTS}/latest.md and latest.svg from latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
