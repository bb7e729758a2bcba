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
direct, keygate, nginx, HAProxy in turn, round after round. W8 (fleet) runs W1-h1's load on
keygate and on the fleet tiers beside it: keygate-pg (keygate over a private PostgreSQL store,
its own 10,000 keys made with the same CLI) and keygate-redis ([limits] backend = "redis" on a
private redis-server); PostgreSQL and Redis run on core 1 and their CPU per request is reported
next to the proxy's (they are skipped, saying what to install, when postgresql or redis-server
is missing). W1min (full mode, or --only W1min) runs W1-h1's and W1-h2's loads on the min tiers:
direct-min (a minimal TLS origin, nginx answering `return 200 "ok"`, on core 1), keygate-min
(upstream h2), keygate-min-h1 (upstream HTTP/1.1), nginx-min and haproxy-min, each configured
like its tier but proxying to that origin, whose CPU per request is reported next to the
proxy's. keygate-nousage (only when --tiers names it; W1 only) is the keygate tier's config and
store with [keys] track_usage = false: keygate ÷ keygate-nousage is what key-usage tracking
costs. W7 (4 reloads during a W1-h1
load; not on the direct tier) runs after W1 on the long-running processes and leaves them
serving an equivalent config. The memory workloads (W2-slow, W6) run last in a round, each on a
freshly restarted process. Output:
benches/results/latest.{json,md,svg}; scratch files in benches/results/tmp.

Python 3.11 standard library only. Traffic goes to 127.0.0.1 only. Every process it starts is
stopped on exit (normal, error or Ctrl-C); every loop is bounded in count and time. Nothing is
installed: missing tools are named with the command that installs them, and what needs them is
recorded as skipped.

This file is the command line; the harness is the package beside it, benches/compare/ (its
__init__.py lists the modules and what each owns; a workload is one function in
compare/workloads.py).
"""

from __future__ import annotations

import argparse
import sys

from compare import report, runner
from compare.common import DEFAULT_TIERS, MODES, TIERS
from compare.workloads import NOT_MEASURED, WORKLOADS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, short runs (< 3 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    ap.add_argument("--only", help="workloads, e.g. W1,W3,W7 or W1-h2 (W4 is not measured here)")
    ap.add_argument("--tiers", default=",".join(DEFAULT_TIERS),
                    help="default: all of " + ",".join(DEFAULT_TIERS) + " (the fleet tiers "
                         "keygate-pg and keygate-redis run W8 only, the min tiers W1min only). "
                         "Also: keygate-nousage, the keygate tier's config and store with [keys] "
                         "track_usage = false, W1 only and only when named, e.g. --tiers "
                         "keygate,keygate-nousage,nginx --only W1 (ratios keygate ÷ "
                         "keygate-nousage: what key-usage tracking costs)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    ap.add_argument("--no-restart", action="store_true",
                    help="W2-slow and W6 on the long-running processes (default: restarted, since "
                         "memory kept by the allocator from earlier workloads hides growth)")
    ap.add_argument("--unpinned", action="store_true", help="no taskset (bench.md: also report an unpinned run)")
    ap.add_argument("--keygate-upstream", choices=["h2", "h1"], default="h2",
                    help="keygate's protocol to the fixture: h2 by ALPN (the default config) or "
                         "HTTP/1.1 only ([upstream] http2 = false, as nginx and HAProxy are run)")
    ap.add_argument("--keygate-redis", metavar="URL",
                    help="keygate keeps its per-key quotas in this Redis ([limits] backend = "
                         "\"redis\", redis_url = URL; a Redis you started). Default: local quotas")
    ap.add_argument("--report-only", action="store_true",
                    help="only render latest.md and latest.svg again from latest.json")
    args = ap.parse_args()
    if args.report_only:
        return report.report_only()
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
            ap.error(f"unknown workloads {bad}; choose from W1,W1min,W2,W3,W5,W6,W7,W8 or "
                     f"{', '.join(WORKLOADS)}")
        args.only = [names[o.lower()] for o in args.only]
        for o in args.only:
            if o in NOT_MEASURED:
                print(f"{o}: {NOT_MEASURED[o]}")
    args.tier_list = [t.strip().lower() for t in args.tiers.split(",") if t.strip()]
    bad = [t for t in args.tier_list if t not in TIERS]
    if bad or not args.tier_list:
        ap.error(f"unknown tiers {bad}; choose from {TIERS}")

    return runner.main(args)


if __name__ == "__main__":
    sys.exit(main())
