#!/usr/bin/env python3
"""R1 soak (../shared/reliability.md): keygate under steady mixed load for a few minutes.

    python3 benches/soak.py [--minutes 3] [--h1-rps 6000] [--h2-rps 4000] [--sse-streams 50]

Starts the bench fixture and keygate (release build, as benches/compare.py does; run that once
first, or `cargo build --release --bin keygate --example bench-upstream --example sse-probe`),
then runs at the same time, for the whole duration, on loopback only:
- h2load --h1, 32 keep-alive connections at a fixed total rate (open loop),
- h2load h2, 8 connections x 8 streams at a fixed total rate,
- sse-probe, N streams of events 100 ms apart.
Every second it samples keygate's RSS, open fds and /metrics (connections, requests in flight).

Pass (R1): 0 non-2xx answers and 0 socket errors in every load; RSS drift after warm-up (the
first 20 % of the run) under 5 %; after the load stops, fds back to their pre-load baseline
(+2) and connections and requests in flight back to 0. Exit code 0 on pass, 1 on fail.
Bounded: at most 30 minutes.
"""

import argparse
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The side-by-side harness (benches/compare/): processes, fixture, keygate setup.
from compare.common import FIXTURE, KEYGATE, PROBE, find_tools, log  # noqa: E402
from compare.parsers import parse_h2load  # noqa: E402
from compare.processes import Processes, rss_kib  # noqa: E402
from compare.tiers import Tiers  # noqa: E402


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics(admin_port: int, ca: Path) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(f"https://localhost:{admin_port}/metrics", context=ctx, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(keygate_connections\{listener="proxy"\}|keygate_requests_in_flight) (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--h1-rps", type=int, default=6000)
    ap.add_argument("--h2-rps", type=int, default=4000)
    ap.add_argument("--sse-streams", type=int, default=50)
    a = ap.parse_args()
    if not 0 < a.minutes <= 30:
        print("--minutes must be in (0, 30]", file=sys.stderr)
        return 2
    secs = int(a.minutes * 60)
    tools = find_tools()
    if not tools.get("h2load"):
        print("h2load is needed: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    for b in (KEYGATE, FIXTURE, PROBE):
        if not b.exists():
            print(f"{b} is missing: cargo build --release --bin keygate --example bench-upstream "
                  "--example sse-probe", file=sys.stderr)
            return 2
    args = argparse.Namespace(quick=True, rounds=1, only=None, tiers="keygate",
                              tier_list=["keygate"], no_build=True, no_restart=True,
                              unpinned=True, report_only=False, keygate_upstream="h2")
    procs = Processes(False)
    bench = Tiers(args, procs, tools)
    try:
        bench.setup()
        pid = bench.pids("keygate")[0]
        admin = bench.ports["keygate_admin"]
        url = bench.url("keygate")
        key = bench.big_key
        base_fds = fds(pid)
        log(f"soak: {secs} s; h1 {a.h1_rps}/s, h2 {a.h2_rps}/s, {a.sse_streams} SSE streams; "
            f"keygate pid {pid}, {base_fds} fds before the load")
        h1 = [tools["h2load"], "--h1", "-t1", "-c32", f"--rps={max(1, a.h1_rps // 32)}",
              f"-D{secs}", "-H", f"x-api-key: {key}", url]
        h2 = [tools["h2load"], "-t1", "-c8", "-m8", f"--rps={max(1, a.h2_rps // 8)}",
              f"-D{secs}", "-H", f"x-api-key: {key}", url]
        events = secs * 10
        sse = [str(PROBE), "--url", bench.url("keygate", "/sse"), "--ca", str(bench.ca),
               "--streams", str(a.sse_streams), "--events", str(events), "--gap-ms", "100",
               "--key", key, "--timeout-s", str(secs + 60)]
        loads = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, argv in (("h1", h1), ("h2", h2), ("sse", sse))}
        samples = []
        t0 = time.monotonic()
        while any(p.poll() is None for p in loads.values()) and time.monotonic() - t0 < secs + 90:
            try:
                m = metrics(admin, bench.ca)
            except Exception as e:  # noqa: BLE001 (a failed scrape is reported, not fatal)
                m = {"error": str(e)}
            samples.append((time.monotonic() - t0, rss_kib([pid]), fds(pid), m))
            time.sleep(1)
        outs = {n: p.communicate(timeout=120) for n, p in loads.items()}
        time.sleep(5)
        after_fds = fds(pid)
        after = metrics(admin, bench.ca)
    finally:
        procs.stop_all()

    ok = True
    report = {"seconds": secs}
    for n in ("h1", "h2"):
        r = parse_h2load(outs[n][0].decode(errors="replace"), None)
        report[n] = {k: r.get(k) for k in ("requests", "errors", "rps")}
        text = outs[n][0].decode(errors="replace")
        m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        non2xx = sum(int(x) for x in m.groups()[1:]) if m else None
        report[n]["non_2xx"] = non2xx
        if r.get("errors") or non2xx or not r.get("requests"):
            ok = False
    try:
        s = json.loads(outs["sse"][0].decode())
        report["sse"] = {k: s.get(k) for k in ("events", "p50_us", "p99_us", "errors")}
        if s.get("errors"):
            ok = False
    except ValueError:
        report["sse"] = {"error": outs["sse"][1].decode(errors="replace")[-300:]}
        ok = False
    warm = [x for x in samples if x[0] >= secs * 0.2 and x[0] <= secs]
    if warm:
        first, last = warm[0][1], warm[-1][1]
        drift = (last - first) / first * 100
        report["rss_kib"] = {"after_warmup": first, "end": last, "max": max(x[1] for x in warm),
                             "drift_pct": round(drift, 2)}
        ok = ok and drift < 5
    report["fds"] = {"before": base_fds, "max": max(x[2] for x in samples), "after": after_fds}
    report["after_load"] = after
    ok = (ok and after_fds <= base_fds + 2
          and after.get('keygate_connections{listener="proxy"}', 1) == 0
          and after.get("keygate_requests_in_flight", 1) == 0)
    report["pass"] = ok
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
