#!/usr/bin/env bash
# Writes the Go stubs of proto/sidecast/v1/control.proto into gen/sidecastv1 (or into the
# directory given as $1, for the check that the committed ones are current). Needs protoc
# (Debian: protobuf-compiler) and, on PATH, the two plugins:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-.}"
module=example.com/sidecast-backend
map="Msidecast/v1/control.proto=$module/gen/sidecastv1"
protoc -I ../../../proto \
    --go_out="$out" --go_opt="module=$module" --go_opt="$map" \
    --go-grpc_out="$out" --go-grpc_opt="module=$module" --go-grpc_opt="$map" \
    ../../../proto/sidecast/v1/control.proto
