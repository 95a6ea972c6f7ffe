#!/usr/bin/env bash
# Offline checks of the Kubernetes deployment (`make lint` runs them, so CI does): no cluster, no
# registry, no image build.
#   1. every manifest of deploy/kubernetes/, file by file, and the kustomize build of the whole
#      (kubectl kustomize, or kustomize, when one is installed) against the Kubernetes schemas
#      bundled in kubernetes-validate (strict: an unknown field fails; so does a kind without a
#      schema), for the oldest and the newest Kubernetes the manifests claim;
#   2. what schemas cannot see, in the built manifests (deploy/check_manifests.py): selectors,
#      references, MBC_* settings read by mbc's own settings code, ports, etcd members, bot
#      definitions;
#   3. the Dockerfile, with hadolint.
# The tools come from requirements-tools.lock (pinned, with hashes), installed into the venv
# beside requirements.lock when missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
DEPLOY=deploy/kubernetes
STAMP=$VENV/.mbc-tools-installed

want=$(sha256sum requirements-tools.lock | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "check_kubernetes: installing kubernetes-validate and hadolint into $VENV (requirements-tools.lock)"
  "$VENV/bin/python" -m pip install -q --require-hashes -r requirements-tools.lock
  echo "$want" > "$STAMP"
fi

versions=()
for v in "${KUBERNETES_VERSIONS[@]}"; do versions+=(-k "$v"); done

# kubernetes-validate only warns about a kind it has no schema for (a typo in `kind`, say): here
# that fails too. Its exit status covers the rest.
validate() {
  local out status=0
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet "${versions[@]}" "$@") || status=$?
  [ -z "$out" ] || echo "$out"
  if [ "$status" -ne 0 ] || grep -q '^WARN' <<<"$out"; then
    return 1
  fi
}

manifests=()
while IFS= read -r f; do manifests+=("$f"); done < <(
  find "$DEPLOY" -name '*.yaml' ! -name kustomization.yaml ! -path "$DEPLOY/bots/*" | sort
)
# A file kustomization.yaml does not list would be validated here and never deployed.
for f in "${manifests[@]}" "$DEPLOY"/bots/*.yaml; do
  if ! grep -qE "^ *- ${f#"$DEPLOY"/}\$" "$DEPLOY/kustomization.yaml"; then
    echo "ERROR $f is not listed in $DEPLOY/kustomization.yaml"
    exit 1
  fi
done
validate "${manifests[@]}"
echo "check_kubernetes: ${#manifests[@]} manifests valid against Kubernetes ${KUBERNETES_VERSIONS[*]}"

if command -v kubectl >/dev/null 2>&1; then
  build=(kubectl kustomize "$DEPLOY")
elif command -v kustomize >/dev/null 2>&1; then
  build=(kustomize build "$DEPLOY")
else
  build=()
  echo "check_kubernetes: neither kubectl nor kustomize installed: the kustomize build is not checked"
fi
if [ ${#build[@]} -gt 0 ]; then
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  rendered=$workdir/kustomize-build.yaml
  "${build[@]}" >"$rendered"
  validate "$rendered"
  PYTHONPATH=. "$VENV/bin/python" deploy/check_manifests.py <"$rendered"
  echo "check_kubernetes: '${build[*]}' valid"
fi

"$VENV/bin/hadolint" --no-color Dockerfile
echo "check_kubernetes: Dockerfile passes hadolint"
