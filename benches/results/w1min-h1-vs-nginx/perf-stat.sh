#!/bin/bash
# $1 = port, $2 = pid, $3 = origin port
R=/work/main/benches/results/tmp/run
(taskset -c 1 wrk -t1 -c64 -d11s --timeout 5s -s /work/main/benches/templates/rotate_keys.lua https://127.0.0.1:$1/ -- $R/keys.txt GET 0 > /tmp/wrk.out 2>&1 &)
sleep 2
perf stat -x, -e task-clock,raw_syscalls:sys_enter,syscalls:sys_enter_connect,context-switches -p $2 -- sleep 8 2> /tmp/ps.out
n=$(ss -tnH state established "( dport = :$3 )" | wc -l)
sleep 2
rps=$(grep Requests /tmp/wrk.out | awk '{print $2}')
awk -F, -v rps=$rps -v n=$n '{v[$3]=$1} END {printf "rps=%s cpu_us/req=%.1f sys/req=%.2f connects/s=%.1f cs/s=%.0f upstream_conns=%d\n", rps, v["task-clock"]*1000/8/rps, v["raw_syscalls:sys_enter"]/8/rps, v["syscalls:sys_enter_connect"]/8, v["context-switches"]/8, n}' /tmp/ps.out
