#!/usr/bin/env bash
# Sets everything up and runs every test: lint, one build of all targets and tests, then the
# test suites. Run it as root, or as yourself with sudo rights: bash scripts/test.sh
# The build runs as you, with the Swift toolchain on your PATH; apt-get (scripts/bootstrap.sh) and
# the test runs (RootTests need root: namespaces, iptables, dpkg) go through sudo with your PATH
# kept, and what root leaves in the checkout is given back to you at the end, also on failure.
# TRELLIS_SETUP_ONLY=1 stops before the build: packages, .venv, and swift, envoy and python3 found
# as you and as root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/privileges.sh
need_sudo test "the test runs need root (namespaces, iptables, dpkg)"
find_swift test
trap 'stop_sudo_keepalive; give_back' EXIT
trap 'exit 130' INT TERM

bash scripts/bootstrap.sh
# envoy and python3 with grpcio (PyPI, in .venv): what the tests find on PATH.
export PATH="$root/.venv/bin:$PATH"
check_tools test
if [ "${TRELLIS_SETUP_ONLY:-0}" = 1 ]; then
  echo "test: set up; stopping before the build (TRELLIS_SETUP_ONLY=1)"
  exit 0
fi
keep_sudo_alive

echo "== swift format lint"
swift format lint --strict -r Sources Tests Package.swift

if [ -x .build-protoc/release/protoc-gen-swift ] && [ -x .build-protoc/release/protoc-gen-grpc-swift-2 ]; then
  echo "== generated code is up to date (plugins already built)"
  bash Protos/generate.sh --check
else
  echo "== generated code: the protoc plugins are not built here; checking that the committed code compiles"
fi

echo "== swift build --build-tests"
swift build --build-tests

# Three runs, as root (as_root: sudo with PATH kept when you are not root), of the build above: the
# suites that start namespaces, agents, pilot, Envoy and dpkg (RootTests), the 100,000-endpoint
# suite and the HTTP/2 floods and fuzzing (HTTP2AbuseTests) are heavy on a 2-core machine, and
# would starve the timing-sensitive proxy suites if run alongside them; the streaming suite measures this process's peak RSS, which any suite running
# beside it (floods of requests, pilots) inflates.
# The in-process data-path tests and the tests that start etcd, Envoy, pilots and agents run as
# two groups: all at once they overloaded two cores, and tests that bound a response's time
# (route timeouts, drains, eventual consistency) failed now and then for want of a core.
skipped="RootTests|XDSScaleTests|HTTP2AbuseTests|StreamingAndPoolTests"
echo "== swift test (ProxyTests, InterceptorTests; but $skipped)"
as_root swift test --skip-build --disable-xctest --filter "^(ProxyTests|InterceptorTests)\." --skip "$skipped"
echo "== swift test (AgentTests, PilotTests, EtcdTests, XDSTests; but $skipped)"
as_root swift test --skip-build --disable-xctest --skip "^(ProxyTests|InterceptorTests)\.|$skipped"
echo "== swift test (StreamingAndPoolTests: memory stays flat while streaming)"
as_root swift test --skip-build --disable-xctest --filter "StreamingAndPoolTests"
echo "== swift test (RootTests: namespaces, iptables, the agent binary, packages; HTTP2AbuseTests)"
as_root swift test --skip-build --disable-xctest --filter "RootTests|HTTP2AbuseTests"
# Alone: a thousand grpcio threads on one channel; beside the root tests on two cores, streams
# ran past their deadline and the cancellations that followed were a reset flood.
echo "== swift test (XDSScaleTests: pilot with a thousand streams and nodes)"
as_root swift test --skip-build --disable-xctest --filter "XDSScaleTests"
