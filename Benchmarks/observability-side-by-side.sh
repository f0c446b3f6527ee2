#!/usr/bin/env bash
# Issue 17's target measured so that the machine's drift cancels out. Two copies of the mesh path
# (two namespace pairs, each: wrk in "VM A" -> A's sidecar -> B's sidecar -> nginx in "VM B", the
# capture rules of observability.sh) run at the same time: all four sidecars share core 0, both
# wrk and both nginx run on core 1. One pair's sidecars run without access log and tracing, the
# other's with LOGS and TRACES (default: both at 1 %, traces to a real OTLP receiver in that B).
# The scheduler shares core 0 between the four sidecars in the same seconds, so each pair's
# requests/s is what its sidecars' CPU per request allows of the same core, and their ratio is
# the configuration's cost, whatever the machine's speed in that minute (on this VM, runs minutes
# apart differ by up to ±20 %). Each round swaps which pair carries which configuration, so that
# neither pair's own path counts; the median over ROUNDS rounds is printed.
#   sudo bash Benchmarks/observability-side-by-side.sh    (ROUNDS=6, DURATION=10, LOGS=0.01,
#                                                          TRACES=0.01, SKIP_BUILD=1 reuses the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
DURATION=${DURATION:-10} ROUNDS=${ROUNDS:-6} LOGS=${LOGS:-0.01} TRACES=${TRACES:-0.01}
[ "$(id -u)" = 0 ] || { echo "side-by-side: needs root (network namespaces, iptables)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "side-by-side: needs wrk (scripts/bootstrap.sh)" >&2; exit 2; }
python3 -c "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc" 2>/dev/null ||
  { echo "side-by-side: needs PyPI grpcio and opentelemetry-proto: run scripts/bootstrap.sh" >&2; exit 2; }
[ "${SKIP_BUILD:-0}" = 1 ] || bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
agent="$root/.build-static/release/trellis-agent"
source "$root/Benchmarks/tools/netns-pair.sh"
source "$root/Benchmarks/tools/mesh-sidecars.sh"

# Two pairs: netns_pair sets A, B, a_ip, b_ip, out and its cleanup for one; both are kept here.
netns_pair trellis-sbs1 86 sb1
P1=("$A" "$B" "$a_ip" "$b_ip" "$out")
netns_pair trellis-sbs2 87 sb2
P2=("$A" "$B" "$a_ip" "$b_ip" "$out")
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for ns in "${P1[0]}" "${P1[1]}" "${P2[0]}" "${P2[1]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "${P1[4]}" "${P2[4]}"
}
trap cleanup EXIT
# The processes' CPU time in ns, all threads (their POSIX CPU clocks).
cpu_ns() { python3 -c 'import sys, time; print(sum(time.clock_gettime_ns(((~int(p)) << 3) | 2) for p in sys.argv[1:]))' "$@"; }
use() { A=$1 B=$2 a_ip=$3 b_ip=$4 out=$5; }  # makes pair "$@" the one wrk_run and the rest act on

for pair in P1 P2; do
  declare -n p=$pair
  use "${p[@]}"
  mesh_nginx
  printf 'capture: {inbound_ports: [9], agent_uid: 0}\n' >"$out/a-rules.yaml"
  printf 'capture: {inbound_ports: [8080], agent_uid: 0}\n' >"$out/b-rules.yaml"
  ip netns exec "$A" "$agent" rules install --config "$out/a-rules.yaml" >/dev/null
  ip netns exec "$B" "$agent" rules install --config "$out/b-rules.yaml" >/dev/null
  ip netns exec "$B" taskset -c 1 python3 "$root/Tests/Fixtures/otlp/receiver.py" --host "$b_ip" --port 4317 \
    --count-only --seconds 3600 >"$out/receiver.out" 2>&1 & pids+=($!)
  unset -n p
done
sleep 0.5

served() { # requests the agent in namespace $1 received (0: none)
  { ip netns exec "$1" curl -s http://127.0.0.1:15000/stats/prometheus || true; } |
    awk '/^trellis_downstream_requests_total / {printf "%d", $2; found=1} END {if (!found) print 0}'
}
start_pair() { # pair, logs (or -), traces (or -): starts its two agents, appends their pids to `agents`
  declare -n p=$1
  use "${p[@]}"
  local s
  mesh_agent_configs "$2" "$3"
  for s in a b; do
    local ns=$([ $s = a ] && echo "$A" || echo "$B")
    ip netns exec "$ns" taskset -c 0 "$agent" run --config "$out/$s.yaml" --event-loops 1 --keep-rules \
      --control-socket "$out/$s.sock" --log-level warning >"$out/agent-$s.log" 2>&1 & agents+=($!); pids+=($!)
  done
  for s in a b; do
    for i in $(seq 1 101); do
      "$agent" status --socket "$out/$s.sock" >/dev/null 2>&1 && break
      [ "$i" = 101 ] && { echo "side-by-side: $1's agent $s did not start" >&2; cat "$out/agent-$s.log" >&2; exit 1; }
      sleep 0.1
    done
  done
  for _ in $(seq 1 100); do
    ip netns exec "$A" runuser -u nobody -- curl -s -o /dev/null "http://$b_ip:8080/" || true
    [ "$(served "$A")" -gt 0 ] && [ "$(served "$B")" -gt 0 ] && break
    sleep 0.1
  done
  unset -n p
}
check_pair() { # pair: both sidecars carried its run
  declare -n p=$1
  local a b
  a=$(served "${p[0]}") b=$(served "${p[1]}")
  if [ "$a" -lt 1000 ] || [ "$b" -lt $((a * 9 / 10)) ]; then
    echo "side-by-side: the agents of $1 served $a (A) and $b (B) requests: the path bypassed one" >&2
    tail -n 20 "${p[4]}/agent-a.log" "${p[4]}/agent-b.log" >&2
    exit 1
  fi
  unset -n p
}

echo "Side by side on the mesh path: two namespace pairs at once, their four sidecars on core 0, wrk -t1 -c32 and nginx per pair on core 1;"
echo "one pair off, the other with access log ${LOGS} and tracing ${TRACES}; ${DURATION}s per round, swapped each round; $(date -u +%F)"
echo
printf '| %5s | %-9s | %12s | %12s | %8s | %9s | %8s |\n' round "configured" "off rps" "config rps" "config" "CPU %" "per CPU"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------- ----------- -------------- -------------- ---------- ----------- ----------
ratios=() pers=()
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then off=P1 on=P2; else off=P2 on=P1; fi
  agents=()
  start_pair "$off" - -
  start_pair "$on" "$LOGS" "$TRACES"
  declare -n po=$off pc=$on
  # Both loads at once: a 2 s warm-up, then the measured run.
  use "${po[@]}"; DURATION=2 wrk_run -c32 >/dev/null & w1=$!
  use "${pc[@]}"; DURATION=2 wrk_run -c32 >/dev/null & w2=$!
  wait "$w1" "$w2" || true
  c0off=$(cpu_ns "${agents[0]}" "${agents[1]}") c0on=$(cpu_ns "${agents[2]}" "${agents[3]}")
  use "${po[@]}"; wrk_run -c32 >"${po[4]}/wrk.out" & w1=$!
  use "${pc[@]}"; wrk_run -c32 >"${pc[4]}/wrk.out" & w2=$!
  wait "$w1" "$w2"
  c1off=$(cpu_ns "${agents[0]}" "${agents[1]}") c1on=$(cpu_ns "${agents[2]}" "${agents[3]}")
  r_off=$(rps "$(cat "${po[4]}/wrk.out")") r_on=$(rps "$(cat "${pc[4]}/wrk.out")")
  check_pair "$off"; check_pair "$on"
  for f in "${po[4]}/wrk.out" "${pc[4]}/wrk.out"; do
    if grep -q "Socket errors\|Non-2xx" "$f"; then echo "round $round: $(grep 'Socket errors\|Non-2xx' "$f")" >&2; fi
  done
  kill "${agents[@]}"; wait "${agents[@]}" 2>/dev/null || true
  rm -f "${po[4]}"/*.sock "${pc[4]}"/*.sock
  ratio=$(awk -v a="$r_on" -v b="$r_off" 'BEGIN {printf "%+.1f", (a/b-1)*100}')
  ratios+=("$ratio")
  # Requests per CPU-second of the configured pair's sidecars over the other's: the same with
  # the two pairs' shares of the core evened out.
  share=$(awk -v a=$((c1on - c0on)) -v b=$((c1off - c0off)) 'BEGIN {printf "%.0f/%.0f", 100*b/(a+b), 100*a/(a+b)}')
  per=$(awk -v a="$r_on" -v b="$r_off" -v ca=$((c1on - c0on)) -v cb=$((c1off - c0off)) 'BEGIN {printf "%+.1f", ((a/ca)/(b/cb)-1)*100}')
  pers+=("$per")
  printf '| %5s | %-9s | %12s | %12s | %7s%% | %9s | %7s%% |\n' "$round" "$on" "$r_off" "$r_on" "$ratio" "$share" "$per"
  unset -n po pc
done
med=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END {printf "%+.1f", (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
echo
echo "Access log ${LOGS} and tracing ${TRACES} against off, side by side: median ${med}% requests/s over $ROUNDS rounds (${ratios[*]})"
pmed=$(printf '%s\n' "${pers[@]}" | sort -g | awk '{v[NR]=$1} END {printf "%+.1f", (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
echo "  per CPU-second of the sidecars (\"CPU %\": off's share / the configured pair's): median ${pmed}% (${pers[*]})"
