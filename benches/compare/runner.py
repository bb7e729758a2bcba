"""The run: what benches/compare.py does after reading its command line. It checks the tools,
builds keygate and the bench examples, pins itself to the load generator's core, sets the tiers
up, warms them, and runs every workload on every tier in turn, round after round (Bench); it
accounts for the proxy's and the fixture's CPU and RSS around each run, records what was
skipped, what failed and the notes, stops every process it started on any exit, and writes the
outputs (report.write_outputs), also after an interruption."""

from __future__ import annotations

import datetime
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time

from .common import (APT_PKG, FIXTURE, FLEET_TIERS, INSTALL, KEYGATE, LOAD_CORE, MODES,
                     OPTIONAL_TIERS, PROBE, RESULTS, ROOT, TIER_TOOLS, TMP, find_tools, log)
from .processes import (OtherLoad, Processes, cpu_since, cpu_since_by_process, cpu_snapshot,
                        cpu_us, rss_kib)
from .report import write_outputs
from .tiers import Tiers
from .workloads import WORKLOADS, h2load_h2, wrk


class Stop(BaseException):
    """SIGTERM: unwind like Ctrl-C (not caught by `except Exception`) so that every started
    process is stopped."""


def on_sigterm(_signum, _frame):
    raise Stop("SIGTERM")


class Bench:
    """The rounds: which workloads run, the warm-up, one run of a workload on a tier with its
    accounting, and what the report gets (measurements, skipped, notes)."""

    def __init__(self, args, procs: Processes, tools: dict[str, str | None]):
        self.args = args
        self.mode = MODES["quick" if args.quick else "full"]
        self.procs = procs
        self.tools = tools
        self.tiers = Tiers(args, procs, tools, self.note)
        self.measurements: list[dict] = []
        self.skipped: list[dict] = []
        self.notes: list[str] = []
        self.started_at = time.monotonic()

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            log("note: " + msg)

    def workloads(self) -> list[str]:
        out = []
        order = ([w for w, spec in WORKLOADS.items() if not spec.restarts]
                 + [w for w, spec in WORKLOADS.items() if spec.restarts])
        for w in order:
            spec = WORKLOADS[w]
            if self.args.only is not None:
                if not any(w == o or w.startswith(o + "-") for o in self.args.only):
                    continue
            elif spec.full_only and self.args.quick:
                self.skipped.append({"workload": w, "tier": "*",
                                     "reason": f"full mode only (run without --quick, or --only {w})"})
                continue
            missing = [t for t in spec.tools if not self.tools.get(t)]
            how = "; ".join(INSTALL[t] for t in missing)
            if spec.tools_any and not any(self.tools.get(t) for t in spec.tools_any):
                missing = [" or ".join(spec.tools_any)]
                how = ", or ".join(INSTALL[t] for t in spec.tools_any)
            if missing:
                self.skipped.append({"workload": w, "tier": "*",
                                     "reason": f"needs {', '.join(missing)} ({how})"})
                continue
            out.append(w)
        return out

    def run_one(self, rnd: int, workload: str, tier: str) -> None:
        spec = WORKLOADS[workload]
        self.tiers.check_alive(f"before {workload} on {tier}, round {rnd}")
        own = spec.own_accounting  # these replace the process(es) and account for themselves
        pids = [] if own else self.tiers.pids(tier)
        fpids = [] if own else self.tiers.fixture_pids()
        # The fleet tiers' PostgreSQL or Redis (on the load generator's core), like the fixture.
        servers = [] if own else self.tiers.server_pids(tier)
        s0 = [cpu_snapshot(spids) for _, _, spids in servers]
        c0, f0, t0 = cpu_us(pids), cpu_us(fpids), time.monotonic()
        other = OtherLoad()
        rec = {"round": rnd, "tier": tier, "workload": workload}
        try:
            m, cmd = spec.run(self.tiers, tier)
            rec["command"] = re.sub(r"sk-[A-Za-z0-9]{48}", "KEY", cmd)  # no keys in the results
        except Exception as e:
            rec["failed"] = f"{type(e).__name__}: {e}"
            self.measurements.append(rec)
            log(f"  {workload:<13} {tier:<8} FAILED: {rec['failed'][:300]}")
            return
        c1, f1 = cpu_us(pids), cpu_us(fpids)
        # Backends that started during the run count too (PostgreSQL forks one per connection).
        now = self.tiers.server_pids(tier)
        s1 = [cpu_since(before, now[i][2]) for i, before in enumerate(s0)]
        by_process = [cpu_since_by_process(before, now[i][2]) for i, before in enumerate(s0)]
        reqs = m.get("requests") or 0
        m["wall_s"] = time.monotonic() - t0
        m["other_cpu_pct"], m["steal_pct"] = other.done()
        if pids:
            m["proxy_cpu_s"] = (c1 - c0) / 1e6
            if m.get("load_s"):
                m["proxy_cpu_pct"] = 100 * m["proxy_cpu_s"] / m["load_s"]
            if reqs:
                m[spec.cpu_metric] = (c1 - c0) / reqs
            m["rss_mib"] = rss_kib(pids) / 1024
        if fpids and reqs:
            m["fixture_cpu_us_per_req"] = (f1 - f0) / reqs
        for (metric, name, _), used, procs in zip(servers, s1, by_process):
            m[f"{name}_cpu_s"] = used / 1e6
            m[f"{name}_cpu_ms_by_process"] = procs
            if reqs:
                m[metric] = used / reqs
        rec["metrics"] = m
        self.measurements.append(rec)
        shown = {k: m.get(k) for k, *_ in spec.columns}
        shown["other%"] = m["other_cpu_pct"]
        log(f"  {workload:<13} {tier:<8} " + " ".join(
            f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, (int, float)))
            + f" errors={m.get('errors', 0)}")
        if m.get("errors"):
            log(f"    errors: {m.get('error_messages') or m.get('socket_errors_detail') or ''} "
                f"non-2xx={m.get('non_2xx', '')}")

    def warm_up(self, tiers: list[str], secs: int, h2: bool) -> None:
        # keygate-pg fills its key cache of 10,000 keys from PostgreSQL: at least 3 s.
        log(f"warm-up: {', '.join(tiers)} ({secs} s each"
            + (", fleet tiers at least 3 s)" if set(tiers) & set(FLEET_TIERS) else ")"))
        for tier in tiers:
            try:
                if self.tools.get("wrk"):
                    wrk(self.tiers, tier, 64, max(secs, 3) if tier in FLEET_TIERS else secs, "/",
                        ["GET", "0"])
                if h2 and self.tools.get("h2load"):
                    h2load_h2(self.tiers, tier, secs)
            except Exception as e:
                self.note(f"warm-up on {tier} failed: {e}")

    def run(self) -> None:
        workloads = self.workloads()
        tiers = self.tiers.names()
        for t in self.args.tier_list:
            if t not in tiers:
                self.skipped.append({"workload": "*", "tier": t, "reason": self.tiers.why_not(t)})
        log(f"tiers: {', '.join(tiers)}; workloads: {', '.join(workloads)}; "
            f"rounds: {self.args.rounds}")
        quick = self.args.quick
        h2 = not quick and any(w in workloads for w in ("W1-h2", "W1-rate"))
        self.warm_up([t for t in tiers if not (quick and t in ("direct", "direct-min"))],
                     self.mode["warmup_s"], h2)
        budget = self.mode["budget_s"]
        for rnd in range(1, self.args.rounds + 1):
            if self.tiers.needs_warmup:
                # The memory workloads of the last round left the proxies holding thousands of
                # connections' worth of memory: restart them once more so that every round
                # starts alike, and fill the key caches again (10,000 keys).
                again = [t for t in tiers if t in self.tiers.needs_warmup]
                for t in again:
                    self.tiers.restart_proxy(t)
                self.warm_up(again, 1 if quick else 2, False)
                self.tiers.needs_warmup.clear()
            log(f"round {rnd}/{self.args.rounds}")
            for w in workloads:
                for tier in tiers:
                    reason = WORKLOADS[w].proxy_only
                    if tier == "direct" and reason:
                        if rnd == 1:
                            self.skipped.append({"workload": w, "tier": tier, "reason": reason})
                        continue
                    on = WORKLOADS[w].on_tiers
                    if not WORKLOADS[w].runs_on(tier):
                        # The fleet tiers run W8 only, the min tiers W1min only, keygate-nousage
                        # W1 only; W8 runs on keygate and the fleet tiers.
                        if rnd == 1 and on:
                            self.skipped.append({"workload": w, "tier": tier,
                                                 "reason": f"runs on {', '.join(on)} only"})
                        continue
                    if time.monotonic() - self.started_at > budget:
                        self.skipped.append({"workload": w, "tier": tier, "round": rnd,
                                             "reason": f"time budget of {budget} s used up"})
                        continue
                    self.run_one(rnd, w, tier)


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main(args) -> int:
    """The whole run for the parsed command line (benches/compare.py); the exit status."""
    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored

    tools = find_tools()
    wanted = ["wrk", "h2load", "nginx", "haproxy", "taskset"]
    wanted += [tool for t in OPTIONAL_TIERS if t in args.tier_list
               for tool in TIER_TOOLS.get(t, []) if tool not in wanted]
    missing = [t for t in wanted if not tools[t]]
    if missing:
        pkgs = " ".join(APT_PKG[t] for t in missing)
        print(f"missing: {', '.join(missing)}; install with:  apt-get install {pkgs}\n"
              f"(everything: apt-get install wrk nghttp2-client nginx haproxy postgresql "
              f"redis-server; optional: cargo install oha)\n"
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
    # The fleet tiers (a PostgreSQL and a Redis to start, 10,000 keys to make), the min tiers
    # (the minimal origin and four more proxies) and keygate-nousage only when a workload that
    # runs on them (W8, W1min, W1) is selected.
    selected = [w for w in WORKLOADS if (any(w == o or w.startswith(o + "-") for o in args.only)
                                         if args.only is not None
                                         else not (args.quick and WORKLOADS[w].full_only))]
    args.tier_list = [t for t in args.tier_list if t not in OPTIONAL_TIERS
                      or any(WORKLOADS[w].runs_on(t) for w in selected)]
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
        bench.tiers.setup()
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
        # Whether quotas were in Redis; never the URL (it may carry a password).
        "keygate_limits": "redis" if getattr(args, "keygate_redis", None) else "local",
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
