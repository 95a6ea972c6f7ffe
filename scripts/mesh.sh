# Shell side of the local-mesh harness (mbc/testing/mesh.py), sourced by scripts/ghz_smoke.sh and
# scripts/polyglot_ci.sh: start `python -m mbc.testing.mesh` in the background, wait for its
# mesh.json, read its fields, stop it by pid. Needs PY (the venv's python) and WORK (a work dir).

MESH_PID=""

# mesh_start LABEL [mbc.testing.mesh flags...]: returns once the router has indexed every bot.
mesh_start() {
  local label=$1; shift
  "$PY" -m mbc.testing.mesh --workdir "$WORK" "$@" > "$WORK/mesh.out" 2>&1 &
  MESH_PID=$!
  for _ in $(seq 1 3000); do
    [ -f "$WORK/mesh.json" ] && return 0
    if ! kill -0 "$MESH_PID" 2>/dev/null; then
      echo "$label: the mesh did not start:" >&2; tail -n 40 "$WORK/mesh.out" "$WORK"/*.log >&2 || true; return 1
    fi
    sleep 0.1
  done
  echo "$label: the mesh was not up within 300 s" >&2; tail -n 40 "$WORK/mesh.out" >&2; return 1
}

# mesh_field KEY: a field of mesh.json (LocalMesh.describe); a dict prints as KEY=VALUE words.
mesh_field() {
  "$PY" -c 'import json, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(" ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)' "$WORK/mesh.json" "$1"
}

# mesh_stop [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 30) if it has not exited.
mesh_stop() {
  if [ -n "$MESH_PID" ] && kill -0 "$MESH_PID" 2>/dev/null; then
    kill -TERM "$MESH_PID" 2>/dev/null || true
    for _ in $(seq 1 $((${1:-30} * 10))); do kill -0 "$MESH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$MESH_PID" 2>/dev/null || true
  fi
  [ -n "$MESH_PID" ] && wait "$MESH_PID" 2>/dev/null || true
}
