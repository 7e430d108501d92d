#!/usr/bin/env bash
# Contract test: runs schemathesis (property-based requests generated from openapi.yaml) against
# the real binary with the seed-random weights and an API key, and exits with its status.
# Every check runs but positive_data_acceptance, which expects any schema-valid request to
# succeed: a schema cannot say which bytes are a decodable image, nor that `top_k` stops at the
# served model's number of classes, so the documented 400/415/422 answers would count as failures.
#
#   scripts/schemathesis.sh [extra schemathesis arguments, run from target/]
#
# Environment: RESNET_SHARED_DIR (default ../shared), SCHEMATHESIS_MAX_EXAMPLES (default 50),
# SCHEMATHESIS_MAX_TIME (seconds for the whole run, default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${RESNET_SHARED_DIR:-../shared}"
weights="$shared/models/resnet56-seed-random.safetensors"
[[ -f "$weights" ]] || { echo "schemathesis.sh: $weights not found (set RESNET_SHARED_DIR)" >&2; exit 2; }

# Pinned: new releases add checks, and CI should change only with this file.
version=4.32.5
venv=target/schemathesis-venv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "version $version"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

binary=target/release/resnet-serve
if [[ ! -x "$binary" ]]; then
    cargo build --locked --quiet
    binary=target/debug/resnet-serve
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
key="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
log=target/schemathesis-server.log

RESNET_API_KEY="$key" "$binary" serve --host 127.0.0.1 --port "$port" --grpc-port 0 \
    --weights "$weights" --device cpu --max-batch-size 8 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$base/health/ready" >/dev/null 2>&1
}
for _ in $(seq 600); do
    if ready; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "schemathesis.sh: the server exited; its log:" >&2
        cat "$log" >&2
        exit 2
    fi
    sleep 0.1
done
ready || { echo "schemathesis.sh: the server never became ready; its log:" >&2; cat "$log" >&2; exit 2; }

status=0
# From target/, where schemathesis keeps its cache (.schemathesis/).
cd target
timeout "${SCHEMATHESIS_MAX_TIME:-90}" "../$venv/bin/schemathesis" run "$base/openapi.yaml" \
    --url "$base" \
    --header "Authorization: Bearer $key" \
    --checks all \
    --exclude-checks positive_data_acceptance \
    --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-50}" \
    --seed 1 \
    --no-color \
    "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "schemathesis.sh: the run exceeded ${SCHEMATHESIS_MAX_TIME:-90} s" >&2
fi
exit "$status"
