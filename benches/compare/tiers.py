"""The tiers: the processes under test and how to reach them. direct is the upstream fixture
(examples/bench_upstream.rs) itself; keygate, nginx and HAProxy proxy to it. The fleet tiers
are keygate again with the same config but for the store (keygate-pg: a private PostgreSQL,
its own 10,000 keys made by the same CLI) or the quotas (keygate-redis: [limits] backend =
"redis" on a private redis-server, the keygate tier's SQLite store and keys). keygate-nousage is
keygate again with the same config, store and keys but for [keys] track_usage = false (W1 only,
when asked for: what the per-request key-usage tracking costs).

The min tiers (W1min) are direct, keygate (twice: upstream h2 and HTTP/1.1), nginx and HAProxy
again, each configured exactly like its tier but for the upstream address: a minimal TLS origin
(nginx answering `return 200 "ok"`, templates/origin.conf.tmpl, on the load generator's core
beside the fixture) instead of the fixture. They are tiers of their own, set up only when a
workload that runs on them is selected (as the fleet tiers), rather than a switch that points
the usual tiers elsewhere, because that is what keeps them side by side with nothing else
changed: the fixture and every existing workload and tier stay as they were, one run can hold
both, the runner's round-robin, accounting and report take them like any tier, and the origin's
CPU is measured per run like the fleet tiers' servers (server_pids).

This module owns their certificates (keygate's development CA), the 10,000 keys and the key with
a large quota, their configs (keygate's written here, nginx's, HAProxy's and the origin's from
benches/templates), the private PostgreSQL and Redis servers and the minimal origin (on the load
generator's core), starting, checking, restarting and reloading them, and which pids to
measure."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .client import http_get, tls_context
from .common import (FIXTURE, FLEET_TIERS, INSTALL, KEYGATE, KEYGATE_TIERS, LOAD_CORE, MIN_OF,
                     MIN_TIERS, MODES, N_KEYS, OPTIONAL_TIERS, PROXY_CORE, TEMPLATES, TIER_TOOLS,
                     TOKEN, WORK, log)
from .processes import (Processes, children, free_port, free_ports, tree, wait_for_line,
                        wait_for_port)

REDIS_PREFIX = "keygate:"


class Tiers:
    """The fixture and the proxies of one run. A workload gets this object and the name of the
    tier to load: it reaches the tier by port[tier] or url(), watches pids(), and finds here
    what the run was given (args, mode, tools, procs) and note() for what the report should
    say."""

    def __init__(self, args, procs: Processes, tools: dict[str, str | None],
                 note: Callable[[str], None] | None = None):
        self.args = args
        self.mode = MODES["quick" if args.quick else "full"]
        self.procs = procs
        self.tools = tools
        self.note = note or (lambda msg: log("note: " + msg))
        self.certs = WORK / "certs"
        self.ca = self.certs / "ca.pem"
        self.keys: list[str] = []
        self.big_key = ""
        # Tiers whose keys are not keys.txt's (keygate-pg: made in its own store): (key file,
        # the keys, the key with a large quota).
        self.tier_keys: dict[str, tuple[str, list[str], str]] = {}
        # "postgres", "redis" (fleet tiers), "origin" (the min tiers' nginx origin)
        self.servers: dict[str, subprocess.Popen] = {}
        self.unavailable: dict[str, str] = {}  # tier -> why it does not run (set up)
        self.ports: dict[str, int] = {}  # every listener, by name (setup)
        self.port: dict[str, int] = {}   # each tier's TLS port, the one its clients use (setup)
        self.proc: dict[str, subprocess.Popen] = {}
        self.ctx: ssl.SSLContext | None = None
        self.needs_warmup: set[str] = set()  # restarted proxies, their key caches cold

    # ---- setup

    def key_file(self, tier: str) -> str:
        return self.tier_keys[tier][0] if tier in self.tier_keys else str(WORK / "keys.txt")

    def tier_key(self, tier: str, i: int) -> str:
        return (self.tier_keys[tier][1] if tier in self.tier_keys else self.keys)[i]

    def tier_big_key(self, tier: str) -> str:
        return self.tier_keys[tier][2] if tier in self.tier_keys else self.big_key

    def server_pids(self, tier: str) -> list[tuple[str, str, list[int]]]:
        """The fleet or min tier's shared server, which runs on the load generator's core:
        [(metric, name, pids)]; PostgreSQL: the postmaster and its backends and workers; the
        minimal origin: its nginx worker(s) (the master only supervises)."""
        name = "origin" if tier in MIN_TIERS else {"keygate-pg": "postgres",
                                                    "keygate-redis": "redis"}.get(tier)
        if not name or name not in self.servers:
            return []
        if name == "origin":
            return [("origin_cpu_us_per_req", name, children(self.servers[name].pid))]
        metric = "store_cpu_us_per_req" if name == "postgres" else "redis_cpu_us_per_req"
        return [(metric, name, tree(self.servers[name].pid))]

    @staticmethod
    def kind(tier: str) -> str:
        """What the tier runs: direct, keygate, nginx or haproxy (a min tier: its tier's)."""
        tier = MIN_OF.get(tier, tier)
        return "keygate" if tier in KEYGATE_TIERS else tier

    def pids(self, tier: str) -> list[int]:
        if self.kind(tier) == "direct":
            return []
        p = self.proc[tier]
        if self.kind(tier) in ("nginx", "haproxy"):
            # The worker(s); the master only supervises (HAProxy runs master-worker, -W, so
            # that W7 can reload it gracefully). Right after a reload an old worker may still
            # be finishing its connections: it is counted too while it lives.
            return children(p.pid)
        return [p.pid]

    def fixture_pids(self) -> list[int]:
        return [self.proc["fixture"].pid]

    def keygate_config(self, path: Path, proxy: int, admin: int, certgen: bool,
                       store_url: str | None = None, redis_url: str | None = None,
                       upstream_port: int | None = None, http2: bool | None = None,
                       track_usage: bool = True) -> None:
        """keygate's bench config; the fleet tiers' differ only by store_url (the PostgreSQL
        store instead of SQLite) or redis_url ([limits] backend = "redis"), the min tiers' by
        upstream_port (the minimal origin instead of the fixture) and http2 (keygate-min: h2,
        keygate-min-h1: HTTP/1.1, whatever --keygate-upstream says), keygate-nousage's by
        track_usage ([keys] track_usage = false)."""
        if certgen:
            tls = f'dev_dir = "{self.certs}"'
            upstream = ""
        else:
            tls = f'cert = "{self.certs}/server.pem"\nkey = "{self.certs}/server-key.pem"'
            if http2 is None:
                http2 = self.args.keygate_upstream == "h2"
            h2 = "true" if http2 else "false"
            upstream = f'[upstream]\nca_file = "{self.ca}"\nhttp2 = {h2}\n'
        # Every instance of a fleet shares the master key: the same file here.
        store = (f'url = "{store_url}"' if store_url else f'path = "{WORK}/kg/keygate.db"')
        # --keygate-redis URL: every keygate config (the keygate tier's, and so keygate-pg's
        # alike) keeps its per-key quotas in that Redis (one you started), under its own prefix;
        # the keygate-redis tier's private Redis (redis_url) comes first.
        prefix = REDIS_PREFIX
        if not redis_url and getattr(self.args, "keygate_redis", None):
            redis_url, prefix = self.args.keygate_redis, "keygate-bench:"
        limits_backend = (f'backend = "redis"\nredis_url = "{redis_url}"\n'
                          f'redis_prefix = "{prefix}"\n' if redis_url else "")
        usage = "" if track_usage else "track_usage = false  # keygate-nousage: no key-usage counts\n"
        path.write_text(f"""# written by benches/compare.py
[listen]
proxy = "127.0.0.1:{proxy}"
admin = "127.0.0.1:{admin}"

[tls]
{tls}

[store]
{store}
master_key_file = "{WORK}/kg/master.key"

{upstream}
[keys]
cache_ttl = "1h"      # the run is <= 20 min: no mass expiry of the 10,000 warmed keys mid-run
{usage}
[limits]
default = {{ per_second = 1000, burst = 2000 }}
admin = {{ per_second = 100000, burst = 100000 }}
{limits_backend}
[server]
worker_threads = 1
max_connections = 20000
header_read_timeout = "60s"   # it also ends idle keep-alive connections: W6 holds them ~10 s

[[route]]
prefix = "/"
upstream = "https://127.0.0.1:{upstream_port or self.ports.get('fixture', 1)}"
inject = {{ ai_secret = "UP" }}
""")

    def setup(self) -> None:
        if WORK.exists():
            shutil.rmtree(WORK)
        (WORK / "kg").mkdir(parents=True)
        (WORK / "nginx-tmp").mkdir()
        names = ("fixture", "fixture_plain", "keygate", "keygate_admin", "nginx", "haproxy",
                 "keygate-pg", "keygate-pg_admin", "keygate-redis", "keygate-redis_admin",
                 "postgres", "redis", "certgen", "certgen_admin", "origin", "keygate-min",
                 "keygate-min_admin", "keygate-min-h1", "keygate-min-h1_admin", "nginx-min",
                 "haproxy-min", "keygate-nousage", "keygate-nousage_admin")
        self.ports.update(zip(names, free_ports(len(names))))

        # Certificates: keygate writes its development CA and server certificate on start.
        log("generating certificates (keygate serve with [tls] dev_dir)")
        cfg0 = WORK / "certgen.toml"
        self.keygate_config(cfg0, self.ports["certgen"], self.ports["certgen_admin"], certgen=True)
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
        mins = [t for t in self.names() if t in MIN_TIERS]
        # nginx's and HAProxy's configs (and the min tiers': the same but for the upstream, the
        # minimal origin); the origin's.
        renders = [("nginx", "nginx.conf.tmpl", "fixture"),
                   ("haproxy", "haproxy.cfg.tmpl", "fixture")]
        renders += [(t, f"{MIN_OF[t]}.{'conf' if MIN_OF[t] == 'nginx' else 'cfg'}.tmpl", "origin")
                    for t in ("nginx-min", "haproxy-min") if t in mins]
        if mins:
            renders.append(("origin", "origin.conf.tmpl", "origin"))
        for tier, tmpl, upstream in renders:
            text = (TEMPLATES / tmpl).read_text()
            for k, v in dict(subst, PORT=str(self.ports[tier]), NAME=tier,
                             UPSTREAM_PORT=str(self.ports[upstream])).items():
                text = text.replace("{{" + k + "}}", v)
            left = re.findall(r"\{\{\w+\}\}", text)
            if left:
                raise RuntimeError(f"{tmpl}: unfilled placeholders {left}")
            (WORK / self.config_name(tier)).write_text(text)
            if not tier.startswith("haproxy"):
                (WORK / f"{tier}-tmp").mkdir(exist_ok=True)

        # The fixture (and the minimal origin) on the load generator's core, the proxies on the
        # other one.
        self.proc["fixture"] = self.start_fixture(self.ports["fixture"], self.ports["fixture_plain"],
                                                  "fixture")
        self.port = {"direct": self.ports["fixture"], "keygate": self.ports["keygate"],
                     "keygate-nousage": self.ports["keygate-nousage"],
                     "keygate-pg": self.ports["keygate-pg"],
                     "keygate-redis": self.ports["keygate-redis"],
                     "nginx": self.ports["nginx"], "haproxy": self.ports["haproxy"],
                     "direct-min": self.ports["origin"], "keygate-min": self.ports["keygate-min"],
                     "keygate-min-h1": self.ports["keygate-min-h1"],
                     "nginx-min": self.ports["nginx-min"], "haproxy-min": self.ports["haproxy-min"]}
        if mins:
            try:
                self.start_origin()
            except Exception as e:
                for t in mins:
                    self.unavailable[t] = f"the minimal origin did not start: {e}"[-600:]
                log(f"min tiers: {self.unavailable[mins[0]]}")
        for tier in ("keygate-min", "keygate-min-h1"):
            if tier in self.names():
                self.keygate_config(WORK / f"{tier}.toml", self.ports[tier],
                                    self.ports[f"{tier}_admin"], certgen=False,
                                    upstream_port=self.ports["origin"],
                                    http2=tier == "keygate-min")
        if "keygate-nousage" in self.names():
            # The keygate tier's store (its keys and secret), its own listeners.
            self.keygate_config(WORK / "keygate-nousage.toml", self.ports["keygate-nousage"],
                                self.ports["keygate-nousage_admin"], certgen=False,
                                track_usage=False)
            self.note("keygate-nousage: the keygate tier's config (the same store, keys and "
                      "secret) with [keys] track_usage = false")
        for tier in self.names():
            if tier in FLEET_TIERS:
                try:
                    self.setup_fleet(tier, env)
                except Exception as e:
                    self.unavailable[tier] = f"set-up failed: {type(e).__name__}: {e}"[:600]
                    log(f"{tier}: {self.unavailable[tier]}")
        for tier in self.names():
            if self.kind(tier) == "direct":
                continue
            try:
                if self.kind(tier) == "nginx":
                    r = self.procs.run(self.nginx_argv(tier) + ["-t"], None, 30)
                    if r.returncode:
                        raise RuntimeError(f"nginx -t: {r.stderr.decode(errors='replace')}")
                if self.kind(tier) == "haproxy":
                    r = self.procs.run([self.tools["haproxy"], "-c", "-f",
                                        str(WORK / self.config_name(tier))], None, 30)
                    if r.returncode:
                        raise RuntimeError(f"haproxy -c: {(r.stdout + r.stderr).decode(errors='replace')}")
                self.start_proxy(tier)
            except Exception as e:
                if tier not in OPTIONAL_TIERS:
                    raise
                self.unavailable[tier] = f"did not start: {e}"[-600:]
                log(f"{tier}: {self.unavailable[tier]}")
        self.check_tiers()

    @staticmethod
    def config_name(tier: str) -> str:
        """The config file of an nginx, HAProxy or origin tier in WORK."""
        return f"{tier}.cfg" if tier.startswith("haproxy") else f"{tier}.conf"

    def start_origin(self) -> None:
        """The minimal TLS origin of the min tiers: nginx (templates/origin.conf.tmpl) on the
        load generator's core, as the fixture; its worker is what server_pids() measures."""
        argv = [self.tools["nginx"], "-e", str(WORK / "origin-error.log"), "-p", str(WORK),
                "-c", str(WORK / "origin.conf")]
        r = self.procs.run(argv + ["-t"], None, 30)
        if r.returncode:
            raise RuntimeError(f"nginx -t (origin): {r.stderr.decode(errors='replace')}")
        lp = WORK / "origin.log"
        p = self.procs.start("origin", argv + ["-g", "daemon off;"], LOAD_CORE, lp)
        self.servers["origin"] = p
        wait_for_port(p, self.ports["origin"], 15, "origin", lp)
        for _ in range(100):
            if children(p.pid):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"origin: no worker process 5 s after its port opened; log {lp}")
        self.note(f"min tiers: the origin is nginx (`return 200 \"ok\"`, h2 and http/1.1 by "
                  f"ALPN, templates/origin.conf.tmpl) on 127.0.0.1:{self.ports['origin']}, on "
                  f"the load generator's core")

    # ---- the fleet tiers' servers and stores

    def setup_fleet(self, tier: str, env: dict) -> None:
        """keygate-pg: a private PostgreSQL, then the secret and 10,000 keys (+ the key with a
        large quota) in it with the CLI, as for the SQLite store. keygate-redis: a private
        redis-server; the store is the keygate tier's SQLite file (the same keys)."""
        cfg = WORK / f"{tier}.toml"
        if tier == "keygate-redis":
            url = self.start_redis()
            self.keygate_config(cfg, self.ports[tier], self.ports[f"{tier}_admin"], certgen=False,
                                redis_url=url)
            return
        url = self.start_postgres()
        self.keygate_config(cfg, self.ports[tier], self.ports[f"{tier}_admin"], certgen=False,
                            store_url=url)
        # The CLI that makes the keys gets a longer store.timeout than the server's (the
        # default, 3 s): `keys create --count 10000` is one transaction that takes longer than
        # 3 s on PostgreSQL here. The server's config is keygate-pg.toml, unchanged.
        cli_cfg = WORK / f"{tier}-cli.toml"
        text = cfg.read_text()
        cli_cfg.write_text(text.replace(f'url = "{url}"\n', f'url = "{url}"\ntimeout = "120s"\n', 1))
        kg = [str(KEYGATE), "--config", str(cli_cfg)]
        r = self.procs.run(kg + ["secrets", "put", "UP", "--type", "openai"], None, 60,
                           stdin=f"{TOKEN}\n".encode(), env=env)
        if r.returncode:
            raise RuntimeError(f"secrets put (PostgreSQL) failed: {r.stderr.decode(errors='replace')}")
        t0 = time.monotonic()
        r = self.procs.run(kg + ["keys", "create", "--name", "bench", "--count", str(N_KEYS)],
                           None, 300, env=env)
        keys = [k for k in r.stdout.decode().split("\n") if k.strip()]
        if r.returncode or len(keys) != N_KEYS:
            raise RuntimeError(f"keys create (PostgreSQL) gave {len(keys)} keys: "
                               f"{r.stderr.decode(errors='replace')}")
        log(f"{tier}: {N_KEYS} keys created in PostgreSQL in {time.monotonic() - t0:.1f} s")
        r = self.procs.run(kg + ["keys", "create", "--name", "bench-h2", "--rate", "1000000",
                                 "--burst", "1000000"], None, 60, env=env)
        big = r.stdout.decode().strip()
        if r.returncode or not big.startswith("sk-"):
            raise RuntimeError(f"keys create (PostgreSQL, h2 key) failed: "
                               f"{r.stderr.decode(errors='replace')}")
        # Statistics for the fresh keys table now, not by autovacuum during a measured run.
        bindir = Path(self.tools["postgres"])
        r = self.procs.run([str(bindir / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p",
                            str(self.ports["postgres"]), "-U", "postgres", "-d", "keygate", "-c",
                            "VACUUM ANALYZE"], LOAD_CORE, 120,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
        if r.returncode:
            raise RuntimeError(f"VACUUM ANALYZE failed: {r.stderr.decode(errors='replace')[-400:]}")
        kf = WORK / f"keys-{tier}.txt"
        kf.write_text("\n".join(keys) + "\n")
        self.tier_keys[tier] = (str(kf), keys, big)

    def start_postgres(self) -> str:
        """initdb + postgres as the postgres user (PostgreSQL refuses root; setpriv execs, so
        the pid is the postmaster's, and its parent-death signal is SIGINT, a fast shutdown),
        on 127.0.0.1:port and a socket in WORK/pg/sock, on the load generator's core. Trust
        authentication (loopback only, a throw-away cluster); fsync and synchronous commit off.
        Returns the store URL."""
        bindir = Path(self.tools["postgres"])
        pw = pwd.getpwnam("postgres")
        root = WORK / "pg"
        (root / "sock").mkdir(parents=True)
        for d in (root, root / "sock"):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        as_pg = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                 "--pdeathsig", "INT", "--"]
        # No PG* variable of the caller's environment leaks in.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        r = self.procs.run(as_pg + [str(bindir / "initdb"), "-D", str(root / "data"), "-U",
                                    "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
                                    "--no-sync", "--no-instructions"], LOAD_CORE, 120, env=env)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {(r.stdout + r.stderr).decode(errors='replace')[-600:]}")
        port = self.ports["postgres"]
        lp = WORK / "postgres.log"
        p = self.procs.start("postgres", as_pg + [
            str(bindir / "postgres"), "-D", str(root / "data"), "-k", str(root / "sock"),
            "-c", "listen_addresses=127.0.0.1", "-p", str(port), "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off"], LOAD_CORE, lp, env=env)
        p.stop_signal = signal.SIGINT
        self.servers["postgres"] = p
        wait_for_line(p, lp, "database system is ready to accept connections", 60, "postgres")
        r = self.procs.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                            "postgres", "keygate"], LOAD_CORE, 30, env=env)
        if r.returncode:
            raise RuntimeError(f"createdb failed: {r.stderr.decode(errors='replace')[-400:]}")
        version = self.procs.run([str(bindir / "postgres"), "--version"], None, 10)
        self.note(f"keygate-pg: {version.stdout.decode().strip()} on 127.0.0.1:{port} "
                  f"(initdb --auth=trust, fsync=off, synchronous_commit=off), on the load "
                  f"generator's core")
        return f"postgres://postgres@127.0.0.1:{port}/keygate"

    def start_redis(self) -> str:
        """redis-server on 127.0.0.1:port without persistence, on the load generator's core."""
        port = self.ports["redis"]
        (WORK / "redis").mkdir(exist_ok=True)
        lp = WORK / "redis.log"
        p = self.procs.start("redis-server", [
            "setpriv", "--pdeathsig", "TERM", "--", self.tools["redis-server"],
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(WORK / "redis")], LOAD_CORE, lp)
        self.servers["redis"] = p
        wait_for_line(p, lp, "Ready to accept connections", 30, "redis-server")
        version = self.procs.run([self.tools["redis-server"], "--version"], None, 10)
        self.note(f"keygate-redis: {version.stdout.decode().split(' sha=')[0].strip()} on "
                  f"127.0.0.1:{port} (--save '' --appendonly no), on the load generator's core; "
                  f"the keygate tier's SQLite store")
        return f"redis://127.0.0.1:{port}/0"

    def start_fixture(self, tls_port: int, plain_port: int | None, name: str) -> subprocess.Popen:
        lp = WORK / f"{name}.log"
        argv = [str(FIXTURE), "--tls", f"127.0.0.1:{tls_port}", "--certs", str(self.certs),
                "--threads", "1"]
        if plain_port:
            argv += ["--plain", f"127.0.0.1:{plain_port}"]
        p = self.procs.start(name, argv, LOAD_CORE, lp)
        wait_for_line(p, lp, "bench-upstream: ready", 15, name)
        return p

    def nginx_argv(self, tier: str = "nginx") -> list[str]:
        return [self.tools["nginx"], "-e", str(WORK / f"{tier}-error.log"), "-p", str(WORK),
                "-c", str(WORK / self.config_name(tier))]

    def haproxy_argv(self, tier: str = "haproxy") -> list[str]:
        return [self.tools["haproxy"], "-W", "-db", "-f", str(WORK / self.config_name(tier))]

    def start_proxy(self, tier: str) -> None:
        lp = WORK / f"{tier}.log"
        if self.kind(tier) == "keygate":
            env = dict(os.environ, KEYGATE_LOG="warn")
            p = self.procs.start(tier, [str(KEYGATE), "--config", str(WORK / f"{tier}.toml"),
                                        "serve"], PROXY_CORE, lp, env=env)
            wait_for_line(p, lp, "proxy listening on", 30, tier)
        else:
            if self.kind(tier) == "nginx":
                p = self.procs.start(tier, self.nginx_argv(tier) + ["-g", "daemon off;"],
                                     PROXY_CORE, lp)
            else:
                # Master-worker mode (-W; -db keeps the master in the foreground, as the child
                # of the harness): SIGUSR2 to the master reloads gracefully (W7). The worker
                # does the work and is what pids() measures, as for nginx.
                p = self.procs.start(tier, self.haproxy_argv(tier), PROXY_CORE, lp)
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

    def names(self) -> list[str]:
        """The tiers asked for that can run (nginx, HAProxy, the fleet tiers' PostgreSQL and Redis,
        the min tiers' nginx origin only when installed; a fleet or min tier whose set-up failed
        is out too)."""
        out = []
        for t in self.args.tier_list:
            if any(not self.tools.get(tool) for tool in TIER_TOOLS.get(t, [])):
                continue
            if t in self.unavailable:
                continue
            out.append(t)
        return out

    def why_not(self, tier: str) -> str:
        """Why a tier asked for does not run."""
        if tier in self.unavailable:
            return self.unavailable[tier]
        tools = [t for t in TIER_TOOLS.get(tier, [tier]) if not self.tools.get(t)] or [tier]
        return "; ".join(f"{t} not installed ({INSTALL.get(t, '?')})" for t in tools)

    def check_tiers(self) -> None:
        """Before measuring: every tier answers 200, every proxy injects the token and strips
        the key, and refuses an unknown key with 401. A fleet or min tier that fails is left out
        (noted), the others end the run."""
        for tier in self.names():
            try:
                self.check_tier(tier)
            except Exception as e:
                if tier not in OPTIONAL_TIERS:
                    raise
                self.unavailable[tier] = f"check failed: {e}"[:600]
                log(f"{tier}: {self.unavailable[tier]}")
                p = self.proc.pop(tier, None)
                if p:
                    self.procs.stop(p)
                    self.procs.forget(p)

    def check_tier(self, tier: str) -> None:
        port = self.port[tier]
        status, body = http_get(port, self.ctx, "/whoami", self.tier_key(tier, 0))
        text = body.decode(errors="replace")
        if status != 200:
            raise RuntimeError(f"{tier}: GET /whoami answered {status}: {text[:300]}")
        if self.kind(tier) != "direct":
            if f"authorization=Bearer {TOKEN}" not in text or "x-api-key=absent" not in text:
                raise RuntimeError(f"{tier}: the upstream saw {text!r}; expected the injected "
                                   f"token and no x-api-key")
            status, _ = http_get(port, self.ctx, "/", "sk-" + "0" * 48)
            if status != 401:
                raise RuntimeError(f"{tier}: an unknown key got {status}, not 401")
            status, _ = http_get(port, self.ctx, "/", self.tier_big_key(tier))
            if status != 200:
                raise RuntimeError(f"{tier}: the h2 key got {status}")
        if tier in FLEET_TIERS:
            # What the fleet tier runs on, as keygate says: a tier quietly on the embedded
            # store, or on local quotas because Redis is unreachable, would measure nothing.
            ready = self.kg_readyz(tier)
            store = ready.get("checks", {}).get("key_store", {}).get("backend")
            limits = ready.get("limits", {})
            want_store = "sqlite" if tier == "keygate-redis" else "postgres"
            want_limits = "redis" if tier == "keygate-redis" else limits.get("backend", "local")
            if (store and want_store not in str(store).lower()) \
                    or limits.get("backend", "local") != want_limits or limits.get("degraded"):
                raise RuntimeError(f"{tier}: /readyz says store {store!r}, limits {limits}")
            self.note(f"{tier}: /readyz says key store {store!r}, limits {limits}")
        log(f"{tier}: OK on 127.0.0.1:{port} (credential rewritten, unknown key 401)"
            if self.kind(tier) != "direct" else f"{tier}: OK on 127.0.0.1:{port}")

    def url(self, tier: str, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.port[tier]}{path}"

    # ---- for the workloads that measure a fresh process (W2-slow, W6)

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

    # ---- reloads (W7)

    def kg_readyz(self, tier: str = "keygate") -> dict:
        """keygate's /readyz on the admin listener (no key needed): {"config": {"generation"...},
        "checks": {"key_store": {"backend"...}}, "limits": {"backend", "degraded"}}."""
        status, body = http_get(self.ports[f"{tier}_admin"], self.ctx, "/readyz", None, timeout=3.0)
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

    def reload_master(self, tier: str, t0: float) -> dict:
        """nginx or HAProxy: the master's reload signal, then wait (<= 15 s) for a new worker
        (HAProxy: and the master's "Loading success"). ms: from t0 to then."""
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

    # ---- between runs

    def check_alive(self, when: str) -> None:
        """A proxy that has exited is noted and started again; a dead fixture ends the run; a
        dead PostgreSQL or Redis is noted (its tier's runs then fail)."""
        for name, p in list(self.servers.items()):
            if p.poll() is not None:
                self.note(f"{name} had exited (code {p.returncode}) {when}; log "
                          f"{WORK / (name + '.log')}")
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
