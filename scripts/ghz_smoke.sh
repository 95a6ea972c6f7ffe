#!/usr/bin/env bash
# A short real ghz load against a live local mesh: a LocalEtcd, the router and one example bot
# (examples/cards.yaml), each its own process. Runs ghz/router_match.json against the router's
# Match (several connections) and ghz/bot_respond.json against the bot's Respond, with the
# protoset from `make protoset` (Python servers offer only v1alpha reflection, which ghz cannot
# use). Fails on any non-OK status or when nothing was sent; stops what it started, by pid.
#
# Environment: GHZ (path of a ghz binary; default: on PATH or installed with `go install`),
# GHZ_TOTAL (requests per run, default: the configs' totals), MBC_GHZ_KEEP=1 keeps the work dir.
set -euo pipefail
cd "$(dirname "$0")/.."
GHZ_VERSION=v0.120.0
PY=.venv/bin/python

# Go and the binaries it installs: /usr/local/go/bin is where the Go toolchain usually lives.
export PATH="$PATH:/usr/local/go/bin"
if command -v go >/dev/null 2>&1; then
  export PATH="$PATH:$(go env GOPATH)/bin"
fi
GHZ=${GHZ:-$(command -v ghz || true)}
if [ -z "$GHZ" ]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "ghz_smoke: ghz is not installed and there is no Go toolchain to build it (install Go, or set GHZ)" >&2
    exit 1
  fi
  echo "ghz_smoke: installing ghz $GHZ_VERSION with go install"
  for attempt in 1 2 3; do
    if go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"; then break; fi
    [ "$attempt" -lt 3 ] || { echo "ghz_smoke: go install failed" >&2; exit 1; }
    sleep $((attempt * 5))
  done
  GHZ="$(go env GOPATH)/bin/ghz"
fi
echo "ghz_smoke: using $GHZ ($("$GHZ" --version 2>&1))"

[ -f build/mbc.protoset ] || make protoset

WORK=$(mktemp -d -t mbc-ghz-XXXXXX)
. scripts/mesh.sh
cleanup() {
  mesh_stop 30
  if [ "${MBC_GHZ_KEEP:-0}" = 1 ]; then echo "ghz_smoke: work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

mesh_start ghz_smoke --bot examples/cards.yaml --no-store || exit 1
ROUTER=$(mesh_field router)
BOT=$(mesh_field bot)
echo "ghz_smoke: mesh up: router $ROUTER, bot $BOT"

run_ghz() {  # name config host
  local name=$1 config=$2 host=$3 extra=()
  [ -n "${GHZ_TOTAL:-}" ] && extra+=(--total "$GHZ_TOTAL")
  "$GHZ" --config "$config" --protoset build/mbc.protoset --cpus 1 "${extra[@]}" -O json -o "$WORK/$name.json" "$host" \
    || { echo "ghz_smoke: ghz $name exited with $?" >&2; return 1; }
  "$PY" - "$name" "$WORK/$name.json" <<'PYEOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
statuses = r.get("statusCodeDistribution") or {}
errors = r.get("errorDistribution") or {}
lat = r.get("latencyDistribution") or []
p = {int(x["percentage"]): x["latency"] / 1e6 for x in lat}
print(f"ghz {name}: {r['count']} calls, {r['rps']:.0f}/s, average {r['average'] / 1e6:.1f} ms, "
      f"p50 {p.get(50, 0):.1f} ms, p99 {p.get(99, 0):.1f} ms, statuses {statuses}")
bad = {k: v for k, v in statuses.items() if k != "OK"}
if r["count"] == 0 or bad or errors or statuses.get("OK", 0) != r["count"]:
    print(f"ghz {name}: FAILED: statuses {statuses}, errors {errors}", file=sys.stderr)
    sys.exit(1)
PYEOF
}

run_ghz router_match ghz/router_match.json "$ROUTER"
run_ghz bot_respond ghz/bot_respond.json "$BOT"
echo "ghz_smoke: passed"
