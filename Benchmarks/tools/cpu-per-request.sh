#!/usr/bin/env bash
# CPU per request, user and system apart, for the HTTP/1.1 gateway and its peers under the same
# load: each proxy on core 0 in turn, nginx (../shared/bench/upstream-nginx.conf) and
# `wrk -t1 -c32` on core 1, the proxy's utime/stime read from /proc/PID/stat around one run, and
# the TCP segments per request from `nstat`. Where `gateway-http1.sh` says how far apart the
# proxies are, this says whether the gap is in user space or in the kernel.
#
#   bash Benchmarks/tools/cpu-per-request.sh        # DURATION=5; SKIP_BUILD=1 reuses the build
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$root/.venv/bin:$PATH"
bench=${BENCH_CONFIGS:-$root/../shared/bench}
DURATION=${DURATION:-5}
for tool in wrk nginx haproxy envoy taskset nstat; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done
[ "${SKIP_BUILD:-0}" = 1 ] || bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
out=$(mktemp -d /tmp/trellis-cpu.XXXXXX)
. "$root/Benchmarks/tools/cleanup.sh"
taskset -c 1 nginx -p "$out" -c "$bench/upstream-nginx.conf" &
pids+=($!)
sleep 0.5
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # utime stime, in clock ticks
hz=$(getconf CLK_TCK)
echo "CPU per request, wrk -t1 -c32 -d${DURATION}s, proxy on core 0, $(date -u +%F)"
printf '| %-8s | %10s | %12s | %12s | %12s | %10s |\n' proxy requests "user us/req" "sys us/req" "total us/req" "segs/req"
printf '|%s|%s|%s|%s|%s|%s|\n' "----------" "------------" "--------------" "--------------" "--------------" "------------"
one() { # name port command...
  local name=$1 port=$2
  shift 2
  taskset -c 0 "$@" >"$out/$name.log" 2>&1 &
  local p=$!
  pids+=($p)
  for _ in $(seq 1 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c32 -d2s "http://127.0.0.1:$port/" >/dev/null
  local u0 s0 u1 s1 n segs
  read -r u0 s0 < <(ticks "$p")
  nstat -n >/dev/null
  taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" "http://127.0.0.1:$port/" >"$out/$name.wrk"
  read -r u1 s1 < <(ticks "$p")
  segs=$(nstat | awk '$1=="TcpOutSegs" {print $2}')
  kill "$p"
  sleep 0.3
  n=$(awk '/requests in/ {print $1}' "$out/$name.wrk")
  awk -v name="$name" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v g="${segs:-0}" 'BEGIN {
    printf "| %-8s | %10d | %12.2f | %12.2f | %12.2f | %10.2f |\n", name, n, u*1e6/hz/n, s*1e6/hz/n, (u+s)*1e6/hz/n, g/n }'
}
one trellis 18084 "$root/.build-static/release/trellis-agent" gateway --config "$root/examples/gateway.yaml" --event-loops 1 --log-level warning
one haproxy 18082 haproxy -f "$bench/haproxy.cfg"
one envoy 18081 envoy -c "$bench/envoy.yaml" --concurrency 1 -l error
