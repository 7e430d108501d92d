#!/usr/bin/env bash
# Bounded loopback load test: starts the release server with the given weights, runs 1, 16 and
# 64 concurrent clients posting a PNG to /classify for a few seconds each, prints requests/s and
# p50/p99 latency per level, and stops the server.
#
#   scripts/load-test.sh [WEIGHTS]           (default weights/resnet56.safetensors)
#
# Environment: SECONDS_PER_LEVEL (5), LEVELS ("1 16 64"), PORT (18080), IMAGE (a PNG to post;
# default a generated 32x32 PNG), and any RESNET_* server setting (e.g. RESNET_MAX_BATCH_SIZE).
set -euo pipefail

cd "$(dirname "$0")/.."
weights=${1:-weights/resnet56.safetensors}
seconds=${SECONDS_PER_LEVEL:-5}
levels=${LEVELS:-"1 16 64"}
port=${PORT:-18080}

# BINARY: an already built resnet-serve to load instead of building this checkout.
if [[ -z ${BINARY:-} ]]; then cargo build --release --quiet --bin resnet-serve; fi
server_bin=${BINARY:-target/release/resnet-serve}
cargo build --quiet --example load_test
client=target/debug/examples/load_test
image_args=()
if [[ -n "${IMAGE:-}" ]]; then image_args=(--image "$IMAGE"); fi

log=$(mktemp)
"$server_bin" serve --weights "$weights" --host 127.0.0.1 --port "$port" --grpc-port 0 \
    >"$log" 2>&1 &
server=$!
stop() {
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" || echo "server exited with status $?" >&2
    rm -f "$log"
}
trap stop EXIT

if ! "$client" --url "http://127.0.0.1:$port" --wait-ready 60; then
    cat "$log" >&2
    exit 1
fi
echo "resnet-serve $(target/release/resnet-serve --version | cut -d' ' -f2), weights $weights, $(nproc) CPUs"
curl -fsS "http://127.0.0.1:$port/v1/model" 2>/dev/null | head -c 300 && echo || true
for c in $levels; do
    "$client" --url "http://127.0.0.1:$port" --concurrency "$c" --seconds "$seconds" "${image_args[@]}"
done
