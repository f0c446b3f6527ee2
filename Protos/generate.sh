#!/usr/bin/env bash
# Regenerates Sources/XDS/Generated/ from the .proto files in Protos/.
#   bash Protos/generate.sh           # build the plugins if needed, regenerate
#   bash Protos/generate.sh --check   # regenerate into a temporary folder; fail on any difference
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v protoc >/dev/null || { echo "protoc missing: run scripts/bootstrap.sh" >&2; exit 2; }

scratch=.build-protoc
swift build -c release --scratch-path "$scratch" --product protoc-gen-swift
swift build -c release --scratch-path "$scratch" --product protoc-gen-grpc-swift-2
bin=$(swift build -c release --scratch-path "$scratch" --show-bin-path)

out=Sources/XDS/Generated
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
find "$out" -name '*.pb.swift' -delete
find "$out" -name '*.grpc.swift' -delete

messages=$(cd Protos && find . -name '*.proto' | sed 's|^\./||' | sort)
services="envoy/service/discovery/v3/ads.proto envoy/service/cluster/v3/cds.proto envoy/service/endpoint/v3/eds.proto envoy/service/listener/v3/lds.proto envoy/service/route/v3/rds.proto"
options="Visibility=Public,FileNaming=PathToUnderscores,UseAccessLevelOnImports=true"

# shellcheck disable=SC2086
protoc -I Protos -I /usr/include --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --swift_out="$out" --swift_opt="$options" $messages
# shellcheck disable=SC2086
protoc -I Protos -I /usr/include --plugin=protoc-gen-grpc-swift-2="$bin/protoc-gen-grpc-swift-2" \
  --grpc-swift-2_out="$out" --grpc-swift-2_opt="$options,Server=true,Client=true" $services

if [ "${1:-}" = "--check" ]; then
  diff -r -x README.md "$out" Sources/XDS/Generated && echo "generated code is up to date"
fi
