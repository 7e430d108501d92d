#!/usr/bin/env bash
# The Open Inference Protocol against Triton's own clients, over REST (tritonclient[http]) and
# gRPC (tritonclient[grpc], grpcio-health-checking): starts the server on free loopback ports
# with the seed-random weights, waits until it is ready, runs tests/tritonclient with pytest
# (logits compared with the PyTorch references; the gRPC tests also start servers of their own
# with an API key, small limits, and one they stop), stops the server and exits with pytest's
# status.
#
#   scripts/test-tritonclient.sh [PYTEST ARGS...]
#
# Environment: RESNET_BIN (the server binary; default target/release/resnet-serve when built,
# else target/debug/resnet-serve, built with `cargo build`), RESNET_SHARED_DIR (default
# ../shared), TRITONCLIENT_VENV (default target/tritonclient-venv, created once and reused).
set -euo pipefail

cd "$(dirname "$0")/.."
shared=${RESNET_SHARED_DIR:-$(cd .. && pwd)/shared}
venv=${TRITONCLIENT_VENV:-target/tritonclient-venv}
weights="$shared/models/resnet56-seed-random.safetensors"
if [[ ! -f "$weights" ]]; then
    echo "test-tritonclient: $weights not found (set RESNET_SHARED_DIR)" >&2
    exit 1
fi

if [[ ! -x "$venv/bin/pytest" ]] || ! "$venv/bin/python" -c 'import tritonclient.grpc, grpc_health' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'tritonclient[http,grpc]' grpcio-health-checking numpy pytest safetensors
fi

bin=${RESNET_BIN:-}
if [[ -z "$bin" ]]; then
    if [[ -x target/release/resnet-serve ]]; then
        bin=target/release/resnet-serve
    else
        cargo build --quiet --bin resnet-serve
        bin=target/debug/resnet-serve
    fi
fi

free_port() {
    "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
grpc_port=$(free_port)
log=$(mktemp)
"$bin" serve --weights "$weights" --host 127.0.0.1 --port "$port" --grpc-port "$grpc_port" --max-batch-size 16 \
    >"$log" 2>&1 &
server=$!
stop() {
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$log"
}
trap stop EXIT

ready=0
for _ in $(seq 1 600); do
    if ! kill -0 "$server" 2>/dev/null; then break; fi
    if "$venv/bin/python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/v2/health/ready', timeout=1).status != 200)" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [[ $ready != 1 ]]; then
    echo "test-tritonclient: the server ($bin) did not become ready" >&2
    cat "$log" >&2
    exit 1
fi

status=0
RESNET_URL="127.0.0.1:$port" RESNET_GRPC_URL="127.0.0.1:$grpc_port" RESNET_SHARED_DIR="$shared" \
    RESNET_BIN="$bin" RESNET_WEIGHTS="$weights" \
    "$venv/bin/pytest" -q -p no:cacheprovider tests/tritonclient "$@" || status=$?
if [[ $status != 0 ]]; then
    echo "--- server log ---" >&2
    cat "$log" >&2
fi
exit "$status"
