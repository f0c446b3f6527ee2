#!/usr/bin/env bash
# Regenerates Sources/XDS/Generated/ and Sources/Etcd/Generated/ from the .proto files in Protos/.
#   bash Protos/generate.sh           # build the plugins if needed, regenerate
#   bash Protos/generate.sh --check   # regenerate into a temporary folder; fail on any difference
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v protoc >/dev/null || { echo "protoc missing: run scripts/bootstrap.sh" >&2; exit 2; }

# PLUGINS=folder uses protoc-gen-swift and protoc-gen-grpc-swift-2 already built there.
if [ -n "${PLUGINS:-}" ]; then
  bin=$PLUGINS
else
  scratch=.build-protoc
  swift build -c release --scratch-path "$scratch" --product protoc-gen-swift
  swift build -c release --scratch-path "$scratch" --product protoc-gen-grpc-swift-2
  bin=$(swift build -c release --scratch-path "$scratch" --show-bin-path)
fi
options="Visibility=Public,FileNaming=PathToUnderscores,UseAccessLevelOnImports=true"

# generate <output folder> <message files> <service files>: the Swift messages of the first, the
# gRPC clients (and servers) of the second.
generate() {
  local out=$1 messages=$2 services=$3 grpc_options=$4
  find "$out" -name '*.pb.swift' -delete
  find "$out" -name '*.grpc.swift' -delete
  # shellcheck disable=SC2086
  protoc -I Protos -I /usr/include --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
    --swift_out="$out" --swift_opt="$options" $messages
  # shellcheck disable=SC2086
  protoc -I Protos -I /usr/include --plugin=protoc-gen-grpc-swift-2="$bin/protoc-gen-grpc-swift-2" \
    --grpc-swift-2_out="$out" --grpc-swift-2_opt="$options,$grpc_options" $services
}

xds_out=Sources/XDS/Generated
etcd_out=Sources/Etcd/Generated
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  xds_out=$tmp/xds etcd_out=$tmp/etcd
  mkdir -p "$xds_out" "$etcd_out"
fi

# xDS: every file but etcd's (and gogoproto, whose options only annotate etcd's files).
generate "$xds_out" "$(cd Protos && find . -name '*.proto' -not -path './etcd/*' -not -path './gogoproto/*' | sed 's|^\./||' | sort)" \
  "envoy/service/discovery/v3/ads.proto envoy/service/cluster/v3/cds.proto envoy/service/endpoint/v3/eds.proto envoy/service/listener/v3/lds.proto envoy/service/route/v3/rds.proto" \
  "Server=true,Client=true"
# etcd v3: the messages and the clients of KV, Watch, Lease, Cluster, Maintenance, Auth,
# Election and Lock (pilot is etcd's client only).
etcd_files=$(cd Protos && find etcd -name '*.proto' | sort)
generate "$etcd_out" "$etcd_files" \
  "etcd/etcdserver/etcdserverpb/rpc.proto etcd/etcdserver/api/v3election/v3electionpb/v3election.proto etcd/etcdserver/api/v3lock/v3lockpb/v3lock.proto" \
  "Server=false,Client=true"

if [ "${1:-}" = "--check" ]; then
  diff -r -x README.md "$xds_out" Sources/XDS/Generated && diff -r -x README.md "$etcd_out" Sources/Etcd/Generated &&
    echo "generated code is up to date"
fi
