#!/usr/bin/env bash
# Records which functions trellis-agent runs, into scripts/trellis-agent.order, the link order
# scripts/build-release.sh uses to put them side by side (see there for why).
#
# Two agents (the release build) run under valgrind's callgrind in namespaces, with pilot:
# VM A's plain curl reaches a legacy server on VM B by name through both agents (outbound
# routing, inbound forwarding, xDS, registration, health checks, the gate), then passthrough,
# raw TCP, admin and control-socket commands, a drain, and SIGTERM. Every function that ran in
# either agent goes into the list.
#
# Run after changes to the agent's hot paths, then scripts/build-release.sh; a stale list still
# links (unknown names are ignored), only the layout is less tight.
# Usage: sudo bash scripts/agent-order.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ "$(id -u)" = 0 ] || { echo "agent-order: run as root (namespaces, iptables)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "agent-order: needs valgrind (scripts/bootstrap.sh installs it)" >&2; exit 1; }

bash scripts/build-release.sh trellis-agent
bin="$root/.build-static/release"
# Pilot only serves the agents here: its debug build will do (or PILOT_BIN, any build of it).
pilot=${PILOT_BIN:-}
if [ -z "$pilot" ]; then
  swift build --product trellis-pilot
  pilot="$root/.build/debug/trellis-pilot"
fi

tag=$$
hub="trellis-order-hub-$tag" vma="trellis-order-a-$tag" vmb="trellis-order-b-$tag"
net=10.98.$((tag % 200 + 20))
pilot_ip=$net.254 a_ip=$net.1 b_ip=$net.2
work=$(mktemp -d /tmp/trellis-order.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$vma" "$vmb" "$hub"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/etc/netns/$vma" "$work"
}
trap cleanup EXIT

# valgrind cannot read Swift's DWARF 5: it runs a copy without debug sections (symbols stay).
strip --strip-debug -o "$work/trellis-agent" "$bin/trellis-agent"

ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" addr add "$pilot_ip/24" dev br0
ip -n "$hub" link set br0 up
for pair in "a:$vma:$a_ip" "b:$vmb:$b_ip"; do
  IFS=: read -r short ns ipaddr <<<"$pair"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "to$short$tag" netns "$ns" type veth peer name "th$short$tag" netns "$hub"
  ip -n "$ns" link set "to$short$tag" name eth0
  ip -n "$ns" addr add "$ipaddr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$hub" link set "th$short$tag" master br0 up
done

: >"$work/mesh.yaml"
ip netns exec "$hub" "$pilot" serve --store "$work/pilot.db" --mesh "$work/mesh.yaml" \
  --xds-address "$pilot_ip:15010" --http-address "$pilot_ip:15014" >"$work/pilot.log" 2>&1 &
pids+=($!)
ip netns exec "$vmb" python3 "$root/Tests/Fixtures/http/slow_server.py" --port 8080 --name legacy >/dev/null 2>&1 &
pids+=($!)
mkdir -p "/etc/netns/$vma"
printf '127.0.0.1 localhost\n%s orders\n' "$b_ip" >"/etc/netns/$vma/hosts"

for vm in a b; do
  ip_var="${vm}_ip"
  services="services: []"
  [ $vm = b ] && services="services: [{name: orders, port: 8080, protocol: http, health_check: {http: /, interval: 1s}}]"
  cat >"$work/vm-$vm.yaml" <<YAML
node: vm-$vm
pilot: {api: $pilot_ip:15014, xds: $pilot_ip:15010}
register: {address: ${!ip_var}}
$services
drain_deadline: 5s
state_dir: $work/state-$vm
capture:
  inbound_ports: "*"
  inbound_exclude_ports: [22]
  gate: {queue: 15000, mark: 0x1}
YAML
  ns_var="vm$vm"
  ip netns exec "${!ns_var}" valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.$vm" \
    "$work/trellis-agent" run --config "$work/vm-$vm.yaml" --control-socket "$work/vm-$vm.sock" \
    >"$work/agent-$vm.log" 2>&1 &
  pids+=($!)
  eval "agent_$vm=$!"
done
echo "== agents starting under valgrind (slow)"
for vm in a b; do
  for _ in $(seq 1 300); do "$bin/trellis-agent" status --socket "$work/vm-$vm.sock" >/dev/null 2>&1 && break; sleep 0.5; done
done
for _ in $(seq 1 120); do
  ip netns exec "$vma" curl -s --max-time 10 -o /dev/null -w '%{http_code}' http://orders:8080/ready 2>/dev/null | grep -q 200 \
    && ip netns exec "$hub" curl -s "http://$pilot_ip:15014/v1/instances?service=orders" | grep -q healthy && break
  sleep 0.5
done
echo "== workload"
for i in $(seq 1 30); do ip netns exec "$vma" curl -s --max-time 10 -o /dev/null "http://orders:8080/r$i" || true; done
for i in $(seq 1 5); do ip netns exec "$vma" curl -s --max-time 10 -o /dev/null "http://$b_ip:8080/slow?ms=50" || true; done
ip netns exec "$vma" python3 - "$b_ip" <<'PY' || true
import socket, sys
for _ in range(3):
    s = socket.create_connection((sys.argv[1], 8080), timeout=10)
    s.sendall(b"not http at all\r\n\r\n")
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
PY
for vm in a b; do
  ns_var="vm$vm"
  ip netns exec "${!ns_var}" curl -s --max-time 10 -o /dev/null http://127.0.0.1:15000/stats/prometheus || true
  ip netns exec "${!ns_var}" curl -s --max-time 10 -o /dev/null http://127.0.0.1:15000/config_dump || true
  "$bin/trellis-agent" status --socket "$work/vm-$vm.sock" >/dev/null || true
done
"$bin/trellis-agent" drain --deadline 3s --socket "$work/vm-b.sock" >/dev/null || true
"$bin/trellis-agent" undrain --socket "$work/vm-b.sock" >/dev/null || true
for i in $(seq 1 5); do ip netns exec "$vma" curl -s --max-time 10 -o /dev/null "http://orders:8080/again$i" || true; done
echo "== idle, then SIGTERM"
sleep 20
for vm in a b; do kill -TERM "$(eval echo "\$agent_$vm")"; done
for vm in a b; do wait "$(eval echo "\$agent_$vm")" || true; done

python3 - "$work/callgrind.a" "$work/callgrind.b" "$root/scripts/trellis-agent.order" "$bin/trellis-agent" <<'PY'
import re, subprocess, sys
*profiles, out, binary = sys.argv[1:]
names = set()
for path in profiles:
    for line in open(path, errors="replace"):
        m = re.match(r"c?fn=\(\d+\) (.+)", line)
        if m:
            names.add(re.sub(r"'\d+$", "", m.group(1).strip()))
defined = set()
for line in subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        defined.add(parts[2])
kept = sorted(names & defined)
with open(out, "w") as f:
    f.write("\n".join(kept) + "\n")
print(f"agent-order: {len(kept)} functions ran ({len(names)} names seen) -> {out}")
PY
