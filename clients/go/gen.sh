#!/usr/bin/env bash
# Generate the Go stubs for protos/mbc/v1/*.proto into clients/go/mbcv1 (package mbcv1), with the
# protoc bundled in grpcio-tools (the repo's pinned Python dev dependency) and the Go plugins at the
# versions below (installed with `go install` when missing or at another version).
#
#   clients/go/gen.sh [OUT_DIR]   # default: clients/go; CI generates into a temp dir and diffs
set -euo pipefail
cd "$(dirname "$0")/../.."
PROTOC_GEN_GO_VERSION=v1.36.12        # google.golang.org/protobuf/cmd/protoc-gen-go
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2     # google.golang.org/grpc/cmd/protoc-gen-go-grpc
MODULE=mbc/clients/go
PY=${PY:-.venv/bin/python}
OUT=${1:-clients/go}

export PATH="$PATH:/usr/local/go/bin"
GOBIN_DIR="$(go env GOPATH)/bin"
export PATH="$PATH:$GOBIN_DIR"

installed_version() {  # binary -> version of the module it was built from, or nothing
  [ -x "$GOBIN_DIR/$1" ] && go version -m "$GOBIN_DIR/$1" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}
ensure() {  # binary package version
  if [ "$(installed_version "$1")" != "$3" ]; then
    echo "gen.sh: installing $1 $3"
    go install "$2@$3"
  fi
}
ensure protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
ensure protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

WELL_KNOWN=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
files=()
opts=()
for f in protos/mbc/v1/*.proto; do
  rel=${f#protos/}
  files+=("$rel")
  opts+=("M$rel=$MODULE/mbcv1;mbcv1")
done
go_opts="module=$MODULE"
for o in "${opts[@]}"; do go_opts+=",$o"; done
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I protos -I "$WELL_KNOWN" \
  --plugin=protoc-gen-go="$GOBIN_DIR/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$GOBIN_DIR/protoc-gen-go-grpc" \
  --go_out="$OUT" --go_opt="$go_opts" \
  --go-grpc_out="$OUT" --go-grpc_opt="$go_opts" \
  "${files[@]}"
