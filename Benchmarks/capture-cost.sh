#!/usr/bin/env bash
# The cost of transparent capture, in one run, between two network namespaces this script creates
# ("VM a" runs the client, "VM b" runs nginx on 10.78.0.2:8080):
#   1. direct: no rules;
#   2. rules + NFQUEUE gate in bypass: every SYN goes through the gate, then direct;
#   3. captured into Trellis (gateway on :15001, forwarding to b:8080), gate capturing;
#   4. captured into Envoy on :15001 instead, same rules and gate.
# New connections per second (wrk, Connection: close) and keep-alive requests per second, with
# p99, for each. Run as root:  bash Benchmarks/capture-cost.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-5}
[ "$(id -u)" = 0 ] || { echo "capture-cost: needs root (network namespaces, iptables)" >&2; exit 2; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then (cd "$root" && swift build -c release --product trellis-agent >/dev/null); fi
agent="$root/.build/release/trellis-agent"
A=trellis-bench-a B=trellis-bench-b
out=$(mktemp -d /tmp/trellis-capture.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT
ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true
ip netns add "$A"; ip netns add "$B"
ip link add tcb-a netns "$A" type veth peer name tcb-b netns "$B"
ip -n "$A" addr add 10.78.0.1/24 dev tcb-a; ip -n "$B" addr add 10.78.0.2/24 dev tcb-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set tcb-a up; ip -n "$B" link set tcb-b up

cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 10.78.0.2:8080 backlog=4096; keepalive_requests 1000000;
  location / { return 200 "hello world\n"; } } }
NGINX
cat >"$out/capture.yaml" <<YAML
capture:
  inbound_ports: [9]          # inbound is not measured here
  agent_uid: 0                # the proxies run as root; the client runs as nobody
  gate: {queue: 15000, mark: 0x1}
YAML
cat >"$out/gateway.yaml" <<YAML
admin: {address: 127.0.0.1:15000}
listeners:
  - name: outbound
    address: 0.0.0.0:15001
    virtual_hosts: [{name: all, domains: ["*"], routes: [{name: all, match: {prefix: /}, route: {cluster: b}}]}]
clusters:
  - {name: b, endpoints: [{address: 10.78.0.2:8080}]}
YAML
sed -e 's/127.0.0.1, port_value: 18081/0.0.0.0, port_value: 15001/' -e 's/port_value: 19901/port_value: 19911/' \
  -e 's/127.0.0.1, port_value: 18080/10.78.0.2, port_value: 8080/' "$root/../shared/bench/envoy.yaml" >"$out/envoy.yaml"

ip netns exec "$B" taskset -c 1 nginx -p "$out" -c "$out/nginx.conf" & pids+=($!)
sleep 0.5

run_wrk() { # label, extra header
  ip netns exec "$A" taskset -c 1 runuser -u nobody -- wrk -t1 -c32 -d"${DURATION}s" --latency "$@" http://10.78.0.2:8080/ 2>&1
}
measure() { # name
  local name=$1 close keep
  close=$(run_wrk -H "Connection: close")
  keep=$(run_wrk)
  printf '| %-34s | %9.0f | %8s | %10.0f | %8s |\n' "$name" \
    "$(echo "$close" | awk '/Requests\/sec/ {print $2}')" "$(echo "$close" | awk '$1=="99%" {print $2}')" \
    "$(echo "$keep" | awk '/Requests\/sec/ {print $2}')" "$(echo "$keep" | awk '$1=="99%" {print $2}')"
  if echo "$close$keep" | grep -q "Socket errors\|Non-2xx"; then echo "$close$keep" | grep "Socket errors\|Non-2xx" >&2; fi
}

echo "Capture cost, netns pair, wrk -t1 -c32 -d${DURATION}s from a (core 1) to nginx in b (core 1), proxies on core 0; $(date -u +%Y-%m-%d)"
printf '| %-34s | %9s | %8s | %10s | %8s |\n' path "new conn/s" "p99" "keep-alive rps" "p99"
printf '|%s|%s|%s|%s|%s|\n' "------------------------------------" "-----------" "----------" "------------" "----------"
measure "direct (no rules)"

ip netns exec "$A" "$agent" rules install --config "$out/capture.yaml" >/dev/null
ip netns exec "$A" taskset -c 0 "$agent" gate --queue 15000 --mode bypass >"$out/gate.log" & gate=$!; pids+=($gate)
sleep 0.5
measure "rules + gate (bypass)"
kill "$gate"; wait "$gate" 2>/dev/null || true

ip netns exec "$A" taskset -c 0 "$agent" gate --queue 15000 --mode capture >"$out/gate.log" & gate=$!; pids+=($gate)
ip netns exec "$A" taskset -c 0 "$agent" gateway --config "$out/gateway.yaml" --event-loops 1 --log-level warning & tp=$!; pids+=($tp)
sleep 1
measure "captured -> Trellis :15001 -> b"
kill "$tp"; wait "$tp" 2>/dev/null || true

ip netns exec "$A" taskset -c 0 envoy -c "$out/envoy.yaml" --concurrency 1 -l error & ep=$!; pids+=($ep)
sleep 2
measure "captured -> Envoy :15001 -> b"
kill "$ep"; wait "$ep" 2>/dev/null || true
kill "$gate"; wait "$gate" 2>/dev/null || true
ip netns exec "$A" "$agent" rules uninstall >/dev/null
