#!/usr/bin/env bash
# The mesh demo (one client VM, the legacy service on two more). Sets everything up (packages, build), then: pilot with its embedded store,
# two "VMs" as network namespaces joined by a bridge, the agent installed in each, an unmodified
# legacy HTTP server on VM B, and plain curl on VM A reaching it through both agents. Prints the
# answers, both agents' status and the metric lines that prove the traffic crossed both; then a
# drain, and the agent on A killed (traffic keeps flowing: the gate fails open).
#   bash scripts/demo.sh            (RELEASE=1 builds -c release)
# Run it as root, or as yourself with sudo rights: the build runs as you, with the Swift toolchain
# on your PATH; the rest (namespaces, iptables, the agents) runs as root through sudo, your PATH
# kept. TRELLIS_SETUP_ONLY=1 stops before the build: packages, .venv, the tools found as you and
# as root.
# Every address is inside the namespaces it creates; all of them, and every process, are removed
# at the end, also on failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/privileges.sh
config=debug
[ "${RELEASE:-0}" = 1 ] && config=release
bin="$root/.build/$config"

if [ "${TRELLIS_DEMO_AS_ROOT:-0}" != 1 ]; then
  need_sudo demo "network namespaces and iptables need root"
  find_swift demo
  trap give_back EXIT
  bash scripts/bootstrap.sh
  export PATH="$root/.venv/bin:$PATH"
  check_tools demo
  if [ "${TRELLIS_SETUP_ONLY:-0}" = 1 ]; then
    echo "demo: set up; stopping before the build (TRELLIS_SETUP_ONLY=1)"
    exit 0
  fi
  echo "== building trellis-agent and trellis-pilot ($config)"
  swift build -c "$config" --product trellis-agent
  swift build -c "$config" --product trellis-pilot
  if [ "$(id -u)" != 0 ]; then
    echo "== the rest as root (sudo): namespaces, iptables, pilot and the agents"
    as_root env TRELLIS_DEMO_AS_ROOT=1 bash "$root/scripts/demo.sh"
    exit 0
  fi
fi

tag=$$
hub="trellis-demo-hub-$tag"
vma="trellis-demo-a-$tag"
vmb="trellis-demo-b-$tag"
vmc="trellis-demo-c-$tag"
net=10.99.$((tag % 200 + 20))
pilot_ip=$net.254
a_ip=$net.1
b_ip=$net.2
c_ip=$net.3
work=$(mktemp -d /tmp/trellis-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$vma" "$vmb" "$vmc" "$hub"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/etc/netns/$vma"
  rm -rf "$work"
  give_back
}
trap cleanup EXIT

echo "== three VMs (A $a_ip, B $b_ip, C $c_ip) and pilot ($pilot_ip) on a bridge, all in namespaces"
ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" addr add "$pilot_ip/24" dev br0
ip -n "$hub" link set br0 up
for pair in "a:$vma:$a_ip" "b:$vmb:$b_ip" "c:$vmc:$c_ip"; do
  IFS=: read -r short ns ipaddr <<<"$pair"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "td$short$tag" netns "$ns" type veth peer name "th$short$tag" netns "$hub"
  ip -n "$ns" link set "td$short$tag" name eth0
  ip -n "$ns" addr add "$ipaddr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$hub" link set "th$short$tag" master br0 up
done

echo "== pilot"
ip netns exec "$hub" "$bin/trellis-pilot" serve --store "$work/pilot.db" --mesh "$work/mesh.yaml" \
  --xds-address "$pilot_ip:15010" --http-address "$pilot_ip:15014" >"$work/pilot.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do ip netns exec "$hub" curl -sf -o /dev/null "http://$pilot_ip:15014/healthz" && break; sleep 0.1; done

echo "== the legacy 'orders' server on VM B and on VM C (unmodified, port 8080)"
for vm in b c; do
  ns_var="vm$vm"
  ip netns exec "${!ns_var}" python3 "$root/Tests/Fixtures/http/slow_server.py" --port 8080 --name "orders on vm-$vm" \
    >"$work/legacy-$vm.log" 2>&1 &
  pids+=($!)
done
# VM A's programs find "orders" the way legacy clients do, by name (/etc/hosts as `ip netns exec` sees it).
mkdir -p "/etc/netns/$vma"
printf '127.0.0.1 localhost\n%s orders\n' "$b_ip" >"/etc/netns/$vma/hosts"

write_agent() { # name ip services
  cat >"$work/$1.yaml" <<YAML
node: $1
pilot: {api: $pilot_ip:15014, xds: $pilot_ip:15010}
register: {address: $2}
$3
drain_deadline: 10s
state_dir: $work/state-$1
capture:
  inbound_ports: "*"
  inbound_exclude_ports: [22]
  gate: {queue: 15000, mark: 0x1}
YAML
}
write_agent vm-a "$a_ip" "services: []"
write_agent vm-b "$b_ip" "services: [{name: orders, port: 8080, protocol: http, health_check: {http: /, interval: 1s}}]"
write_agent vm-c "$c_ip" "services: [{name: orders, port: 8080, protocol: http, health_check: {http: /, interval: 1s}}]"
for vm in a b c; do
  ns_var="vm$vm"
  ip netns exec "${!ns_var}" "$bin/trellis-agent" run --config "$work/vm-$vm.yaml" \
    --control-socket "$work/vm-$vm.sock" --event-loops 1 >"$work/agent-$vm.log" 2>&1 &
  pids+=($!)
  eval "agent_$vm=$!"
done
for vm in a b c; do
  for _ in $(seq 1 150); do "$bin/trellis-agent" status --socket "$work/vm-$vm.sock" >/dev/null 2>&1 && break; sleep 0.2; done
done
for _ in $(seq 1 50); do
  [ "$(ip netns exec "$hub" curl -s "http://$pilot_ip:15014/v1/instances?service=orders" | grep -o '"healthy"' | wc -l)" = 2 ] && break
  sleep 0.2
done

show() { echo "\$ $*"; "$@"; echo; }
echo
echo "== VM A's plain curl reaches the unmodified 'orders' servers through the agents, balanced over B and C"
sleep 1
for i in 1 2 3 4; do show ip netns exec "$vma" curl -s "http://orders:8080/hello-$i"; done
echo "== by address, to a destination pilot knows nothing about on that port: passed through as it was"
show ip netns exec "$vma" curl -s "http://$b_ip:8080/slow?ms=200"
echo "== pilot's registry: the agents on B and C registered 'orders' and health-check it"
show ip netns exec "$hub" curl -s "http://$pilot_ip:15014/v1/instances?service=orders"
echo "== the agents"
show "$bin/trellis-agent" status --socket "$work/vm-a.sock"
show "$bin/trellis-agent" status --socket "$work/vm-b.sock"
echo "== metrics: the requests crossed A's outbound listener and B's and C's inbound listeners"
for vm in a b c; do
  ns_var="vm$vm"
  echo "-- vm-$vm"
  ip netns exec "${!ns_var}" curl -s http://127.0.0.1:15000/stats/prometheus \
    | grep -E '^trellis_(sniffed_connections_total|upstream_requests_total|gate_connections_total)' | grep -v ' 0$' || true
done
echo
echo "== drain VM B while a slow request is in flight: it completes; pilot marks vm-b draining, and A sends 'orders' to C"
ip netns exec "$vma" curl -s "http://$b_ip:8080/slow?ms=1500" >"$work/slow.out" &
slow=$!
sleep 0.5
show "$bin/trellis-agent" drain --deadline 10s --socket "$work/vm-b.sock"
wait $slow || true
echo "in-flight request answered: $(cat "$work/slow.out")"
ip netns exec "$hub" curl -s "http://$pilot_ip:15014/v1/instances?service=orders" | grep -o '"node":"vm-[bc]"\|"status":"[a-z]*"' | paste -sd' '
sleep 0.5
for i in 1 2 3; do show ip netns exec "$vma" curl -s "http://orders:8080/during-drain-$i"; done
show "$bin/trellis-agent" undrain --socket "$work/vm-b.sock"

echo "== VM A's agent killed (SIGKILL): new connections go straight to VM B (the gate fails open)"
kill -9 "$agent_a"
wait "$agent_a" 2>/dev/null || true
show ip netns exec "$vma" curl -s --max-time 5 "http://orders:8080/still-there"
echo "demo: ok"
