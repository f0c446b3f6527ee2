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
#     (fault-around), so scattered hot functions made ~14 MiB of code resident; grouped, a few.
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
  -Xlinker --no-export-dynamic
  -Xlinker -z -Xlinker pack-relative-relocs
  -Xlinker "--symbol-ordering-file=$order" -Xlinker --no-warn-symbol-ordering
)
cd "$root"
for p in "${products[@]}"; do
  # The order file is not an input SwiftPM tracks: removing the binary makes it link again.
  rm -f "$root/.build-static/release/$p"
  swift build "${flags[@]}" --product "$p"
done
