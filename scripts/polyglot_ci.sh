#!/usr/bin/env bash
# The contracts and the clients in other languages, checked against a live local mesh (issue 6):
#   - buf lint, and buf breaking against the previous commit (protos/buf.yaml);
#   - the committed Go stubs (clients/go/mbcv1) are what clients/go/gen.sh makes now, and the Go
#     client's copy of the service config is protos/service_config.json;
#   - a live mesh: a LocalEtcd, the store, the router and the three example bots, each its own
#     process (`python -m mbc.testing.mesh`, the harness scripts/ghz_smoke.sh uses too);
#   - the Go test (go test ./... in clients/go) and the Go gateway program, the Node test
#     (node --test in clients/node): a local answer, transfers with intent and message, a fallback;
#   - grpcurl lists and describes every service through reflection on the router, the store and
#     each bot, and calls Router.Match.
# Installs what is missing (idempotent): buf (PyPI buf-bin, pinned in pyproject.toml), the Go
# plugins (clients/go/gen.sh), grpcurl (go install, pinned below), the Node packages (npm ci).
# Fetches nothing else: buf breaking reads the previous commit from the local .git.
# Every check runs; the last line counts them, and the exit status is 1 when one failed. Stops
# what it started, by pid. MBC_POLYGLOT_KEEP=1 keeps the work dir (logs of every component).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=.venv/bin/python
GRPCURL_VERSION=v1.9.4
START=$SECONDS

export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "polyglot: Go is not installed (/usr/local/go/bin)" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null || { echo "polyglot: Node.js and npm are required" >&2; exit 1; }
GOBIN_DIR="$(go env GOPATH)/bin"
export PATH="$PATH:$GOBIN_DIR"
[ -x "$PY" ] || scripts/setup.sh

retry() {  # up to 3 tries, for installs over the network
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    [ "$attempt" -lt 3 ] && sleep $((attempt * 5))
  done
  return 1
}

echo "== polyglot: tools"
if [ ! -x .venv/bin/buf ]; then
  echo "polyglot: installing buf (PyPI buf-bin, pinned in requirements.lock)"
  retry "$PY" -m pip install -q -c requirements.lock buf-bin
fi
BUF=.venv/bin/buf
if [ "$(go version -m "$GOBIN_DIR/grpcurl" 2>/dev/null | awk '$1 == "mod" { print $3; exit }')" != "$GRPCURL_VERSION" ]; then
  echo "polyglot: installing grpcurl $GRPCURL_VERSION with go install"
  retry go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
fi
GRPCURL="$GOBIN_DIR/grpcurl"
(cd clients/node && retry npm ci --no-audit --no-fund --loglevel=error)
(cd clients/go && retry go mod download)
echo "buf $("$BUF" --version), grpcurl $GRPCURL_VERSION, $(go version | cut -d' ' -f3), node $(node --version), npm $(npm --version)"

WORK=$(mktemp -d -t mbc-polyglot-XXXXXX)
. scripts/mesh.sh
cleanup() {
  mesh_stop 60
  if [ "${MBC_POLYGLOT_KEEP:-0}" = 1 ]; then echo "polyglot: work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

PASSED=0
FAILED=()
check() {  # name command...: runs it, shows its output, records the result
  local name=$1 started=$SECONDS rc=0
  shift
  echo
  echo "== polyglot: $name"
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    PASSED=$((PASSED + 1)); echo "-- ok: $name ($((SECONDS - started)) s)"
  else
    FAILED+=("$name"); echo "-- FAILED: $name (exit $rc)"
  fi
}

# Contracts ------------------------------------------------------------------------------------
check "buf lint" "$BUF" lint protos
buf_breaking() {
  if [ "$(git rev-parse --is-shallow-repository 2>/dev/null)" = true ] && ! git rev-parse -q --verify HEAD~1 >/dev/null; then
    echo "shallow clone without the previous commit: nothing to compare with (skipped)"; return 0
  fi
  if ! git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then
    echo "first commit: nothing to compare with (skipped)"; return 0
  fi
  if ! git cat-file -e 'HEAD~1:protos' 2>/dev/null; then
    echo "the previous commit has no protos/: nothing to compare with (skipped)"; return 0
  fi
  echo "protos/ (working tree) against $(git log -1 --format='%h %s' HEAD~1)"
  "$BUF" breaking protos --against ".git#ref=HEAD~1,subdir=protos"
}
check "buf breaking against HEAD~1" buf_breaking
go_stubs_fresh() {
  clients/go/gen.sh "$WORK/go-gen" && diff -r "$WORK/go-gen/mbcv1" clients/go/mbcv1 \
    && echo "clients/go/mbcv1 is up to date" \
    || { echo "regenerate with clients/go/gen.sh" >&2; return 1; }
}
check "Go stubs up to date" go_stubs_fresh

# A live mesh ----------------------------------------------------------------------------------
echo
echo "== polyglot: starting a live mesh (etcd, store, router, three example bots)"
mesh_start polyglot || exit 1
STORE=$(mesh_field store); ROUTER=$(mesh_field router); ENTRY=$(mesh_field entry); BOTS=$(mesh_field bots)
echo "mesh up in $((SECONDS - START)) s: store $STORE, router $ROUTER, bots: $(echo $BOTS)"
export MBC_ENTRY_BOT=$ENTRY MBC_STORE=$STORE MBC_ROUTER=$ROUTER MBC_REQUIRE_MESH=1

# Clients --------------------------------------------------------------------------------------
check "Go: go vet, go test ./... (clients/go)" bash -c 'cd clients/go && go vet ./... && go test -count=1 -v ./...'
check "Go: the gateway program (clients/go/cmd/gateway)" bash -c \
  'cd clients/go && go run ./cmd/gateway -entry "$MBC_ENTRY_BOT" -store "$MBC_STORE" \
     "What is the balance on my checking account?" "I lost my debit card" "Which pizza place near me delivers the fastest?"'
check "Node: node --test (clients/node)" bash -c 'cd clients/node && node --test'

# grpcurl through reflection -------------------------------------------------------------------
grpcurl_describe_all() {  # address expected-service expected-method
  local address=$1 service=$2 method=$3 listed s out
  listed=$("$GRPCURL" -plaintext "$address" list) || return 1
  echo "$address lists: $(echo $listed)"
  for s in "$service" grpc.health.v1.Health; do
    grep -qx "$s" <<<"$listed" || { echo "$s is not listed" >&2; return 1; }
  done
  for s in $listed; do
    out=$("$GRPCURL" -plaintext "$address" describe "$s") || { echo "describe $s failed" >&2; return 1; }
    echo "  describe $s: $(grep -c 'rpc ' <<<"$out") methods"
  done
  # (Python's v1alpha reflection resolves services and messages, not method symbols: the method
  # is looked up in the service's description.)
  out=$("$GRPCURL" -plaintext "$address" describe "$service")
  grep -E "rpc $method ?\(" <<<"$out" || { echo "$service has no $method:" >&2; echo "$out" >&2; return 1; }
}
check "grpcurl: router ($ROUTER)" grpcurl_describe_all "$ROUTER" mbc.v1.Router Match
check "grpcurl: store ($STORE)" grpcurl_describe_all "$STORE" mbc.v1.ContextStore GetOwner
for bot in $BOTS; do
  check "grpcurl: bot ${bot%%=*} (${bot#*=})" grpcurl_describe_all "${bot#*=}" mbc.v1.Bot Respond
done
grpcurl_match() {
  local out
  "$GRPCURL" -plaintext "$ROUTER" describe mbc.v1.MatchRequest || return 1
  out=$("$GRPCURL" -plaintext -d '{"text": "I lost my debit card", "group": "retail-bank", "max_candidates": 1}' "$ROUTER" mbc.v1.Router/Match) || return 1
  echo "$out"
  grep -Eq '"bot_?[iI]d": "cards"' <<<"$out" && grep -q '"intent": "lost_or_stolen_card"' <<<"$out"
}
check "grpcurl: call Router.Match" grpcurl_match

echo
echo "polyglot: took $((SECONDS - START)) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'polyglot: failed: %s\n' "${FAILED[@]}"
fi
echo "polyglot: $PASSED passed, ${#FAILED[@]} failed"
[ "${#FAILED[@]}" -eq 0 ]
