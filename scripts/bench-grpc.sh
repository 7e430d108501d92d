#!/usr/bin/env bash
# gRPC next to REST on one server, with one load tool (examples/grpc_vs_rest.rs, its clients on
# one thread): at 1, 16 and 64 concurrent clients, the shared cat PNG as `POST /classify` and as a
# gRPC ModelInfer BYTES input; requests/s, p50, p99 and the gRPC / REST ratio.
#
#   scripts/bench-grpc.sh                      # 3 rounds of 5 s per protocol and level
#   SECONDS_PER_RUN=3 ROUNDS=1 BINARY=path scripts/bench-grpc.sh
#
# The server runs the seed-random weights with THREADS (2) model threads and its default
# batching. Refuses to measure (exit 3) when the 1-minute load average is above LOAD_MAX (0.5)
# after waiting LOAD_WAIT seconds, unless FORCE=1 (scripts/bench-lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

shared=$(cd "${RESNET_SHARED_DIR:-../shared}" && pwd)
weights=$shared/models/resnet56-seed-random.safetensors
image=$shared/data/images/0000-cat.png
for f in "$weights" "$image"; do [[ -f $f ]] || { log "missing $f (set RESNET_SHARED_DIR)"; exit 1; }; done
port=${PORT:-18180}
cargo build --release --quiet --bin resnet-serve --example grpc_vs_rest
bin=${BINARY:-target/release/resnet-serve}

idle_gate
log "$(nproc) CPUs; $("$bin" --version)"
"$bin" serve --weights "$weights" --threads "${THREADS:-2}" --host 127.0.0.1 --port "$port" \
    --grpc-port $((port + 1)) >target/bench-grpc-server.log 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat target/bench-grpc-server.log >&2; exit 1; }
    sleep 0.5
done
target/release/examples/grpc_vs_rest --rest "http://127.0.0.1:$port" \
    --grpc "http://127.0.0.1:$((port + 1))" --image "$image" --seconds "${SECONDS_PER_RUN:-5}" --rounds "${ROUNDS:-3}"
log "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
