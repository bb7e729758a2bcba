"""The workloads: one function per workload, each registered with @workload(...) together with
what the runner and the report need to know of it: its title and load (the report's heading and
"Load:" line), the tools it needs, the columns of its table and the panels of the chart, and
how it is run (quick or full mode, on a fresh process, on the direct tier or not). A function
gets the run's Tiers and the name of the tier to load, and returns (metrics, the command that
made the load); the runner adds the proxy's CPU and RSS around it and records the errors.

Adding a workload: write its function here under @workload(...); the runner, the report
(latest.json, latest.md, latest.svg) and --only pick it up from the registry. The order of
the definitions below is the order of the runs in a round and of the report's sections (the
workloads with restarts=True run last in a round whatever their place); the chart shows its
panels in the order of the workload numbers (W1 first).
"""

from __future__ import annotations

import json
import re
import select
import shlex
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .client import http_get, open_tls, read_response
from .common import (FLEET_TIERS, KEYGATES, LOAD_CORE, MIN_KEYGATES, MIN_PEERS, MIN_TIERS,
                     NOUSAGE_TIERS, OPTIONAL_TIERS, PROBE, TEMPLATES, TIERS, TMP, WORK, log)
from .parsers import UNIT_MS, parse_h2load, parse_oha, parse_wrk
from .processes import children, cpu_us, rss_kib
from .tiers import Tiers

SSE_STREAMS = 20
SSE_GAP_MS = 10
SLOW_RATE = 1 << 20  # bytes per second the fixture reads each slow upload at
FIXED_RATE = 5000    # requests per second of W1-rate (open loop)
W7_RELOADS = 4       # reloads during W7, evenly spaced
W7_MIN_QUICK_S = 8   # W7's load lasts the mode's W1 duration, but at least this in quick mode

NOT_MEASURED = {
    "W4": "many keys (10k/100k/1M, Zipf): not measured by this harness",
}


@dataclass
class Workload:
    """What the runner and the report know of a workload (see @workload)."""

    name: str     # "W1-h1": --only takes it or its family ("W1")
    title: str    # the heading of its section in latest.md
    load: str     # the "Load:" line under it
    run: Callable[[Tiers, str], tuple[dict, str]]
    # The table: (metric, header, format, higher_is_better or None: no ratio column).
    columns: list[tuple] = field(default_factory=list)
    # The chart's panels: (metric, label, higher_is_better[, format of the value]).
    chart: list[tuple] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)      # needs every one of these
    tools_any: list[str] = field(default_factory=list)  # and at least one of these
    full_only: bool = False   # skipped in quick mode unless --only names it
    # A memory workload: on a freshly started process (Tiers.fresh_target), last in a round.
    restarts: bool = False
    # No CPU/RSS of the proxy pids around the run: it restarts or replaces the processes and
    # does its own accounting (implied by restarts).
    own_accounting: bool = False
    proxy_only: str | None = None   # not run on the direct tier: why
    # Only on these tiers (None: every tier but the optional ones, the fleet and min tiers and
    # keygate-nousage, which run W8, W1min and W1 only).
    on_tiers: list[str] | None = None
    # With on_tiers None: the optional tiers it also runs on (W1: keygate-nousage), when asked
    # for; the default ratios then add keygate ÷ each of them.
    also_on: list[str] = field(default_factory=list)
    # The ratios of the report, taken round by round: (keygate tier, peer tier) pairs; a peer
    # given as a list of tiers is the best of them in that round (for a higher-is-better metric
    # the highest, else the lowest). None: keygate ÷ direct, nginx, HAProxy (and also_on).
    ratios: list[tuple[str, str | list[str]]] | None = None
    cpu_metric: str = "cpu_us_per_req"  # the name of the proxy's CPU per request
    # More lines for its section of latest.md, from all the measurements.
    details: Callable[[list[dict]], list[str]] | None = None

    def __post_init__(self):
        self.own_accounting = self.own_accounting or self.restarts

    def runs_on(self, tier: str) -> bool:
        if self.on_tiers:
            return tier in self.on_tiers
        return tier not in OPTIONAL_TIERS or tier in self.also_on


WORKLOADS: dict[str, Workload] = {}


def workload(name: str, **spec) -> Callable:
    """Registers the function below as the workload `name` (the fields of Workload)."""
    def register(fn: Callable[[Tiers, str], tuple[dict, str]]):
        if name in WORKLOADS:
            raise ValueError(f"workload {name} defined twice")
        WORKLOADS[name] = Workload(name=name, run=fn, **spec)
        return fn
    return register


# ---------------------------------------------------------------- load generators


def lua() -> str:
    return str(TEMPLATES / "rotate_keys.lua")


def wrk_argv(tiers: Tiers, tier: str, conns: int, secs: int, path: str,
             extra: list[str]) -> list[str]:
    return [tiers.tools["wrk"], "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s",
            "-s", lua(), tiers.url(tier, path), "--", tiers.key_file(tier)] + extra


def wrk(tiers: Tiers, tier: str, conns: int, secs: int, path: str,
        extra: list[str]) -> tuple[dict, str]:
    """wrk -t1 with rotate_keys.lua: each request carries the next key of the tier's key file
    (keys.txt, or keygate-pg's own: all 10,000; 64 with a body). extra: the script's arguments after the key file (METHOD [BODY_BYTES
    [close]])."""
    argv = wrk_argv(tiers, tier, conns, secs, path, extra)
    r = tiers.procs.run(argv, LOAD_CORE, secs + 30)
    out = r.stdout.decode(errors="replace")
    if r.returncode:
        raise RuntimeError(f"wrk exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    return dict(parse_wrk(out), load_s=secs), shlex.join(tiers.procs.argv(argv, LOAD_CORE))


def h2load_h2(tiers: Tiers, tier: str, secs: int | None = None) -> tuple[dict, str]:
    """h2load over h2, 16 connections x 16 streams, one key (W1-h2 and the warm-up)."""
    secs = secs or tiers.mode["h2_s"]
    logf = TMP / f"h2load-{tier}.log"
    argv = [tiers.tools["h2load"], "-t1", "-c16", "-m16", "-D", str(secs),
            "-H", f"x-api-key: {tiers.tier_big_key(tier)}", "--log-file", str(logf),
            tiers.url(tier)]
    r = tiers.procs.run(argv, LOAD_CORE, secs + 30)
    if r.returncode:
        raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    return dict(parse_h2load(r.stdout.decode(errors="replace"), logf), load_s=secs), shlex.join(
        tiers.procs.argv(argv, LOAD_CORE))


# ---------------------------------------------------------------- W1


W1_COLUMNS = [("rps", "req/s", "k", True), ("cpu_us_per_req", "CPU µs/req", "f1", False),
              ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
              ("rss_mib", "RSS MiB", "f1", False), ("proxy_cpu_pct", "proxy CPU %", "f0", None),
              ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)]


@workload("W1-h1", title="W1 small GET, HTTP/1.1 over TLS, keep-alive",
          load="wrk -t1 -c64 --latency, the next of 10,000 keys on each request",
          tools=["wrk"], columns=W1_COLUMNS, also_on=NOUSAGE_TIERS,
          chart=[("rps", "W1 h1 TLS keep-alive: req/s", True),
                 ("cpu_us_per_req", "W1 h1 TLS: proxy CPU µs per request", False)])
def w1_h1(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return wrk(tiers, tier, 64, tiers.mode["wrk_s"], "/", ["GET", "0"])


@workload("W1-h2", title="W1 small GET, HTTP/2 over TLS",
          load="h2load -t1 -c16 -m16, one key (exempt from the 1000 r/s per-key limit)",
          tools=["h2load"], columns=W1_COLUMNS, also_on=NOUSAGE_TIERS,
          chart=[("rps", "W1 h2 TLS 16×16: req/s", True),
                 ("cpu_us_per_req", "W1 h2 TLS: proxy CPU µs per request", False)])
def w1_h2(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return h2load_h2(tiers, tier)


@workload("W1-rate", title=f"W1 small GET, HTTP/1.1 over TLS at a fixed {FIXED_RATE} r/s",
          load=f"oha -q {FIXED_RATE} --latency-correction (else h2load --h1 -c16 -m1 "
               f"--rps {FIXED_RATE // 16}), one key; latency is the point",
          tools_any=["h2load", "oha"], full_only=True, also_on=NOUSAGE_TIERS,
          columns=[("rps", "req/s", "k", None), ("p50_ms", "p50 ms", "f3", False),
                   ("p99_ms", "p99 ms", "f3", False), ("cpu_us_per_req", "CPU µs/req", "f1", False)],
          chart=[("p99_ms", f"W1 at {FIXED_RATE} r/s: latency p99 ms", False)])
def w1_rate(tiers: Tiers, tier: str) -> tuple[dict, str]:
    secs = tiers.mode["rate_s"]
    if tiers.tools.get("oha"):
        argv = [tiers.tools["oha"], "--no-tui", "-j", "-z", f"{secs}s", "-c", "16",
                "-q", str(FIXED_RATE), "--latency-correction", "--cacert", str(tiers.ca),
                "-H", f"x-api-key: {tiers.big_key}", tiers.url(tier)]
        try:
            r = tiers.procs.run(argv, LOAD_CORE, secs + 30)
            m = dict(parse_oha(r.stdout.decode(errors="replace")), load_s=secs)
            return m, shlex.join(tiers.procs.argv(argv, LOAD_CORE))
        except Exception as e:  # untested here (oha not installed): fall back, say so
            tiers.note(f"W1-rate: oha failed ({e}); used h2load --rps instead")
    logf = TMP / f"h2load-rate-{tier}.log"
    argv = [tiers.tools["h2load"], "--h1", "-t1", "-c16", "-m1", "--rps", str(FIXED_RATE // 16),
            "-D", str(secs), "-H", f"x-api-key: {tiers.big_key}", "--log-file", str(logf),
            tiers.url(tier)]
    r = tiers.procs.run(argv, LOAD_CORE, secs + 30)
    if r.returncode:
        raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    return dict(parse_h2load(r.stdout.decode(errors="replace"), logf), load_s=secs), shlex.join(
        tiers.procs.argv(argv, LOAD_CORE))


# ---------------------------------------------------------------- W1min

# The origin's CPU per request must stay far below every proxy's: above this share of a proxy's,
# the report warns (the origin, on the load generator's core, may then limit the run).
ORIGIN_SHARE_WARN = 0.5
MIN_PROXIES = [t for t in MIN_TIERS if t != "direct-min"]

W1MIN_COLUMNS = [("rps", "req/s", "k", True), ("cpu_us_per_req", "CPU µs/req", "f1", False),
                 ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
                 ("origin_cpu_us_per_req", "origin µs/req", "f2", None),
                 ("proxy_cpu_pct", "proxy CPU %", "f0", None), ("rss_mib", "RSS MiB", "f1", None)]
W1MIN_RATIOS = [(kg, peer) for kg in MIN_KEYGATES
                for peer in MIN_PEERS + [[p for p in MIN_PEERS if p != "direct-min"]]]


def origin_share(wname: str) -> Callable[[list[dict]], list[str]]:
    """W1min's extra lines: the origin's CPU per request against each proxy's, round by round,
    and a warning when it was more than ORIGIN_SHARE_WARN of a proxy's."""
    def details(measurements: list[dict]) -> list[str]:
        over, shares = [], []
        for r in measurements:
            m = r.get("metrics") or {}
            if r["workload"] != wname or r["tier"] not in MIN_PROXIES:
                continue
            o, p = m.get("origin_cpu_us_per_req"), m.get("cpu_us_per_req")
            if o is None or not p:
                continue
            shares.append(o / p)
            if o > ORIGIN_SHARE_WARN * p:
                over.append(f"{r['tier']} round {r['round']}: origin {o:.2f} µs/req, proxy "
                            f"{p:.2f} µs/req")
        if not shares:
            return []
        if over:
            return ["", f"**Warning: the origin's CPU per request was more than "
                        f"{ORIGIN_SHARE_WARN:.0%} of the proxy's** ({'; '.join(over)}): the "
                        f"origin is not negligible against these proxies, and may have limited "
                        f"the run instead of the proxy."]
        return ["", f"The origin's CPU per request stayed below {ORIGIN_SHARE_WARN:.0%} of every "
                    f"proxy's (origin ÷ proxy at most {max(shares):.2f}, median "
                    f"{sorted(shares)[len(shares) // 2]:.2f})."]
    return details


W1MIN_LOAD = ("on the min tiers: the proxies configured exactly like their tiers but in front of "
              "a minimal TLS origin (nginx `return 200 \"ok\"`, h2 and http/1.1 by ALPN, "
              "templates/origin.conf.tmpl, on the load generator's core) instead of the "
              "fixture; keygate-min talks h2 to it, keygate-min-h1, nginx-min and haproxy-min "
              "HTTP/1.1; direct-min is the origin itself. \"origin µs/req\" is the CPU of "
              "the origin's nginx worker during the run, per request. Ratios per round; "
              "\"best peer\" is the better of nginx-min and haproxy-min in that round")


@workload("W1min-h1", title="W1min small GET, HTTP/1.1 over TLS, keep-alive, minimal origin",
          load="wrk -t1 -c64 --latency, the next of 10,000 keys on each request, " + W1MIN_LOAD,
          tools=["wrk"], on_tiers=MIN_TIERS, full_only=True, columns=W1MIN_COLUMNS,
          ratios=W1MIN_RATIOS, details=origin_share("W1min-h1"),
          chart=[("rps", "W1min h1 TLS, minimal origin: req/s", True),
                 ("cpu_us_per_req", "W1min h1 TLS, minimal origin: proxy CPU µs/req", False)])
def w1min_h1(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return wrk(tiers, tier, 64, tiers.mode["wrk_s"], "/", ["GET", "0"])


@workload("W1min-h2", title="W1min small GET, HTTP/2 over TLS, minimal origin",
          load="h2load -t1 -c16 -m16, one key (exempt from the 1000 r/s per-key limit), "
               + W1MIN_LOAD,
          tools=["h2load"], on_tiers=MIN_TIERS, full_only=True, columns=W1MIN_COLUMNS,
          ratios=W1MIN_RATIOS, details=origin_share("W1min-h2"),
          chart=[("rps", "W1min h2 TLS 16×16, minimal origin: req/s", True),
                 ("cpu_us_per_req", "W1min h2 TLS, minimal origin: proxy CPU µs/req", False)])
def w1min_h2(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return h2load_h2(tiers, tier)


# ---------------------------------------------------------------- W8

W8_DELTAS = [("rps", "req/s", "k"), ("cpu_us_per_req", "proxy CPU µs/req", "f2"),
             ("p50_ms", "p50 ms", "f3"), ("p99_ms", "p99 ms", "f3")]


def w8_details(measurements: list) -> list[str]:
    """W8: each fleet tier against the keygate tier of the same round: differences (tier -
    keygate) per round, then median (min-max); and the CPU per request of the proxy plus its
    store or Redis server."""
    by = {(r["tier"], r["round"]): r["metrics"] for r in measurements
          if r["workload"] == "W8-fleet" and r.get("metrics")}
    rounds = sorted({rnd for (_, rnd) in by})
    rows = []
    for tier in FLEET_TIERS:
        cells = []
        for metric, _, how in W8_DELTAS:
            d = [by[(tier, r)][metric] - by[("keygate", r)][metric] for r in rounds
                 if by.get((tier, r), {}).get(metric) is not None
                 and by.get(("keygate", r), {}).get(metric) is not None]
            cells.append(signed(d, how))
        total = [by[(tier, r)]["cpu_us_per_req"]
                 + (by[(tier, r)].get("store_cpu_us_per_req") or 0)
                 + (by[(tier, r)].get("redis_cpu_us_per_req") or 0)
                 - by[("keygate", r)]["cpu_us_per_req"] for r in rounds
                 if by.get((tier, r), {}).get("cpu_us_per_req") is not None
                 and by.get(("keygate", r), {}).get("cpu_us_per_req") is not None]
        cells.append(signed(total, "f2"))
        if any(c != "—" for c in cells):
            rows.append(f"| {tier} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return (["", "Added against the keygate tier of the same round (tier − keygate, per round; "
             "median (min–max)). The last column adds the server's CPU per request (PostgreSQL "
             "or Redis, on the load generator's core) to the proxy's: the fleet's whole cost "
             "per request over the embedded default.", "",
             "| tier − keygate | " + " | ".join(h for _, h, _ in W8_DELTAS)
             + " | proxy + server CPU µs/req |",
             "|---|" + "---|" * (len(W8_DELTAS) + 1)] + rows)


def signed(vals: list, how: str) -> str:
    if not vals:
        return "—"

    def one(v: float) -> str:
        if how == "k":
            return f"{v / 1000:+.1f}k" if abs(v) >= 1000 else f"{v:+.0f}"
        return f"{v:+.{int(how[1:])}f}"
    vals = sorted(vals)
    med = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    return one(med) if len(vals) == 1 else f"{one(med)} ({one(vals[0])} – {one(vals[-1])})"


@workload("W8-fleet", title="W8 fleet: W1-h1 with the PostgreSQL store and with Redis limits",
          load="W1-h1's load (wrk -t1 -c64 --latency, the next of the tier's 10,000 keys on "
               "each request) on keygate (SQLite store, local quotas), keygate-pg (a private "
               "PostgreSQL store holding its own 10,000 keys, made by the same `keygate keys "
               "create --count`) and keygate-redis (the SQLite store, [limits] backend = "
               "\"redis\" on a private redis-server: one script round trip per request); each "
               "otherwise configured like keygate and pinned the same way, PostgreSQL and Redis "
               "on the load generator's core. \"store µs/req\" and \"redis µs/req\" are the "
               "CPU of the PostgreSQL processes (postmaster + backends) and of redis-server "
               "during the run, per request (a known key must not reach the database after "
               "the warm-up); \"redis scripts/req\" is Redis's own count (INFO "
               "commandstats) of the scripts it ran (EVAL/EVALSHA), per request",
          tools=["wrk"], on_tiers=KEYGATES,
          columns=[("rps", "req/s", "k", True), ("cpu_us_per_req", "CPU µs/req", "f1", False),
                   ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
                   ("store_cpu_us_per_req", "store µs/req", "f2", None),
                   ("redis_cpu_us_per_req", "redis µs/req", "f2", None),
                   ("redis_scripts_per_req", "redis scripts/req", "f2", None),
                   ("proxy_cpu_pct", "proxy CPU %", "f0", None),
                   ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)],
          chart=[("cpu_us_per_req", "W8 fleet (h1 TLS): proxy CPU µs per request", False),
                 ("p99_ms", "W8 fleet (h1 TLS): p99 ms", False, "f2")],
          details=w8_details)
def w8_fleet(tiers: Tiers, tier: str) -> tuple[dict, str]:
    if tier != "keygate-redis":
        return wrk(tiers, tier, 64, tiers.mode["wrk_s"], "/", ["GET", "0"])
    # keygate-redis: Redis's own count of the commands it ran (one script per request
    # expected), and the quotas still in Redis at the end (not degraded to local ones).
    port = tiers.ports["redis"]
    n0 = redis_commands(port)
    m, cmd = wrk(tiers, tier, 64, tiers.mode["wrk_s"], "/", ["GET", "0"])
    n1 = redis_commands(port)
    if m.get("requests"):
        m["redis_scripts_per_req"] = (n1[0] - n0[0]) / m["requests"]
        m["redis_commands_per_req"] = (n1[1] - n0[1]) / m["requests"]
    limits = tiers.kg_readyz(tier).get("limits", {})
    if limits.get("backend") != "redis" or limits.get("degraded"):
        m["errors"] = (m.get("errors") or 0) + 1
        m["error_messages"] = [f"/readyz after the run: limits {limits}"]
    return m, cmd


def redis_commands(port: int) -> tuple[int, int]:
    """(scripts run: the calls of EVAL, EVALSHA, EVAL_RO, EVALSHA_RO; every command, the calls
    made inside the scripts included), from INFO commandstats over a plain socket; INFO itself
    is not counted."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"INFO commandstats\r\n")
        buf = b""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, _, rest = buf.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    calls = {k.decode(): int(v) for k, v in re.findall(rb"cmdstat_([\w|]+):calls=(\d+)", buf)}
    scripts = sum(v for k, v in calls.items() if k in ("eval", "evalsha", "eval_ro", "evalsha_ro"))
    return scripts, sum(v for k, v in calls.items() if k != "info")


# ---------------------------------------------------------------- W7


class KeygateEdit:
    """W7's edits of keygate.toml: the config as it was before W7, and whether it now holds the
    harmless change."""

    def __init__(self, original_cfg: str):
        self.original_cfg = original_cfg
        self.changed = False

    def text(self, changed: bool) -> str:
        """The bench config, or the same with a harmless change (the admin quota; the proxy
        plane does not use it)."""
        text = self.original_cfg
        if not changed:
            return text
        old = "admin = { per_second = 100000, burst = 100000 }"
        if old not in text:
            raise RuntimeError("keygate.toml: the [limits] admin line to change was not found")
        return text.replace(old, "admin = { per_second = 99999, burst = 100000 }  "
                                 "# W7: a harmless change, put back by the next config reload")


def reload_once(tiers: Tiers, tier: str, i: int, edit: KeygateEdit | None) -> dict:
    """The i-th reload of W7 on the tier; returns what happened (raises on a failure)."""
    t0 = time.monotonic()
    if tier == "keygate":
        state0 = tiers.kg_config_state()
        if i % 2 == 0:
            edit.changed = not edit.changed
            (WORK / "keygate.toml").write_text(edit.text(edit.changed))
            res = tiers.kg_reload(t0, state0)
            res["kind"] = "config " + ("changed" if edit.changed else "put back")
            return res
        key = tiers.kg_cli(["keys", "create", "--name", f"w7-reload-{i + 1}"]).strip()
        if not key.startswith("sk-"):
            raise RuntimeError("keys create printed no key")
        created_ms = round(1000 * (time.monotonic() - t0), 1)
        res = tiers.kg_reload(time.monotonic(), state0)
        res.update(kind="key created", keys_create_ms=created_ms)
        # The key-set change took effect: the new key is accepted (the server reads the
        # store's key revision every 250 ms).
        deadline = time.monotonic() + 3
        while True:
            status, _ = http_get(tiers.port[tier], tiers.ctx, "/", key, timeout=3.0)
            if status == 200:
                res["new_key_ms"] = round(1000 * (time.monotonic() - t0), 1)
                return res
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new key still gets {status} 3 s after it was created")
            time.sleep(0.05)
    return tiers.reload_master(tier, t0)


def kg_restore(tiers: Tiers, edit: KeygateEdit) -> None:
    """Puts keygate's config back as it was before W7 (after a failure midway)."""
    if not edit.changed:
        return
    (WORK / "keygate.toml").write_text(edit.original_cfg)
    edit.changed = False
    tiers.kg_reload(time.monotonic(), tiers.kg_config_state())
    tiers.note("W7: keygate's config was put back by an extra reload after the workload")


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


@workload("W7-reload", title=f"W7 {W7_RELOADS} config / key-set reloads during a W1-h1 load",
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
          tools=["wrk"], own_accounting=True, proxy_only="no proxy to reload",
          columns=[("requests", "requests", "k", None), ("rps", "req/s", "k", True),
                   ("reloads", "reloads done", "f0", None),
                   ("reload_ms_max", "slowest reload ms", "f0", None),
                   ("generation", "keygate generation", "f0", None),
                   ("non_2xx", "non-2xx/3xx", "f0", None),
                   ("socket_errors", "socket errors", "f0", None)],
          chart=[("errors", f"W7 errors during {W7_RELOADS} reloads under load (target 0)", False,
                  "f0"),
                 ("rps", f"W7 req/s during {W7_RELOADS} reloads (h1 TLS, wrk -c64)", True)],
          details=w7_details)
def w7_reload(tiers: Tiers, tier: str) -> tuple[dict, str]:
    """A W1-h1 load (wrk -c64, 10,000 keys rotating) with W7_RELOADS reloads evenly spaced
    (at 1/5, 2/5, ... of the duration), on the long-running processes."""
    secs = tiers.mode["wrk_s"]
    if tiers.args.quick:
        secs = max(secs, W7_MIN_QUICK_S)
    edit = None
    if tier == "keygate":
        edit = KeygateEdit((WORK / "keygate.toml").read_text())
        gen_start = tiers.kg_generation()
    argv = wrk_argv(tiers, tier, 64, secs, "/", ["GET", "0"])
    lp = TMP / f"w7-wrk-{tier}.log"
    lp.unlink(missing_ok=True)
    reloads: list[dict] = []
    p = tiers.procs.start("wrk (W7)", argv, LOAD_CORE, lp)
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
                entry.update(reload_once(tiers, tier, i, edit))
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
            tiers.procs.stop(p, grace=1.0)
        tiers.procs.forget(p)
        if tier == "keygate":
            kg_restore(tiers, edit)
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
        m["generation"] = tiers.kg_generation()
        m["generations"] = [e.get("generation") for e in reloads]
        if m["generation"] - gen_start < len(ok):
            tiers.note(f"W7: keygate's generation went from {gen_start} to {m['generation']} "
                       f"over {len(ok)} reloads")
    else:
        # Before the next workload: the old workers have finished their connections (wrk
        # has ended) and exited, so that pids() measures the new worker alone.
        master = tiers.proc[tier].pid
        deadline = time.monotonic() + 15
        while len(children(master)) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        m["workers_after"] = len(children(master))
        if m["workers_after"] != 1:
            tiers.note(f"W7 on {tier}: {m['workers_after']} worker processes 15 s after the "
                       f"load ended (old workers still draining?)")
    cmd = shlex.join(tiers.procs.argv(argv, LOAD_CORE))
    how = {"keygate": "keygate --config keygate.toml reload (after a config edit or keys create)",
           "nginx": "kill -HUP <nginx master>", "haproxy": "kill -USR2 <haproxy master (-W)>"}
    return m, f"{cmd}  + {W7_RELOADS} x {how[tier]}"


# ---------------------------------------------------------------- W2


@workload("W2-upload", title="W2 1 MiB POST upload, streamed",
          load="wrk -t1 -c8 --latency, POST 1 MiB, 64 keys rotating",
          tools=["wrk"],
          columns=[("rps", "uploads/s", "f0", True),
                   ("cpu_us_per_req", "CPU µs/upload", "f0", False),
                   ("p50_ms", "p50 ms", "f1", False), ("p99_ms", "p99 ms", "f1", False),
                   ("rss_mib", "RSS MiB", "f1", False), ("proxy_cpu_pct", "proxy CPU %", "f0", None)],
          chart=[("rps", "W2 1 MiB uploads/s", True)])
def w2_upload(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return wrk(tiers, tier, 8, tiers.mode["upload_s"], "/upload", ["POST", str(1 << 20)])


@workload("W2-slow", title="W2 64 slow uploads (the fixture reads 1 MiB/s each): proxy RSS",
          load="64 concurrent Python TLS clients; RSS sampled every 100 ms",
          restarts=True,
          columns=[("rss_base_mib", "RSS before MiB", "f1", None),
                   ("rss_max_mib", "RSS max MiB", "f1", False),
                   ("rss_growth_mib", "growth MiB", "f2", False),
                   ("rss_growth_kib_per_upload", "growth KiB/upload", "f0", None),
                   ("seconds", "seconds", "f1", None)],
          chart=[("rss_growth_mib", "W2 64 slow uploads: RSS growth MiB", False)])
def w2_slow(tiers: Tiers, tier: str) -> tuple[dict, str]:
    """64 concurrent uploads that the fixture reads at 1 MiB/s; RSS every 100 ms."""
    n, nbytes = tiers.mode["slow_uploads"], tiers.mode["slow_bytes"]
    port, pids, extra = tiers.fresh_target(tier)
    try:
        budget = nbytes / SLOW_RATE + 20
        deadline = time.monotonic() + budget
        results: list[str | None] = ["not finished"] * n
        chunk = memoryview(b"\0" * 65536)

        def upload(i: int) -> None:
            try:
                sock = open_tls(port, tiers.ctx, 10)
                try:
                    sock.settimeout(budget)
                    sock.sendall((f"POST /upload?rate={SLOW_RATE} HTTP/1.1\r\n"
                                  f"Host: 127.0.0.1:{port}\r\nx-api-key: {tiers.big_key}\r\n"
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
            tiers.procs.stop(extra)
            tiers.procs.forget(extra)
    errs = [r for r in results if r]
    m = {
        "requests": n, "upload_bytes": nbytes, "seconds": secs, "samples": len(samples),
        "rss_base_mib": base / 1024, "rss_max_mib": max(samples) / 1024,
        "rss_end_mib": samples[-1] / 1024, "rss_growth_mib": (max(samples) - base) / 1024,
        "rss_growth_kib_per_upload": (max(samples) - base) / n,
        "cpu_us_per_req": cpu / n,
        "errors": len(errs), "error_messages": errs[:3],
        "process": tiers.process_label(tier),
    }
    return m, (f"{n} Python TLS clients: POST /upload?rate={SLOW_RATE} of {nbytes} bytes each, "
               f"one key; RSS of {m['process']} every 100 ms")


# ---------------------------------------------------------------- W3


@workload("W3-sse", title=f"W3 SSE: {SSE_STREAMS} streams, events {SSE_GAP_MS} ms apart",
          load="sse-probe (receive time - send time per event, CLOCK_MONOTONIC)",
          cpu_metric="cpu_us_per_event",
          columns=[("p50_us", "event p50 µs", "f0", False), ("p99_us", "event p99 µs", "f0", False),
                   ("max_us", "max µs", "f0", False), ("ttfb_p50_ms", "TTFB p50 ms", "f2", False),
                   ("events_per_read", "events/read", "f2", None),
                   ("cpu_us_per_event", "CPU µs/event", "f1", False)],
          chart=[("p50_us", "W3 SSE event latency p50 µs", False),
                 ("p99_us", "W3 SSE event latency p99 µs", False)])
def w3_sse(tiers: Tiers, tier: str) -> tuple[dict, str]:
    events = tiers.mode["sse_events"]
    argv = [str(PROBE), "--url", tiers.url(tier, "/sse"), "--ca", str(tiers.ca),
            "--streams", str(SSE_STREAMS), "--events", str(events), "--gap-ms", str(SSE_GAP_MS),
            "--timeout-s", str(int(events * SSE_GAP_MS / 1000) + 20)]
    if tier != "direct":
        argv += ["--key", tiers.keys[1]]
    r = tiers.procs.run(argv, LOAD_CORE, events * SSE_GAP_MS / 1000 + 40)
    if r.returncode:
        raise RuntimeError(f"sse-probe exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    m = json.loads(r.stdout.decode())
    m["requests"] = m["events"]
    m["load_s"] = events * SSE_GAP_MS / 1000
    return m, shlex.join(tiers.procs.argv(argv, LOAD_CORE))


# ---------------------------------------------------------------- W5


@workload("W5-full", title="W5 a new TLS connection per request, full handshakes (ECDSA P-256)",
          load="h2load --h1 -t1 -c200 -n200 run back to back: every client makes one "
               "connection with a full handshake (no session resumption) and one request; "
               "one key",
          tools=["h2load"],
          columns=[("rps", "handshakes/s", "f0", True),
                   ("cpu_us_per_req", "CPU µs/handshake", "f0", False),
                   ("proxy_cpu_pct", "proxy CPU %", "f0", None),
                   ("fixture_cpu_us_per_req", "fixture µs/req", "f1", None)],
          chart=[("rps", "W5 full TLS handshakes/s (generator-bound)", True),
                 ("cpu_us_per_req", "W5 proxy CPU µs per full handshake + request", False)])
def w5_full(tiers: Tiers, tier: str) -> tuple[dict, str]:
    """Full handshakes: h2load clients each open one connection (a fresh TLS session) for
    one request; batches of 200 (under every listener's accept backlog) back to back."""
    secs, batch = tiers.mode["handshake_s"], 200
    argv = [tiers.tools["h2load"], "--h1", "-t1", f"-c{batch}", f"-n{batch}",
            "-H", f"x-api-key: {tiers.big_key}", tiers.url(tier)]
    done = errors = batches = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < secs and batches < 10_000:
        r = tiers.procs.run(argv, LOAD_CORE, 60)
        if r.returncode:
            raise RuntimeError(f"h2load exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
        m = parse_h2load(r.stdout.decode(errors="replace"), None)
        done += m["requests"]
        errors += m["errors"] + (batch - m["requests"])
        batches += 1
    wall = time.monotonic() - t0
    return ({"requests": done, "rps": done / wall, "errors": errors, "batches": batches,
             "load_s": wall},
            f"{shlex.join(tiers.procs.argv(argv, LOAD_CORE))}  (x{batches}, back to back)")


@workload("W5-resumed", title="W5 a new TLS connection per request, wrk (resumes the TLS session)",
          load="wrk -t1 -c32 with Connection: close, keys rotating. wrk resumes "
               "its TLS session when it reconnects (checked with nginx's "
               "$ssl_session_reused), so these are resumed handshakes, without the "
               "certificate signature; W5-full has the full ones",
          tools=["wrk"],
          columns=[("rps", "handshakes/s", "f0", True),
                   ("cpu_us_per_req", "CPU µs/handshake", "f0", False),
                   ("p50_ms", "p50 ms", "f2", False), ("p99_ms", "p99 ms", "f2", False),
                   ("proxy_cpu_pct", "proxy CPU %", "f0", None)])
def w5_resumed(tiers: Tiers, tier: str) -> tuple[dict, str]:
    return wrk(tiers, tier, 32, tiers.mode["handshake_s"], "/", ["GET", "0", "close"])


# ---------------------------------------------------------------- W6


@workload("W6-idle", title="W6 idle TLS connections kept open after one request each",
          load="Python TLS client (4 threads, TLS sessions resumed after the first "
               "connection); (RSS after - RSS before) / N",
          restarts=True,
          columns=[("kib_per_conn", "KiB/conn", "f2", False),
                   ("rss_before_mib", "RSS before MiB", "f1", None),
                   ("rss_after_mib", "RSS after MiB", "f1", None),
                   ("cpu_us_per_conn", "CPU µs/conn", "f0", False),
                   ("open_seconds", "open s", "f1", None)],
          chart=[("kib_per_conn", "W6 KiB per idle TLS connection", False)])
def w6_idle(tiers: Tiers, tier: str) -> tuple[dict, str]:
    """N TLS connections, one request each, kept open; (RSS after - RSS before) / N. Opened
    by 4 threads that resume the first connection's TLS session (verified when it was
    made; it halves the client's cost). keygate's header_read_timeout and HAProxy's
    http-keep-alive timeout, 10 s by default, are 60 s in the bench configs so that the
    first connections are still open when the last one is made."""
    n, nthreads = tiers.mode["idle_conns"], 4
    port, pids, extra = tiers.fresh_target(tier)
    socks: list[ssl.SSLSocket] = []
    errors: list[str] = []
    lock = threading.Lock()
    req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {tiers.big_key}\r\n\r\n".encode()
    closed = 0

    def one(session) -> ssl.SSLSocket | None:
        try:
            s = open_tls(port, tiers.ctx, 5, session)
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
            tiers.note(f"W6 on {tier}: opened only {len(socks)} of {n} connections in "
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
            tiers.procs.stop(extra)
            tiers.procs.forget(extra)
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
        "process": tiers.process_label(tier),
    }
    return m, (f"Python TLS client, {nthreads} threads: {n} connections (TLS session resumed "
               f"after the first), one GET each (one key), kept open; RSS of {m['process']}")
