#!/bin/bash
# $1 port, $2 pid: user/system CPU µs per request from /proc/PID/stat over 8 s of wrk load
R=/work/main/benches/results/tmp/run
(taskset -c 1 wrk -t1 -c64 -d11s --timeout 5s -s /work/main/benches/templates/rotate_keys.lua https://127.0.0.1:$1/ -- $R/keys.txt GET 0 > /tmp/wrk.out 2>&1 &)
sleep 2
read u1 s1 < <(awk '{print $14, $15}' /proc/$2/stat)
sleep 8
read u2 s2 < <(awk '{print $14, $15}' /proc/$2/stat)
sleep 2
rps=$(grep Requests /tmp/wrk.out | awk '{print $2}')
python3 -c "
rps=$rps; u=($u2-$u1)/100/8; s=($s2-$s1)/100/8
print(f'rps={rps:.0f} user_us/req={u/rps*1e6:.1f} sys_us/req={s/rps*1e6:.1f} total={(u+s)/rps*1e6:.1f}')"
