#!/usr/bin/env bash
# Prepare a machine for mbc: etcd (Debian etcd-server), a virtualenv at .venv, the packages.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.mbc-installed

if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  echo "setup: installing etcd-server (Debian package)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
  # The package starts a system etcd on the default ports; the mesh starts its own.
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

want=$(cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "setup: installing packages into $VENV (the first time downloads torch: several GB)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Every package of the extras dev, onnx and otel, pinned and with its hashes (requirements.lock,
  # made by the `uv pip compile` command in its header; it includes setuptools, so the project
  # itself then installs without downloading anything: no deps, no isolated build).
  "$VENV/bin/python" -m pip install -q --require-hashes -r requirements.lock
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi
