#!/usr/bin/env bash
# Sets everything up and runs the gateway demo: Trellis in gateway mode in front of two local
# nginx upstreams, routing by host and path, with the admin endpoint. Run as root:
#   sudo bash scripts/gateway-demo.sh
# Everything it starts listens on 127.0.0.1 and is stopped when it ends.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/bootstrap.sh
echo "== building trellis-agent (release)"
swift build -c release --product trellis-agent

for port in 18080 18090 18084 15000; do
  if ss -Hltn "sport = :$port" | grep -q .; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop whatever listens there (ss -ltnp) and retry" >&2
    exit 1
  fi
done

work=$(mktemp -d /tmp/trellis-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/upstreams.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 256; }
http {
  access_log off;
  server { listen 127.0.0.1:18080; location / { return 200 "hello from upstream A (\$request_uri)\n"; } }
  server { listen 127.0.0.1:18090; location / { return 200 "hello from upstream B (\$request_uri)\n"; } }
}
NGINX

cat >"$work/gateway.yaml" <<YAML
admin: {address: 127.0.0.1:15000}
listeners:
  - name: demo
    address: 127.0.0.1:18084
    access_log: true
    virtual_hosts:
      - name: shop
        domains: ["shop.example.com"]
        routes:
          - {name: api, match: {prefix: /api/}, route: {cluster: b}}
          - {name: rest, match: {prefix: /}, route: {cluster: a}}
      - name: balanced
        domains: ["lb.example.com"]
        routes:
          - {name: balanced, match: {prefix: /}, route: {cluster: both}}
clusters:
  - {name: a, endpoints: [{address: 127.0.0.1:18080}]}
  - {name: b, endpoints: [{address: 127.0.0.1:18090}]}
  - name: both
    lb_policy: round_robin
    endpoints: [{address: 127.0.0.1:18080}, {address: 127.0.0.1:18090}]
YAML

nginx -p "$work" -c "$work/upstreams.conf" &
pids+=($!)
"$root/.build/release/trellis-agent" gateway --config "$work/gateway.yaml" --log-level info 2>"$work/gateway.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:15000/ready && break; sleep 0.1; done

show() { echo "\$ $*"; "$@"; echo; }
echo
echo "== routing by host and path"
show curl -s -H "host: shop.example.com" http://127.0.0.1:18084/cart
show curl -s -H "host: shop.example.com" http://127.0.0.1:18084/api/items
echo "== round robin over two endpoints (one keep-alive connection; each event loop balances on its own)"
curl -s -H "host: lb.example.com" http://127.0.0.1:18084/r1 http://127.0.0.1:18084/r2 http://127.0.0.1:18084/r3 http://127.0.0.1:18084/r4
echo
echo "== a route that does not exist (the gateway answers with a token)"
show curl -s -i -H "host: nowhere.test" http://127.0.0.1:18084/missing
echo "== metrics (admin endpoint)"
curl -s http://127.0.0.1:15000/stats/prometheus | grep -E '^trellis_(upstream_requests_total|errors_total\{token="no_route"\})' | grep -v ' 0$'
echo
echo "== access log"
grep 'log=access' "$work/gateway.log" | tail -3
echo
echo "demo: ok"
