"""The side-by-side benchmark of keygate against a direct connection, nginx and HAProxy; its
command line is benches/compare.py. Each module says at its top what it owns:

- common.py: paths, tier names, cores, the quick and full modes, install hints, log().
- processes.py: the processes the harness starts and stops, and their CPU and RSS from /proc.
- client.py: a small TLS HTTP/1.1 client (checks, slow uploads, idle connections, /readyz).
- parsers.py: wrk's, h2load's and oha's output as metrics.
- tiers.py: direct (the fixture), keygate, nginx and HAProxy (and the fleet tiers, the min
  tiers in front of a minimal nginx origin, and keygate-nousage): certificates, keys, configs,
  starting, checking, restarting and reloading them, and the pids to measure.
- workloads.py: one function per workload (W1-h1 ... W7) in a registry that also says what
  each needs and what its table and chart panels show.
- runner.py: the run: build, tools, rounds, warm-up, per-run CPU/RSS accounting, clean-up.
- report.py: latest.json, latest.md and latest.svg (and --report-only).

Adding a workload takes a function under @workload(...) in workloads.py and nothing else.
"""
