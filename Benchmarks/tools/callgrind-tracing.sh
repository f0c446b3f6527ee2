#!/usr/bin/env bash
# Instructions per request that tracing's unrecorded path adds, counted by valgrind's callgrind
# (repeatable where wall-clock figures are not): the release gateway (examples/gateway.yaml, one
# event loop) in front of nginx on loopback, N keep-alive requests by curl, without tracing and
# with `tracing: {sample_rate: 0}` (every request gets a new unsampled context and sends a
# `traceparent`) to a real OTLP receiver; only the event loop's thread is counted. Each
# configuration runs RUNS times (the loop thread still varies by about ±1,000 instructions).
#   bash Benchmarks/tools/callgrind-tracing.sh        (N=2000, RUNS=3; SKIP_BUILD=1 reuses the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$root/.venv/bin:$PATH"
N=${N:-2000} RUNS=${RUNS:-3}
command -v valgrind >/dev/null || { echo "callgrind-tracing: needs valgrind (scripts/bootstrap.sh)" >&2; exit 2; }
[ "${SKIP_BUILD:-0}" = 1 ] || bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
out=$(mktemp -d /tmp/trellis-callgrind.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$out"; }
trap cleanup EXIT
# valgrind cannot read Swift's DWARF 5: a copy without debug sections (symbols stay).
strip --strip-debug -o "$out/trellis-agent" "$root/.build-static/release/trellis-agent"
cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18080; keepalive_requests 1000000;
  location / { return 200 "hello world\n"; } } }
NGINX
nginx -p "$out" -c "$out/nginx.conf" & pids+=($!)
python3 "$root/Tests/Fixtures/otlp/receiver.py" --host 127.0.0.1 --port 4399 --count-only --seconds 3600 >"$out/receiver.out" 2>&1 &
pids+=($!)
cp "$root/examples/gateway.yaml" "$out/off.yaml"
{ echo "tracing: {collector: 127.0.0.1:4399, sample_rate: 0}"; cat "$root/examples/gateway.yaml"; } >"$out/traces-0.yaml"

run() { # config -> instructions per request on the event loop's thread
  local cfg=$1 vg f ir
  rm -f "$out"/cg.*
  valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no --callgrind-out-file="$out/cg.out" \
    "$out/trellis-agent" gateway --config "$out/$cfg.yaml" --event-loops 1 --log-level warning >"$out/gw.log" 2>&1 &
  vg=$!
  for _ in $(seq 1 300); do curl -s -o /dev/null http://127.0.0.1:18084/ && break; sleep 0.2; done
  curl -s -o /dev/null "http://127.0.0.1:18084/[1-200]"  # warm up
  callgrind_control -i on "$vg" >/dev/null
  curl -s -o /dev/null "http://127.0.0.1:18084/[1-$N]"
  callgrind_control -i off "$vg" >/dev/null
  callgrind_control -d "$vg" >/dev/null
  sleep 1
  kill "$vg" 2>/dev/null; wait "$vg" 2>/dev/null || true
  f=$(for g in "$out"/cg.out.1-*; do echo "$(awk '/^totals:/ {print $2}' "$g") $g"; done | sort -n | tail -1 | cut -d' ' -f2)
  ir=$(awk '/^totals:/ {print $2}' "$f")
  echo $((ir / N))
}
echo "callgrind, gateway (release), $N keep-alive requests per run, event loop thread only; $(date -u +%F)"
declare -A SUM
for cfg in off traces-0; do
  SUM[$cfg]=0
  for i in $(seq 1 "$RUNS"); do
    v=$(run "$cfg"); echo "$cfg run $i: $v instructions per request"; SUM[$cfg]=$((SUM[$cfg] + v))
  done
done
off=$((SUM[off] / RUNS)) t0=$((SUM[traces-0] / RUNS))
printf '| %-24s | %14s |\n' config "Ir per request" "---" "---"
printf '| %-24s | %14s |\n' "off" "$off" "traces 0 % (unrecorded)" "$t0"
echo "tracing's unrecorded path: +$((t0 - off)) instructions per request ($(awk -v a=$t0 -v b=$off 'BEGIN {printf "%+.1f%%", (a/b-1)*100}'))"
