#!/bin/bash
R=/work/main/benches/results/tmp/run
(taskset -c 1 wrk -t1 -c64 -d11s --timeout 5s -s /work/main/benches/templates/rotate_keys.lua https://127.0.0.1:$1/ -- $R/keys.txt GET 0 > /tmp/wrk.out 2>&1 &)
sleep 2
nstat -n >/dev/null
sleep 8
nstat -z TcpOutSegs IpExtOutOctets TcpExtTCPPureAcks TcpExtTCPHPAcks TcpExtTCPDelivered > /tmp/nstat.out
sleep 2
rps=$(grep Requests /tmp/wrk.out | awk '{print $2}')
awk -v rps=$rps 'NR>1 {printf "%s/req=%.2f ", $1, $2/8/rps} END {print "rps=" rps}' /tmp/nstat.out
