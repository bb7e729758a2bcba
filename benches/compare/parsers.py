"""The load generators' output as metrics: wrk (with its --latency table), h2load (with the
per-request --log-file for percentiles) and oha (-j)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
