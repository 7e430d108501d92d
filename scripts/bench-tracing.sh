#!/usr/bin/env bash
# The cost of OpenTelemetry tracing: requests/s and latency at 64 connections (wrk -t1, the shared
# cat PNG to /classify) with tracing off; on at sampling 1.0 exporting every span over OTLP/HTTP
# to a live receiver (examples/otlp_sink.rs) on loopback; and on with the collector down (a port
# nobody listens on). Rounds rotate which goes first; prints every run, the medians, and each
# mode's median over tracing off.
#
#   scripts/bench-tracing.sh                     # 3 rounds of 10 s each
#   ROUNDS=1 SECONDS_PER_RUN=3 scripts/bench-tracing.sh
#
# Refuses to measure (exit 3) when the 1-minute load average is above LOAD_MAX (0.5) after
# waiting LOAD_WAIT seconds, unless FORCE=1 (scripts/bench-lib.sh). Needs wrk (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

shared=$(cd "${RESNET_SHARED_DIR:-../shared}" && pwd)
weights=$shared/models/resnet56-seed-random.safetensors
image=$shared/data/images/0000-cat.png
port=${PORT:-18280}
sink_port=$((port + 2))
dead_port=$((port + 3))
rounds=${ROUNDS:-3}
seconds=${SECONDS_PER_RUN:-10}
connections=${CONNECTIONS:-64}
need_apt wrk wrk
cargo build --release --quiet --bin resnet-serve --example otlp_sink
bin=${BINARY:-target/release/resnet-serve}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

target/release/examples/otlp_sink --listen "127.0.0.1:$sink_port" >"$work/sink.out" 2>&1 &
sink=$!
pids+=("$sink")

# run MODE: one wrk run against a fresh server with tracing MODE (off or on); appends
# "MODE req/s p50_ms p99_ms" to $work/runs.
run() {
    local mode=$1 otlp=()
    [[ $mode == on ]] && otlp=(--otlp-endpoint "http://127.0.0.1:$sink_port" --trace-sample-ratio 1)
    [[ $mode == dead ]] && otlp=(--otlp-endpoint "http://127.0.0.1:$dead_port" --trace-sample-ratio 1)
    "$bin" serve --weights "$weights" --host 127.0.0.1 --port "$port" --grpc-port 0 "${otlp[@]}" \
        >"$work/server-$mode.log" 2>&1 &
    local server=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
        sleep 0.25
    done
    IMG=$image wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$shared/anchors/torchserve/post.lua" \
        "http://127.0.0.1:$port/classify" >"$work/wrk.txt" 2>&1 || true
    kill -TERM "$server"
    wait "$server" || true
    echo "$mode $(wrk_summary "$work/wrk.txt")" | tee -a "$work/runs"
}

idle_gate
log "$(nproc) CPUs; $("$bin" --version); $connections connections, $rounds rounds of ${seconds} s"
echo "mode req/s p50_ms p99_ms non_2xx"
modes=(off on dead)
for round in $(seq "$rounds"); do
    for i in 0 1 2; do run "${modes[$(((round + i) % 3))]}"; done
done
kill -TERM "$sink"
wait "$sink" || true
pids=()
cat "$work/sink.out"
awk '
    { rps[$1] = rps[$1] " " $2 }
    END {
        for (m in rps) {
            n = split(substr(rps[m], 2), v, " ")
            # median of n values
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
            med[m] = v[int((n + 1) / 2)]
            printf "median req/s, %s: %s\n", m, med[m]
        }
        printf "tracing on / off: %.3f\n", med["on"] / med["off"]
        printf "collector down / off: %.3f\n", med["dead"] / med["off"]
    }' "$work/runs"
log "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
