# Sourced by the mesh benchmarks (mesh-path.sh, mesh-grpc.sh): two network namespaces, "VM A" and
# "VM B", joined by a veth pair, and a cleanup on exit that stops the processes in `pids` and
# removes both namespaces and the work folder, also on failure.
#
#   netns_pair NAME OCTET VETH   # namespaces NAME-a/NAME-b, 10.OCTET.0.1/.2, veth VETH-a/VETH-b
#
# Sets A, B (namespace names), a_ip, b_ip, out (a work folder other users can read) and pids.
netns_pair() {
  A="$1-a" B="$1-b"
  a_ip="10.$2.0.1" b_ip="10.$2.0.2"
  out=$(mktemp -d "/tmp/$1.XXXXXX")
  chmod 755 "$out"
  pids=()
  trap netns_pair_cleanup EXIT
  ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true
  ip netns add "$A"; ip netns add "$B"
  ip link add "$3-a" netns "$A" type veth peer name "$3-b" netns "$B"
  ip -n "$A" addr add "$a_ip/24" dev "$3-a"; ip -n "$B" addr add "$b_ip/24" dev "$3-b"
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
  ip -n "$A" link set "$3-a" up; ip -n "$B" link set "$3-b" up
}

netns_pair_cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$out"
}
