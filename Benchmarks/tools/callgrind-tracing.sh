#!/usr/bin/env bash
# Instructions per request that tracing and the access log add, counted by valgrind's callgrind
# (repeatable where wall-clock figures are not): the release gateway (examples/gateway.yaml, one
# event loop) in front of nginx on loopback, N keep-alive requests by curl, to a real OTLP
# receiver. Each configuration runs RUNS times (the loop thread still varies by about ±1,000
# instructions).
#
# By default: without tracing and with `tracing: {sample_rate: 0}` (every request gets a new
# unsampled context and sends a `traceparent`); only the event loop's thread is counted.
#   bash Benchmarks/tools/callgrind-tracing.sh        (N=2000, RUNS=3; SKIP_BUILD=1 reuses the build)
#
# PAIR=1: issue 17's question on the mesh path, one hop at a time. Hop A (a client's agent) gets
# requests without a trace context; hop B (the server's) gets them with the context A sends when
# it traces, sampled for 1 % of them (N*99/100 with flags 00, then N/100 with 01), and without
# one otherwise (A sends none then). Each of "off", "logs 1%" (a file), "traces 1%" and "both 1%"
# runs on both hops; the tool prints what each adds to the pair (A's instructions + B's) over
# "off", counting the event loop's thread, and every thread (the span exporter's and the log
# writer's too). Before counting, a warm-up sends sampled requests and waits for an export, so
# the exporter's first connection and the runtime's first type lookups are not counted; after
# the last request it waits 6 s, so the export of the spans it made is (every 5 s). What the exporter and
# the writer do once a second (an export: ~1 million instructions, whatever it holds) weighs
# ~15 times more here than on a saturated core, as valgrind runs ~700 requests a second, not
# ~10,000: the real figure lies between the two counts, near the loop's. Kernel time (about half
# the CPU of a saturated proxy) is not counted.
#   PAIR=1 RUNS=1 bash Benchmarks/tools/callgrind-tracing.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$root/.venv/bin:$PATH"
N=${N:-2000} RUNS=${RUNS:-3} PAIR=${PAIR:-0}
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
traces() { echo "tracing: {collector: 127.0.0.1:4399, sample_rate: $1}"; }
logs() { echo "access_log: {output: $out/access.log, sample_rate: $1}"; }
cp "$root/examples/gateway.yaml" "$out/off.yaml"
{ traces 0; cat "$root/examples/gateway.yaml"; } >"$out/traces-0.yaml"
# The example's listener says `access_log: false`; with the log on, it logs.
logged() { sed 's/^    access_log: false /    access_log: true  /' "$root/examples/gateway.yaml"; }
{ logs 0.01; logged; } >"$out/logs-1.yaml"
{ traces 0.01; cat "$root/examples/gateway.yaml"; } >"$out/traces-1.yaml"
{ logs 0.01; traces 0.01; logged; } >"$out/both-1.yaml"
grep -q '^    access_log: true ' "$out/logs-1.yaml" || { echo "callgrind-tracing: examples/gateway.yaml's listener no longer says access_log: false" >&2; exit 1; }

url=http://127.0.0.1:18084
parent() { echo "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-$1"; }
requests() { # hop, count: the requests counted
  if [ "$1" = b ]; then
    curl -s -o /dev/null -H "$(parent 00)" "$url/[1-$(($2 * 99 / 100))]"
    curl -s -o /dev/null -H "$(parent 01)" "$url/[1-$(($2 / 100))]"
  else
    curl -s -o /dev/null "$url/[1-$2]"
  fi
}
run() { # config, hop (a, b or - for the default), threads (loop or all) -> instructions per request
  # (with all: "<loop thread> <every thread>")
  local cfg=$1 hop=$2 threads=$3 vg f ir loop
  rm -f "$out"/cg.*
  valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no --callgrind-out-file="$out/cg.out" \
    "$out/trellis-agent" gateway --config "$out/$cfg.yaml" --event-loops 1 --log-level warning >"$out/gw.log" 2>&1 &
  vg=$!
  for _ in $(seq 1 300); do curl -s -o /dev/null "$url/" && break; sleep 0.2; done
  curl -s -o /dev/null "$url/[1-200]"  # warm up
  # Sampled requests too: the runtime's first lookup of the span type's conformances (~2 million
  # instructions, once) is not tracing's cost per request.
  curl -s -o /dev/null -H "$(parent 01)" "$url/[1-20]"
  [ "$threads" = all ] && sleep 6  # their export (every 5 s), before counting
  callgrind_control -i on "$vg" >/dev/null
  if [ "$hop" = b ] && grep -q '^tracing:' "$out/$cfg.yaml"; then requests b "$N"; else requests a "$N"; fi
  [ "$threads" = all ] && sleep 6
  callgrind_control -i off "$vg" >/dev/null
  callgrind_control -d "$vg" >/dev/null
  sleep 1
  kill "$vg" 2>/dev/null; wait "$vg" 2>/dev/null || true
  f=$(for g in "$out"/cg.out.1-*; do echo "$(awk '/^totals:/ {print $2}' "$g") $g"; done | sort -n | tail -1 | cut -d' ' -f2)
  loop=$(awk '/^totals:/ {print $2}' "$f")
  if [ "$threads" = all ]; then
    ir=$(cat "$out"/cg.out.1-* | awk '/^totals:/ {s += $2} END {print s}')
    echo "$((loop / N)) $((ir / N))"
  else
    echo $((loop / N))
  fi
}
mean() { # config hop threads -> mean over RUNS runs (each printed); with all, two means
  local sum=0 sum2=0 v i
  for i in $(seq 1 "$RUNS"); do
    v=$(run "$1" "$2" "$3"); echo "$1 (hop $2) run $i: $v instructions per request" >&2
    sum=$((sum + ${v% *})); sum2=$((sum2 + ${v#* }))
  done
  if [ "$3" = all ]; then echo "$((sum / RUNS)) $((sum2 / RUNS))"; else echo $((sum / RUNS)); fi
}

if [ "$PAIR" = 1 ]; then
  echo "callgrind, gateway (release) as hop A and as hop B of the mesh path, $N keep-alive requests per run, every thread; $(date -u +%F)"
  declare -A A B
  for cfg in off logs-1 traces-1 both-1; do
    A[$cfg]=$(mean "$cfg" a all)
    B[$cfg]=$(mean "$cfg" b all)
  done
  for which in "event loop" "every thread"; do
    [ "$which" = "event loop" ] && k=1 || k=2
    echo
    echo "Instructions per request, $which:"
    pick() { cut -d' ' -f$k <<<"$1"; }
    base=$(($(pick "${A[off]}") + $(pick "${B[off]}")))
    printf '| %-10s | %10s | %10s | %10s | %16s |\n' config "hop A" "hop B" "pair" "added to the pair"
    printf '|%s|%s|%s|%s|%s|\n' ------------ ------------ ------------ ------------ ------------------
    for cfg in off logs-1 traces-1 both-1; do
      a=$(pick "${A[$cfg]}") b=$(pick "${B[$cfg]}")
      printf '| %-10s | %10s | %10s | %10s | %16s |\n' "$cfg" "$a" "$b" "$((a + b))" \
        "$(awk -v a=$((a + b)) -v b=$base 'BEGIN {printf "%+d (%+.1f%%)", a - b, (a / b - 1) * 100}')"
    done
  done
  exit 0
fi
echo "callgrind, gateway (release), $N keep-alive requests per run, event loop thread only; $(date -u +%F)"
off=$(mean off - loop)
t0=$(mean traces-0 - loop)
printf '| %-24s | %14s |\n' config "Ir per request" "---" "---"
printf '| %-24s | %14s |\n' "off" "$off" "traces 0 % (unrecorded)" "$t0"
echo "tracing's unrecorded path: +$((t0 - off)) instructions per request ($(awk -v a=$t0 -v b=$off 'BEGIN {printf "%+.1f%%", (a/b-1)*100}'))"
