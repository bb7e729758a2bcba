"""What every part of the side-by-side benchmark shares: where things are (the repository, the
release binaries, the templates, the results and the scratch directory), the tiers and their
order (with the fleet tiers: keygate over a private PostgreSQL store or with its quotas in a
private Redis; the min tiers: the proxies in front of a minimal nginx origin; and keygate-nousage:
keygate without key-usage tracking), the cores,
the two run modes, the commands that install missing tools, and log()."""

from __future__ import annotations

import os
import pwd
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
TIERS = ["direct", "keygate", "keygate-nousage", "keygate-pg", "keygate-redis", "nginx",
         "haproxy", "direct-min", "keygate-min", "keygate-min-h1", "nginx-min", "haproxy-min"]
PEERS = ["direct", "nginx", "haproxy"]
# keygate configured exactly like the keygate tier, but over a private PostgreSQL store
# (keygate-pg) or with [limits] backend = "redis" on a private redis-server (keygate-redis;
# the keygate tier's SQLite store). They run W8 only, beside the keygate tier.
FLEET_TIERS = ["keygate-pg", "keygate-redis"]
# The min tiers (W1min): the tiers again, configured exactly alike but for the upstream, which is
# a minimal TLS origin (nginx answering `return 200 "ok"`, templates/origin.conf.tmpl) whose
# CPU per request is far below the fixture's, so that the proxy's own cost is what limits a
# run. direct-min is the origin itself; keygate-min talks h2 to it (keygate's default) and
# keygate-min-h1 HTTP/1.1 ([upstream] http2 = false) whatever --keygate-upstream says. They run
# W1min only. MIN_OF: the tier each is a copy of.
MIN_OF = {"direct-min": "direct", "keygate-min": "keygate", "keygate-min-h1": "keygate",
          "nginx-min": "nginx", "haproxy-min": "haproxy"}
MIN_TIERS = list(MIN_OF)
MIN_KEYGATES = ["keygate-min", "keygate-min-h1"]
MIN_PEERS = ["direct-min", "nginx-min", "haproxy-min"]
# keygate configured exactly like the keygate tier (the same store, so the same keys and secret)
# but for [keys] track_usage = false: what the per-request key-usage tracking costs, side by side
# with keygate. It runs W1 only (W1-h1, W1-h2, W1-rate: their also_on), and only when --tiers
# names it: it is not in the default tier list (DEFAULT_TIERS).
NOUSAGE_TIERS = ["keygate-nousage"]
# The tiers that run only the workloads that name them (on_tiers, also_on), and are set up only
# when one of those is selected.
OPTIONAL_TIERS = FLEET_TIERS + MIN_TIERS + NOUSAGE_TIERS
KEYGATES = ["keygate"] + FLEET_TIERS   # W8's tiers
KEYGATE_TIERS = KEYGATES + MIN_KEYGATES + NOUSAGE_TIERS  # every tier that is a keygate process
# --tiers' default: every tier but keygate-nousage (a plain run measures what it always did).
DEFAULT_TIERS = [t for t in TIERS if t not in NOUSAGE_TIERS]
# The tools a tier needs besides keygate (the tier is skipped, saying how to install them).
TIER_TOOLS = {"nginx": ["nginx"], "haproxy": ["haproxy"], "keygate-pg": ["postgres"],
              "keygate-redis": ["redis-server"], "direct-min": ["nginx"],
              "keygate-min": ["nginx"], "keygate-min-h1": ["nginx"], "nginx-min": ["nginx"],
              "haproxy-min": ["haproxy", "nginx"]}
PROXY_CORE = 0
LOAD_CORE = 1

# Per mode: durations in seconds, sizes, counts.
MODES = {
    "quick": dict(rounds=2, warmup_s=1, wrk_s=2, h2_s=2, rate_s=2, upload_s=1, handshake_s=1,
                  sse_events=60, slow_uploads=64, slow_bytes=1 << 20, idle_conns=600,
                  budget_s=180),  # W7 alone is ~30 s a round (3 tiers x 8 s + reload checks)
    "full": dict(rounds=5, warmup_s=3, wrk_s=10, h2_s=5, rate_s=4, upload_s=4, handshake_s=4,
                 sse_events=300, slow_uploads=64, slow_bytes=4 << 20, idle_conns=5000,
                 budget_s=30 * 60),  # W1min (~7 min: 5 tiers x 2 loads x 5 rounds) included
}

INSTALL = {
    "wrk": "apt-get install wrk",
    "h2load": "apt-get install nghttp2-client",
    "nginx": "apt-get install nginx",
    "haproxy": "apt-get install haproxy",
    "taskset": "apt-get install util-linux",
    "oha": "cargo install oha",
    "postgres": "apt-get install postgresql",
    "redis-server": "apt-get install redis-server",
}
APT_PKG = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "haproxy": "haproxy",
           "taskset": "util-linux", "postgres": "postgresql", "redis-server": "redis-server"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_tools() -> dict[str, str | None]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    tools = {t: shutil.which(t, path=path) for t in INSTALL}
    tools["postgres"] = postgres_bin()
    return tools


def postgres_bin() -> str | None:
    """The newest Debian PostgreSQL's bin directory (/usr/lib/postgresql/<version>/bin), when it
    has initdb and postgres and the postgres system user exists (PostgreSQL refuses root)."""
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "postgres").exists() and (d / "initdb").exists():
            try:
                found.append((int(d.parent.name.split(".")[0]), str(d)))
            except ValueError:
                continue
    if not found:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return max(found)[1]
