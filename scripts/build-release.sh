#!/usr/bin/env bash
# Builds the release binaries the way they ship (.deb, install.sh, benchmarks) into
# .build-static/release: optimized, the Swift standard library and Foundation linked in, and
# laid out so that an idle agent holds little memory:
#
#   - lld instead of gold, without --export-dynamic (the static stdlib's link arguments ask for
#     it: it exported ~70,000 of our symbols, and each symbolic relocation then cost the dynamic
#     loader a lookup) and with packed relative relocations (DT_RELR, glibc >= 2.36): the
#     loader no longer reads 3.6 MiB of .rela.dyn and 3 MiB of symbol tables at each start;
#   - every Swift function in its own section, placed by scripts/trellis-agent.order (the
#     functions an agent runs to start, capture, route, report and drain, recorded by
#     scripts/agent-order.sh): the kernel maps code in 64 KiB windows around each page used
#     (fault-around), so scattered hot functions made ~14 MiB of code resident; grouped, a few;
#   - libstdc++ linked in (its archive, found through a folder that holds only it, searched
#     before the compiler's own): the shared library's start-up made ~1.3 MiB of it resident;
#     linked in, only what is used comes along, placed with the rest of the hot code;
#   - no dynamic exclusivity checks in any module, the dependencies' included (Package.swift
#     already drops them from Trellis's own release targets): in SwiftNIO's buffers, channels
#     and HTTP codec they cost ~12 % of the gateway's instructions per request (callgrind,
#     swift_beginAccess and its access set). Debug builds, and so every test, keep them.
#
# Usage: scripts/build-release.sh [product...]   (default: trellis-agent trellis-pilot)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
products=("$@")
[ ${#products[@]} -gt 0 ] || products=(trellis-agent trellis-pilot)
order="$root/scripts/trellis-agent.order"
[ -f "$order" ] || { echo "build-release.sh: $order is missing" >&2; exit 1; }
flags=(
  -c release --static-swift-stdlib --scratch-path "$root/.build-static"
  -Xswiftc -Xfrontend -Xswiftc -function-sections
  -Xswiftc -use-ld=lld
  -Xswiftc -enforce-exclusivity=unchecked
  -Xlinker --no-export-dynamic
  -Xlinker -z -Xlinker pack-relative-relocs
  -Xlinker "--symbol-ordering-file=$order" -Xlinker --no-warn-symbol-ordering
)
stdcxx=$(clang -print-file-name=libstdc++.a 2>/dev/null || true)
if [ -f "$stdcxx" ]; then
  mkdir -p "$root/.build-static/static-libs"
  ln -sf "$stdcxx" "$root/.build-static/static-libs/libstdc++.a"
  flags+=(-Xlinker "-L$root/.build-static/static-libs")
else
  echo "build-release.sh: libstdc++.a not found (libstdc++-12-dev); linking the shared libstdc++" >&2
fi
cd "$root"
for p in "${products[@]}"; do
  # The order file is not an input SwiftPM tracks: removing the binary makes it link again.
  rm -f "$root/.build-static/release/$p"
  swift build "${flags[@]}" --product "$p"
done
