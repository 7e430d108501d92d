#!/usr/bin/env bash
# Bounded loopback soak: starts the server, sends REQUESTS posts to /classify from CLIENTS
# concurrent clients (stopping at MAX_SECONDS whatever the count), and reports every status,
# requests lost (sent but never answered) and the server's RSS over time (first, last, peak).
# Fails on any 5xx, any lost request, or a server that does not exit 0 on SIGTERM.
#
#   scripts/soak.sh [WEIGHTS]           (default: the server's own choice, weights/resnet56.safetensors
#                                        when present, else the built-in pretrained ResNet56)
#
# Environment: REQUESTS (100000), CLIENTS (64), MAX_SECONDS (600), RSS_INTERVAL (5 s),
# PORT (18081), NICE (server niceness, 0), BINARY (default: the release build, built first),
# and any RESNET_* server setting.
set -euo pipefail

cd "$(dirname "$0")/.."
weights=${1:-}
requests=${REQUESTS:-100000}
clients=${CLIENTS:-64}
max_seconds=${MAX_SECONDS:-600}
port=${PORT:-18081}

if [[ -z "${BINARY:-}" ]]; then
    cargo build --release --quiet --bin resnet-serve
    BINARY=target/release/resnet-serve
fi
cargo build --quiet --example load_test
client=target/debug/examples/load_test

log=$(mktemp)
nice -n "${NICE:-0}" "$BINARY" serve ${weights:+--weights "$weights"} --host 127.0.0.1 \
    --port "$port" --grpc-port 0 >"$log" 2>&1 &
server=$!
stop() {
    status=0
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "server exited with status $status" >&2
        tail -20 "$log" >&2
    fi
    rm -f "$log"
    return $status
}
trap stop EXIT

if ! "$client" --url "http://127.0.0.1:$port" --wait-ready 60; then
    cat "$log" >&2
    exit 1
fi
echo "soak: $requests requests, $clients clients, at most $max_seconds s; $BINARY, weights ${weights:-"the default"}, $(nproc) CPUs"
"$client" --url "http://127.0.0.1:$port" --soak --concurrency "$clients" --requests "$requests" \
    --seconds "$max_seconds" --server-pid "$server" --rss-interval "${RSS_INTERVAL:-5}"
