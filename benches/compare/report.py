"""The outputs: latest.json (every measurement, the per-tier summary and the keygate ÷ peer
ratios), latest.md (a table per workload, the ratios, what was skipped or failed, the notes)
and latest.svg (the bar chart), all in benches/results; --report-only renders them again from
latest.json. What each workload shows (its columns, chart panels and extra lines) comes from
the registry in workloads.py."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from .common import OPTIONAL_TIERS, PEERS, RESULTS, TIERS, log
from .workloads import NOT_MEASURED, WORKLOADS

COLORS = {"direct": "#9e9e9e", "keygate": "#1f77b4", "keygate-nousage": "#aec7e8",
          "keygate-pg": "#6baed6",
          "keygate-redis": "#9467bd", "nginx": "#2ca02c", "haproxy": "#ff7f0e",
          "direct-min": "#c7c7c7", "keygate-min": "#17becf", "keygate-min-h1": "#9edae5",
          "nginx-min": "#98df8a", "haproxy-min": "#ffbb78"}


def columns(wname: str) -> list[tuple]:
    """The workload's table: (metric, header, format, higher_is_better or None)."""
    return WORKLOADS[wname].columns if wname in WORKLOADS else []


def chart() -> list[tuple]:
    """The chart's panels, (workload, metric, label, higher_is_better[, format]): by workload
    number (W1 first), then in the registry's order, then in the workload's own order."""
    def number(spec) -> int:
        m = re.match(r"W(\d+)", spec.name)
        return int(m.group(1)) if m else 1_000
    return [(spec.name, *panel) for spec in sorted(WORKLOADS.values(), key=number)
            for panel in spec.chart]


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
    rounds = sorted({r["round"] for r in measurements})
    for wname, w in out.items():
        for label, kg, peers in ratio_pairs(wname):
            ratios: dict = {}
            for metric, _, _, higher in columns(wname):
                vals = []
                for rnd in rounds:
                    a = by_key.get((wname, kg, rnd))
                    bs = [by_key.get((wname, p, rnd)) for p in peers]
                    bs = [b[metric] for b in bs if b and b.get(metric)]
                    if not (a and a.get(metric) and bs) or (len(peers) > 1 and higher is None):
                        continue
                    # The best peer of the round: the highest req/s, the lowest CPU or latency.
                    vals.append(a[metric] / (max(bs) if higher else min(bs)))
                if vals:
                    ratios[metric] = vals
            if ratios:
                w["ratios"][label] = ratios
    return out


def ratio_pairs(wname: str) -> list[tuple[str, str, list[str]]]:
    """The workload's ratios: (label, keygate tier, peer tiers: the best of them per round).
    The label is the peer for the default keygate ÷ direct, nginx, HAProxy and the workload's
    also_on tiers (W1: keygate ÷ keygate-nousage; latest.json's ratios_keygate_over as before),
    else "keygate-tier ÷ peer" ("best peer" for a list)."""
    spec = WORKLOADS.get(wname)
    if spec is None or spec.ratios is None:
        return [(p, "keygate", [p]) for p in PEERS + (spec.also_on if spec else [])]
    return [(f"{kg} ÷ {'best peer' if isinstance(p, list) else p}", kg,
             p if isinstance(p, list) else [p]) for kg, p in spec.ratios]


def write_markdown(path: Path, meta: dict, summary: dict, skipped: list, notes: list,
                   failed: list, measurements: list) -> None:
    commands: dict = {}
    for rec in measurements:
        # The command on the workload's keygate tier (W1min: keygate-min), else the first one.
        spec = WORKLOADS.get(rec["workload"])
        kg = spec.ratios[0][0] if spec and spec.ratios else "keygate"
        if rec.get("command") and (rec["tier"] == kg or rec["workload"] not in commands):
            commands.setdefault(rec["workload"], rec["command"])
            if rec["tier"] == kg:
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
        cols = spec.columns
        L.append(f"## {wname}: {spec.title}")
        L.append("")
        extra = ""
        if spec.restarts:
            extra = (" Measured on the long-running processes (--no-restart)." if meta.get("no_restart")
                     else " Measured on freshly started processes (each proxy restarted just before, "
                          "then warmed again before the next round; direct: a second fixture "
                          "instance), so that memory an allocator kept from earlier workloads does "
                          "not hide growth.")
        L.append(f"Load: {spec.load}.{extra}")
        if commands.get(wname):
            L.append("")
            kg = spec.ratios[0][0] if spec.ratios else "keygate"
            L.append(f"Command ({kg} tier): `{commands[wname]}`")
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
                           if tier == "direct" and spec.restarts else "")
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
            L.append(f"| {'keygate ÷' if spec.ratios is None else 'ratio'} | "
                     + " | ".join(c[1] for c in rcols) + " |")
            L.append("|---|" + "---|" * len(rcols))
            for peer, _, _ in ratio_pairs(wname):
                r = w["ratios"].get(peer)
                if not r:
                    continue
                L.append(f"| {peer} | " + " | ".join(
                    (med_range(r.get(c[0], []), "f2") + ("×" if r.get(c[0]) else ""))
                    for c in rcols) + " |")
        if spec.details:
            L.extend(spec.details(measurements))
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


def svg_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(path: Path, meta: dict, summary: dict) -> None:
    panels = [c for c in chart() if c[0] in summary
              and any(summary[c[0]]["tiers"].get(t, {}).get(c[1]) for t in TIERS)]
    # The fleet and min tiers only when measured (they run W8 and W1min only).
    shown = [t for t in TIERS if t not in OPTIONAL_TIERS
             or any(t in s["tiers"] for s in summary.values())]
    pw, ph, cols = 470, 30 + 26 * len(shown) + 24, 2
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
    legend_x = W - 20 - len(shown) * 100
    for i, t in enumerate(shown):
        x = legend_x + i * 100
        o.append(f'<rect x="{x}" y="20" width="12" height="12" fill="{COLORS[t]}"/>'
                 f'<text x="{x + 16}" y="30">{t}</text>')
    for i, (wname, metric, label, higher, *how) in enumerate(panels):
        px, py = 20 + (i % cols) * (pw + 20), 64 + (i // cols) * (ph + 16)
        tiers = summary[wname]["tiers"]
        vals = {t: [v for v in tiers.get(t, {}).get(metric, []) if v is not None] for t in shown}
        vmax = max((max(v) for v in vals.values() if v), default=1.0) or 1.0
        o.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ddd"/>')
        o.append(f'<text x="{px + 8}" y="{py + 18}" font-weight="bold">{svg_escape(label)}</text>')
        o.append(f'<text x="{px + pw - 8}" y="{py + 18}" text-anchor="end" fill="#666">'
                 f'{"higher" if higher else "lower"} is better</text>')
        bx, bw = px + 96, pw - 96 - 70  # room for "keygate-redis"
        for j, t in enumerate(shown):
            y = py + 30 + j * 26
            o.append(f'<text x="{bx - 6}" y="{y + 14}" text-anchor="end">{t}</text>')
            v = vals[t]
            if not v:
                why = ("n/a (no proxy process)" if t in ("direct", "direct-min")
                       and metric.startswith("cpu")
                       else f"n/a ({WORKLOADS[wname].proxy_only})"
                       if t == "direct" and WORKLOADS[wname].proxy_only
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
        keys = (("nginx", "haproxy", "direct") if WORKLOADS[wname].ratios is None
                else [k for k in ratios if k.endswith("÷ nginx-min")])
        for peer in keys:
            r = ratios.get(peer, {}).get(metric)
            if r:
                parts.append(f"{peer} {statistics.median(r):.2f}×")
        if parts:
            prefix = "keygate ÷ " if WORKLOADS[wname].ratios is None else ""
            o.append(f'<text x="{px + 8}" y="{py + ph - 8}" fill="#1f77b4">{prefix}'
                     f'{svg_escape(", ".join(parts))}</text>')
    o.append(f'<text x="20" y="{H - 12}" fill="#666">benches/compare.py · details and errors in '
             f'latest.md / latest.json</text>')
    o.append("</svg>")
    path.write_text("\n".join(o) + "\n")


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
    doc = dict(meta, workloads={k: v.title for k, v in WORKLOADS.items()},
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
