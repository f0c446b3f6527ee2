# Sourced by the mesh benchmarks after netns-pair.sh (mesh-path.sh, observability.sh): wrk from A
# through the sidecars to nginx in B, its figures, and Envoy's sidecar pair.
#
#   wrk_run ARGS...        wrk -t1 --latency for DURATION seconds from A (core 1, as nobody) to
#                          http://$b_ip:8080/
#   mesh_nginx             the upstream: nginx (one worker, :8080, "hello world") in B on core 1,
#                          its files in $out, its pid added to pids
#   rps TEXT, field TEXT KEY, to_us 1.23ms
#   envoy_sidecar a|b ADMIN_PORT HCM [CLUSTERS]
#                          Envoy's config for A's outbound sidecar (:15001, ORIGINAL_DST) or B's
#                          inbound one (:15006 -> 127.0.0.1:8080); HCM is the http_connection_manager
#                          filter (indented for `filters:`), CLUSTERS more clusters.
wrk_run() { ip netns exec "$A" taskset -c 1 runuser -u nobody -- wrk -t1 --latency -d"${DURATION}s" "$@" "http://$b_ip:8080/" 2>&1; }
mesh_nginx() {
  cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 8080 backlog=4096; keepalive_requests 1000000;
  location / { return 200 "hello world\n"; } } }
NGINX
  ip netns exec "$B" taskset -c 1 nginx -p "$out" -c "$out/nginx.conf" & pids+=($!)
}
# The agents' agent.yaml, "$out/a.yaml" (client side, capture of port 9) and "$out/b.yaml" (server
# side, port 8080), with an access log at rate $1 and tracing to B's collector at rate $2 ("-":
# off), each log to "$out/<side>-access.log".
mesh_agent_configs() {
  local s extra port
  for s in a b; do
    extra=""
    [ "$1" != - ] && extra+=$'\n'"access_log: {output: $out/$s-access.log, sample_rate: $1}"
    [ "$2" != - ] && extra+=$'\n'"tracing: {collector: \"$b_ip:4317\", sample_rate: $2}"
    port=$([ $s = a ] && echo 9 || echo 8080)
    printf 'node: vm-%s\ncapture: {inbound_ports: [%s], agent_uid: 0}%s\n' "$s" "$port" "$extra" >"$out/$s.yaml"
  done
}
field() { awk -v k="$2" '$1==k {print $2}' <<<"$1"; }
rps() { awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$1"; }
to_us() { # wrk latency like 512.00us, 1.23ms, 2.00s -> microseconds
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n*1000; else if (v ~ /s$/) print n*1000000; else print n }'
}

envoy_sidecar() {
  local side=$1 admin=$2 hcm=$3 clusters=${4:-}
  local name=outbound port=15001
  [ "$side" = b ] && name=inbound port=15006
  cat <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin}}}
static_resources:
  listeners:
  - name: $name
    address: {socket_address: {address: 0.0.0.0, port_value: $port}}
    listener_filters: [{name: envoy.filters.listener.original_dst, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}]
    filter_chains:
    - filters:
$hcm
  clusters:
YAML
  if [ "$side" = a ]; then
    cat <<YAML
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
YAML
  else
    cat <<YAML
  - name: local
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: local, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}}]}]}
YAML
  fi
  [ -n "$clusters" ] && printf '%s\n' "$clusters"
  return 0
}
