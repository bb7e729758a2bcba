"""The processes the harness starts (each in its own session, all stopped on every exit) and
what /proc says about them: CPU time, RSS, children (nginx's and HAProxy's workers), and the
CPU the rest of the machine used meanwhile."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from .common import WORK, log

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
        # A process may ask for another first signal (PostgreSQL: SIGINT, its fast shutdown).
        first = getattr(p, "stop_signal", signal.SIGTERM)
        for sig, wait in ((first, grace), (signal.SIGKILL, 2.0)):
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


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once: free_port() twice may give the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


def tree(pid: int) -> list[int]:
    """The process and its children (a PostgreSQL postmaster and its backends and workers)."""
    return [pid] + children(pid)


def cpu_us_fine(pid: int) -> float:
    """The process's time on a CPU in µs, summed over its threads, from /proc/PID/task/*/schedstat
    (nanoseconds): /proc/PID/stat counts in 10 ms ticks, too coarse for a server of several
    mostly idle processes (PostgreSQL's backends) over a short run. Falls back to ticks."""
    total, seen = 0.0, False
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[0]) / 1000
                seen = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return 0.0
    return total if seen else cpu_us([pid])


def cpu_snapshot(pids: list[int]) -> dict[int, float]:
    """CPU time per process, in µs (cpu_us_fine; see cpu_since)."""
    return {pid: cpu_us_fine(pid) for pid in pids}


def cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """The CPU the processes used since the snapshot, in µs; a process started since counts
    whole (a server's new backend), one that exited since is lost."""
    return sum(max(0.0, cpu_us_fine(pid) - before.get(pid, 0.0)) for pid in pids)


def cpu_since_by_process(before: dict[int, float], pids: list[int]) -> dict[str, float]:
    """cpu_since by process title (/proc/PID/cmdline: "postgres: checkpointer", a backend's
    "postgres: postgres keygate 127.0.0.1(port) idle", ...), in ms; only those that used CPU."""
    out: dict[str, float] = {}
    for pid in pids:
        used = max(0.0, cpu_us_fine(pid) - before.get(pid, 0.0))
        if used < 50:  # under 50 µs: not worth a line
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            title = str(pid)
        title = f"{title[:80]} [{pid}]"
        out[title] = out.get(title, 0.0) + used / 1000
    return out


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
