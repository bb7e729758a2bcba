#!/bin/bash
# manual W1min-h1: origin on core 1, proxies on core 0, wrk on core 1
R=/work/main/benches/results/tmp/run
cd $R
pkill -f "origin.conf" ; pkill -f keygate-min-h1.toml; pkill -f nginx-min.conf; sleep 0.5
taskset -c 1 nginx -e $R/origin-error.log -p $R -c $R/origin.conf &
sleep 0.3
KEYGATE_LOG=warn taskset -c 0 ${KG:-/work/main/target/release/keygate} --config $R/keygate-min-h1.toml serve > /tmp/kg-manual.log 2>&1 &
taskset -c 0 nginx -e $R/nginx-min-error.log -p $R -c $R/nginx-min.conf &
sleep 1.5
