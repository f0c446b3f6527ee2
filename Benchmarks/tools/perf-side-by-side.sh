#!/usr/bin/env bash
# Where the CPU of a request goes, Trellis's gateway against HAProxy, both on core 0 at the same
# time (as `gateway-http1.sh SIDE=n`), each driven by its own `wrk -t1 -c32` on core 1, sampled by
# `perf record -e cpu-clock` (this VM has no hardware counters) over the same seconds. Prints the
# samples per 10,000 requests of each, split into the kernel, the proxy's own code and libc, and
# the kernel functions and user-space functions whose cost per request differs most.
#
#   bash Benchmarks/tools/perf-side-by-side.sh      (SECONDS_=10 FREQ=4000; SKIP_BUILD=1 reuses the build)
#
# Samples per request, not percentages: the two proxies serve different numbers of requests in
# the same seconds, and what matters is what each request costs.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED:-$(cd "$root/../shared" 2>/dev/null && pwd || true)}
bench=${BENCH_CONFIGS:-$shared/bench}
SECONDS_=${SECONDS_:-10} FREQ=${FREQ:-4000}
for tool in perf wrk nginx haproxy taskset; do
  command -v "$tool" >/dev/null || { echo "perf-side-by-side: missing $tool (scripts/bootstrap.sh)" >&2; exit 2; }
done
[ "${SKIP_BUILD:-0}" = 1 ] || bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
out=$(mktemp -d /tmp/trellis-perf.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$out"; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 1 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  echo "perf-side-by-side: port $1 did not answer" >&2
  exit 1
}
taskset -c 1 nginx -p "$out" -c "$bench/upstream-nginx.conf" & pids+=($!)
wait_port 18080
taskset -c 0 "$root/.build-static/release/trellis-agent" gateway --config "$root/examples/gateway.yaml" \
  --event-loops 1 --log-level warning >"$out/trellis.log" 2>&1 & tp=$!; pids+=($tp)
taskset -c 0 haproxy -f "$bench/haproxy.cfg" & hp=$!; pids+=($hp)
wait_port 18084
wait_port 18082
for port in 18084 18082; do taskset -c 1 wrk -t1 -c32 -d2s "http://127.0.0.1:$port/" >/dev/null; done
perf record -e cpu-clock -F "$FREQ" -p "$tp" -o "$out/trellis.data" -- sleep "$SECONDS_" >/dev/null 2>&1 & p1=$!
perf record -e cpu-clock -F "$FREQ" -p "$hp" -o "$out/haproxy.data" -- sleep "$SECONDS_" >/dev/null 2>&1 & p2=$!
# The load runs a second longer than the sampling on both sides, so that every sample sees it.
taskset -c 1 wrk -t1 -c32 -d"$((SECONDS_ + 2))s" http://127.0.0.1:18084/ >"$out/trellis.wrk" & w1=$!
taskset -c 1 wrk -t1 -c32 -d"$((SECONDS_ + 2))s" http://127.0.0.1:18082/ >"$out/haproxy.wrk" & w2=$!
wait "$p1" "$p2" "$w1" "$w2"
for name in trellis haproxy; do
  if grep -q "Non-2xx\|Socket errors" "$out/$name.wrk"; then grep "Non-2xx\|Socket errors" "$out/$name.wrk" >&2; fi
  perf report -i "$out/$name.data" --stdio --sort dso,sym -F sample,dso,sym 2>/dev/null | grep -E '^\s+[0-9]' >"$out/$name.syms"
done
echo "perf (cpu-clock, ${FREQ} Hz, ${SECONDS_} s), Trellis gateway and HAProxy on core 0 at once, wrk -c32 each; $(date -u +%F)"
python3 - "$out" "$(awk '/Requests\/sec/ {print $2}' "$out/trellis.wrk")" \
  "$(awk '/Requests\/sec/ {print $2}' "$out/haproxy.wrk")" "$SECONDS_" <<'PY'
import re, subprocess, sys
out, t_rps, h_rps, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def load(name):
    rows = []
    for line in open(f"{out}/{name}.syms"):
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if m:
            rows.append((int(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
    return rows
def part(dso, kind):
    if kind == "k":
        return "kernel"
    if dso.startswith("libc"):
        return "libc"
    return "proxy" if dso in ("trellis-agent", "haproxy") else "other"
per = 10000
t, h = load("trellis"), load("haproxy")
tn, hn = t_rps * secs, h_rps * secs
print(f"requests/s: Trellis {t_rps:.0f}, HAProxy {h_rps:.0f}")
print()
print(f"| samples per {per:,} requests | {'Trellis':>8} | {'HAProxy':>8} | {'Trellis/HAProxy':>15} |")
print("|------------------------------|----------|----------|-----------------|")
totals = {}
for label in ("kernel", "proxy", "libc", "other", "all"):
    a = sum(s for s, d, k, _ in t if label == "all" or part(d, k) == label) / tn * per
    b = sum(s for s, d, k, _ in h if label == "all" or part(d, k) == label) / hn * per
    totals[label] = (a, b)
    print(f"| {label:<28} | {a:8.1f} | {b:8.1f} | {a / b if b else 0:14.2f}x |")
a, b = totals["all"]
print(f"requests per CPU-second, Trellis/HAProxy: {b / a:.2f}x (from the samples)")
def diff(kind_filter, n):
    ts, hs = {}, {}
    for rows, dest, count in ((t, ts, tn), (h, hs, hn)):
        for s, d, k, sym in rows:
            if kind_filter(k):
                dest[sym] = dest.get(sym, 0) + s / count * per
    keys = sorted(set(ts) | set(hs), key=lambda s: ts.get(s, 0) - hs.get(s, 0), reverse=True)
    for sym in keys[:n]:
        name = subprocess.run(["swift", "demangle", "--simplified", "--compact", sym.lstrip("$") if sym.startswith("$s") and not sym.startswith("$s5") else sym], capture_output=True, text=True).stdout.strip()
        print(f"  {ts.get(sym, 0) - hs.get(sym, 0):+6.1f}  {ts.get(sym, 0):6.1f} {hs.get(sym, 0):6.1f}  {name[:100]}")
print()
print("kernel functions costing Trellis most over HAProxy (per 10,000 requests: difference, Trellis, HAProxy):")
diff(lambda k: k == "k", 12)
print()
print("Trellis's costliest user-space functions (HAProxy's own code differs, so its column is 0):")
diff(lambda k: k != "k", 15)
PY
