#!/usr/bin/env bash
# Memory kept after a burst: RSS of the Trellis gateway (with and without giving freed memory back,
# `TRELLIS_MEMORY_RETURN=off`) and of Envoy (same listener and cluster, two worker threads each)
# before, at the peak of, and 10 s after each burst, in one run:
#   slowloris  2,000 connections sending a request head one line per second for 5 s
#   idle       5,000 connections that send nothing for 5 s
#   wrk        1,000 keep-alive connections of requests for 5 s (nginx upstream)
# then trellis-pilot (release, with and without) before, at the peak of, and 10 s after each of
# three rounds of 1,000 ADS streams on one grpcio channel (no peer control plane runs here).
#
#   bash Benchmarks/memory-burst.sh        # builds trellis-agent and trellis-pilot -c release
# Knobs: SLOW (2000), IDLE (5000), WRK_CONNECTIONS (1000), HOLD (5), SETTLE (10), STREAMS (1000).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy, grpcio (PyPI, scripts/bootstrap.sh)
shared=${SHARED:-$(cd "$root/../shared" 2>/dev/null && pwd || true)}
SLOW=${SLOW:-2000} IDLE=${IDLE:-5000} WRK_CONNECTIONS=${WRK_CONNECTIONS:-1000} HOLD=${HOLD:-5}
SETTLE=${SETTLE:-10} STREAMS=${STREAMS:-1000}
for tool in wrk nginx envoy python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && bash scripts/build-release.sh >/dev/null)
fi
bin="$root/.build-static/release"
out=$(mktemp -d /tmp/trellis-memory.XXXXXX)
. "$root/Benchmarks/tools/cleanup.sh"
# Each burst needs a descriptor per connection in the client and one or two in the proxy.
hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=65536
ulimit -n "$hard"
[ "$hard" -gt $((IDLE * 2 + 200)) ] || { echo "open-files limit $hard is too low for IDLE=$IDLE" >&2; exit 2; }

cat >"$out/gateway.yaml" <<YAML
admin: {address: "127.0.0.1:0"}
listeners:
  - name: front
    address: 127.0.0.1:18484
    virtual_hosts: [{name: all, domains: ["*"], routes: [{name: all, match: {prefix: /}, route: {cluster: nginx}}]}]
clusters:
  - {name: nginx, endpoints: [{address: 127.0.0.1:18080}]}
YAML
cat >"$out/envoy.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19932}}}
static_resources:
  listeners:
  - name: front
    address: {socket_address: {address: 127.0.0.1, port_value: 18481}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: nginx}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: nginx
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: nginx, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18080}}}}]}]}
YAML

nginx -c "$shared/bench/upstream-nginx.conf" & pids+=($!)

rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
# Samples the RSS of $1 every 0.1 s into $2 (the peak) until $3 exists.
sample_peak() {
  local pid=$1 file=$2 stop=$3 peak=0 r
  while [ ! -f "$stop" ] && kill -0 "$pid" 2>/dev/null; do
    r=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" >"$file"
    sleep 0.1
  done
}
row() { printf '| %-22s | %-30s | %10s | %8s | %9s | %s |\n' "$@"; }

burst() { # proxy-name pid port burst-name command...
  local name=$1 pid=$2 port=$3 what=$4; shift 4
  local before; before=$(rss "$pid")
  rm -f "$out/stop" "$out/peak"; echo 0 >"$out/peak"
  sample_peak "$pid" "$out/peak" "$out/stop" & local sampler=$!
  "$@" >"$out/burst.out" 2>&1 || { echo "$name $what failed:" >&2; cat "$out/burst.out" >&2; exit 1; }
  touch "$out/stop"; wait "$sampler" || true
  sleep "$SETTLE"
  row "$name" "$what" "$before" "$(awk '{printf "%.1f", $1/1024}' "$out/peak")" "$(rss "$pid")" "$(tail -1 "$out/burst.out" | tr -s ' ' | cut -c1-60)"
}

proxy_runs() { # name port pid
  local name=$1 port=$2 pid=$3
  for _ in $(seq 1 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" && break; sleep 0.1; done
  for _ in $(seq 1 20); do curl -s -o /dev/null "http://127.0.0.1:$port/"; done
  sleep 2
  burst "$name" "$pid" "$port" "slowloris $SLOW conns, ${HOLD}s" python3 "$root/Tests/Fixtures/net/conn_burst.py" slowloris 127.0.0.1 "$port" "$SLOW" "$HOLD"
  burst "$name" "$pid" "$port" "idle $IDLE conns, ${HOLD}s" python3 "$root/Tests/Fixtures/net/conn_burst.py" idle 127.0.0.1 "$port" "$IDLE" "$HOLD"
  burst "$name" "$pid" "$port" "wrk -c$WRK_CONNECTIONS, ${HOLD}s" \
    sh -c "wrk -t2 -c$WRK_CONNECTIONS -d${HOLD}s http://127.0.0.1:$port/ | grep -E 'Requests/sec|Non-2xx|Socket errors' | tr '\n' ' '; echo"
}

echo "Memory kept after bursts, $(date -u +%F), $(nproc) cores; RSS in MiB; 'after' is ${SETTLE} s after the burst ended"
row proxy burst "RSS before" peak after "client's report"
printf '|%s|%s|%s|%s|%s|%s|\n' ------------------------ -------------------------------- ------------ ---------- ----------- -----
for mode in off on; do
  TRELLIS_MEMORY_RETURN=$mode "$bin/trellis-agent" gateway --config "$out/gateway.yaml" --event-loops 2 \
    --log-level error & tp=$!; pids+=($tp)
  proxy_runs "trellis (return $mode)" 18484 "$tp"
  kill "$tp"; wait "$tp" 2>/dev/null || true
done
envoy -c "$out/envoy.yaml" --concurrency 2 -l error --disable-hot-restart --base-id 7413 & ep=$!; pids+=($ep)
proxy_runs envoy 18481 "$ep"
kill "$ep"

XDS=127.0.0.1:25110 API=127.0.0.1:25114
printf 'services:\n  - {name: bench, port: 8080}\n' >"$out/mesh.yaml"
for mode in off on; do
  rm -f "$out/pilot.db"*
  TRELLIS_MEMORY_RETURN=$mode "$bin/trellis-pilot" serve --store "$out/pilot.db" --mesh "$out/mesh.yaml" \
    --xds-address $XDS --http-address $API --log-level error & pp=$!; pids+=($pp)
  for _ in $(seq 1 100); do curl -sf "http://$API/healthz" >/dev/null && break; sleep 0.1; done
  sleep 1
  for round in 1 2 3; do
    burst "pilot (return $mode)" "$pp" 0 "round $round: $STREAMS ADS streams" \
      python3 "$root/Tests/Fixtures/grpc/ads_streams.py" $XDS "$STREAMS" 30
  done
  kill "$pp"; wait "$pp" 2>/dev/null || true
done
