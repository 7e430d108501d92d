#!/usr/bin/env bash
# Two builds of resnet-serve side by side, for a change that must not (or must) move the figures:
# their logits against PyTorch on the 846 shared test images (`eval`), the forward pass at batch 1
# and 64 (`bench`), and /classify end to end under wrk (1, 16 and 64 connections, the shared cat
# PNG). Every round runs both builds, alternating which goes first; prints every run, the medians,
# and B's median over A's. For each HTTP level it also reads, per request, the server's context
# switches (all its threads, voluntary and not: thread hand-offs and preemptions) and its CPU time
# (user + system, ms), from /proc: counts that drift much less with the machine's speed than
# requests per second do.
#
#   git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release)
#   scripts/bench-ab.sh /tmp/before/target/release/resnet-serve target/release/resnet-serve
#   ROUNDS=5 SECONDS_PER_RUN=5 THREADS=2 scripts/bench-ab.sh A B
#
# Refuses to measure (exit 3) when the 1-minute load average is above LOAD_MAX (0.5) after
# waiting LOAD_WAIT seconds, unless FORCE=1 (scripts/bench-lib.sh). Needs wrk (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

if (($# != 2)); then
    echo "usage: $0 BINARY_A BINARY_B" >&2
    exit 2
fi
bins=("$(realpath "$1")" "$(realpath "$2")")
names=(A B)
shared=$(cd "${RESNET_SHARED_DIR:-../shared}" && pwd)
weights=$shared/models/resnet56-seed-random.safetensors
image=$shared/data/images/0000-cat.png
port=${PORT:-18380}
rounds=${ROUNDS:-3}
seconds=${SECONDS_PER_RUN:-5}
threads=${THREADS:-0}
need_apt wrk wrk
work=$(mktemp -d)
server=
cleanup() {
    if [[ -n $server ]]; then kill -TERM "$server" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Logits first (not timed): both builds must agree with PyTorch before their speed means anything.
for i in 0 1; do
    "${bins[$i]}" eval --weights "$weights" --threads "$threads" --json \
        --data "$shared/data/cifar10-test-846.safetensors" \
        --reference "$shared/reference/logits.safetensors" --reference-key seed_random_logits \
        >"$work/eval-$i.json"
    log "${names[$i]} eval: $(cat "$work/eval-$i.json")"
done

# forward NAME I: `bench` of build I at batch 1 and 64; appends "NAME bench-bBATCH images/s".
forward() {
    "${bins[$2]}" bench --weights "$weights" --threads "$threads" --batch-sizes 1,64 \
        --seconds "$seconds" | bench_rates |
        while read -r batch ips; do echo "$1 bench-b$batch $ips"; done | tee -a "$work/runs"
}

# proc_counters PID: "CONTEXT_SWITCHES CPU_TICKS" of a process, all its threads together.
proc_counters() {
    local switches
    switches=$(cat /proc/"$1"/task/*/status 2>/dev/null | awk '/voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }')
    echo "$switches $(awk '{ print $14 + $15 }' /proc/"$1"/stat)"
}

# http NAME I: /classify on a fresh server of build I, wrk at each connection count; appends
# "NAME http-cN req/s", "NAME http-cN-p50ms / -p99ms" and "NAME http-cN-ctxsw / -cpums" (per
# request) lines.
http() {
    "${bins[$2]}" serve --weights "$weights" --threads "$threads" --host 127.0.0.1 --port "$port" \
        --grpc-port 0 >"$work/server-$1.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
        sleep 0.25
    done
    local ticks_per_s
    ticks_per_s=$(getconf CLK_TCK)
    for c in 1 16 64; do
        local before after requests
        before=$(proc_counters "$server")
        IMG=$image wrk -t1 -c"$c" -d"${seconds}s" --latency -s "$shared/anchors/torchserve/post.lua" \
            "http://127.0.0.1:$port/classify" >"$work/wrk.txt" 2>&1 || true
        after=$(proc_counters "$server")
        local rps p50 p99 non2xx
        read -r rps p50 p99 non2xx < <(wrk_summary "$work/wrk.txt")
        ((non2xx == 0)) || log "WARNING: $non2xx non-2xx answers"
        requests=$(awk '/requests in/ { print $1 }' "$work/wrk.txt")
        printf '%s http-c%s %s\n%s http-c%s-p50ms %s\n%s http-c%s-p99ms %s\n' \
            "$1" "$c" "$rps" "$1" "$c" "$p50" "$1" "$c" "$p99" | tee -a "$work/runs"
        echo "$before $after" | awk -v n="${requests:-0}" -v hz="$ticks_per_s" -v name="$1" -v c="$c" '
            n > 0 { printf "%s http-c%s-ctxsw %.2f\n%s http-c%s-cpums %.3f\n", name, c, ($3 - $1) / n, name, c, 1000 * ($4 - $2) / hz / n }' |
            tee -a "$work/runs"
    done
    kill -TERM "$server"
    wait "$server" || true
    server=
}

idle_gate
log "$(nproc) CPUs; A: ${bins[0]}; B: ${bins[1]}; $rounds rounds of ${seconds} s per figure"
for round in $(seq "$rounds"); do
    order=(0 1)
    ((round % 2 == 0)) && order=(1 0)
    for i in "${order[@]}"; do
        forward "${names[$i]}" "$i"
        http "${names[$i]}" "$i"
    done
done
awk '
    { v[$1, $2] = v[$1, $2] " " $3; figs[$2] = 1 }
    function median(s,    n, a, i, j, t) {
        n = split(substr(s, 2), a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return a[int((n + 1) / 2)]
    }
    END {
        printf "%-16s %10s %10s %8s\n", "median", "A", "B", "B/A"
        n = split("bench-b1 bench-b64 http-c1 http-c1-p50ms http-c1-p99ms http-c1-ctxsw http-c1-cpums http-c16 http-c16-p50ms http-c16-p99ms http-c16-ctxsw http-c16-cpums http-c64 http-c64-p50ms http-c64-p99ms http-c64-ctxsw http-c64-cpums", order, " ")
        for (k = 1; k <= n; k++) {
            f = order[k]
            if (!(f in figs)) continue
            a = median(v["A", f]); b = median(v["B", f])
            printf "%-16s %10.2f %10.2f %8.3f\n", f, a, b, (a > 0 ? b / a : 0)
        }
    }' "$work/runs"
log "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
