#!/usr/bin/env bash
# HTTP end to end against the serving peers, one run: resnet-serve, then TorchServe, then Triton,
# one after another on the same ports (18080 and up, loopback), each driven by the same load tool
# (wrk, one thread, --latency) at 1, 16 and 64 connections posting the same 32x32 PNG; then
# requests/s, p50 and p99 per server and level, and resnet-serve / peer ratios, as a table and as
# JSON lines. Right before and right after each level, resnet-serve's own forward pass is timed at
# the matching batch size (`resnet-serve bench`, same weights and threads, BENCH_SECONDS (5) each),
# so that the run also shows how much of the forward pass's speed reaches the client: one client's
# p50 over the batch-1 pass time and its p99 over its p50, and 16 and 64 clients' requests/s over
# the images/s at batch 16 and 64, each against the service's targets (printed "met" or "NOT
# met"), taking the faster of the two timings.
#
#   scripts/bench-http.sh                         # 10 s per level, every server
#   SECONDS_PER_LEVEL=2 SERVERS=resnet-serve,triton BINARY=path scripts/bench-http.sh
#   SETUP_ONLY=1 scripts/bench-http.sh            # install what the peers need, measure nothing
#
# - resnet-serve: `serve` with the seed-random model (--weights), THREADS (2) model threads, its
#   default batching; any RESNET_* setting in the environment reaches it. Driven at /classify
#   with the raw PNG, the same request wrk sends TorchServe.
# - TorchServe 0.12 and Triton 2.51 (python backend: Pillow decode, ONNX Runtime forward, dynamic
#   batching; KServe v2 binary-tensor request) are the shared harnesses in
#   $RESNET_SHARED_DIR/anchors, run as they are (their README says what each configures and what
#   makes the comparison unfair). Their pinned environments are made on first use under
#   target/bench-venvs/ (scripts/bench-lib.sh); wrk and Java 17 come from Debian packages.
#
# Refuses to measure (exit 3) when the 1-minute load average is above LOAD_MAX (0.5) after waiting
# LOAD_WAIT (180) seconds for it to fall, unless FORCE=1 (figures then marked as not comparable);
# the load average at start and end is printed with the results. Loopback only; every server is
# stopped before the next starts and on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

shared=$(cd "${RESNET_SHARED_DIR:-../shared}" && pwd)
seconds=${SECONDS_PER_LEVEL:-10}
servers=${SERVERS:-resnet-serve,torchserve,triton}
threads=${THREADS:-2}
# The TorchServe harness listens on 18080-18082 and drives 1, 16 and 64 connections; the others
# follow it so that every server answers on the same port under the same load.
port=18080
levels="1 16 64"
weights=$shared/models/resnet56-seed-random.safetensors
image=$shared/data/images/0000-cat.png
anchors=$shared/anchors
for f in "$weights" "$image" "$anchors/torchserve/run.sh" "$anchors/triton/run.sh" "$anchors/triton/setup.sh"; do
    [[ -f $f ]] || { echo "missing $f (set RESNET_SHARED_DIR)" >&2; exit 1; }
done
for s in ${servers//,/ }; do
    case $s in resnet-serve | torchserve | triton) ;; *) echo "unknown server $s (resnet-serve, torchserve, triton)" >&2; exit 2 ;; esac
done
has() { [[ ,$servers, == *,$1,* ]]; }

need_apt wrk wrk
if has torchserve; then
    need_java17
    need_venv torch
fi
if has triton; then
    need_venv triton env TRITON_VENV="$bench_venvs/triton" PYTHON="$bench_python" \
        WHEEL_DIR="$bench_venvs/triton/no-local-wheel" bash "$anchors/triton/setup.sh"
fi
[[ ${SETUP_ONLY:-0} == 1 ]] && { log "environments ready under $bench_venvs"; exit 0; }

# BINARY: an already built resnet-serve to measure instead of building this checkout.
if has resnet-serve && [[ -z ${BINARY:-} ]]; then cargo build --release --quiet --bin resnet-serve; fi
bin=${BINARY:-target/release/resnet-serve}


# The harnesses find the data at ../../shared from their own folder: run them from a tree of
# links that puts it there, wherever RESNET_SHARED_DIR is. TorchServe's work folder and pid file
# go under it too (TMPDIR), so nothing is left behind.
work=$(mktemp -d /tmp/bench-http.XXXXXX)
mkdir -p "$work/tree" "$work/tmp"
cp -rs "$anchors" "$work/tree/anchors"
ln -s "$shared" "$work/tree/shared"
results=$work/results.jsonl
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if has torchserve && curl -s -o /dev/null "http://127.0.0.1:$port/ping"; then
        TMPDIR=$work/tmp "$bench_venvs/torch/bin/torchserve" --stop >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() {
    if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/"; then
        echo "something already listens on 127.0.0.1:$port: stop it first" >&2
        exit 1
    fi
}

# record SERVER CONNECTIONS WRK-OUTPUT-FILE: one JSON line from wrk's --latency report.
record() {
    local rps p50 p99 non2xx errors
    read -r rps p50 p99 non2xx < <(wrk_summary "$3")
    errors=$(sed -n 's/^ *Socket errors: *//p' "$3")
    printf '{"kind":"http","server":"%s","connections":%d,"requests_per_second":%s,"p50_ms":%s,"p99_ms":%s,"non_2xx":%d,"socket_errors":"%s"}\n' \
        "$1" "$2" "$rps" "$p50" "$p99" "$non2xx" "$errors" >>"$results"
}

# time_forward BATCH WHEN: `resnet-serve bench` at BATCH, recorded as a forward line.
time_forward() {
    "$bin" bench --weights "$weights" --threads "$threads" --batch-sizes "$1" \
        --seconds "${BENCH_SECONDS:-5}" 2>/dev/null | bench_rates |
        while read -r batch ips; do
            printf '{"kind":"forward","batch_size":%d,"when":"%s","images_per_second":%s}\n' "$batch" "$2" "$ips"
        done >>"$results"
    tail -1 "$results" >&2
}

idle_gate
versions=()

if has resnet-serve; then
    log "== resnet-serve"
    port_free
    grpc=()
    if "$bin" serve --help | grep -q -- --grpc-port; then grpc=(--grpc-port $((port + 1))); fi
    "$bin" serve --weights "$weights" --threads "$threads" --host 127.0.0.1 --port "$port" "${grpc[@]}" \
        >"$work/resnet-serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/resnet-serve.log" >&2; exit 1; }
        sleep 0.5
    done
    # One request in the form wrk sends, checked before any load.
    curl -sf -X POST -H "Content-Type: image/png" --data-binary @"$image" "http://127.0.0.1:$port/classify" >"$work/check.json" ||
        { echo "resnet-serve did not answer /classify:" >&2; cat "$work/resnet-serve.log" >&2; exit 1; }
    log "check: $(head -c 200 "$work/check.json")"
    versions+=("resnet-serve $("$bin" --version | cut -d' ' -f2)")
    for c in $levels; do
        # The forward pass alone at this level's batch size, while the server idles, just before
        # and just after the level: the machine's speed drifts between minutes, and a slow spell
        # in one timing would flatter the service, so its targets take the faster of the two.
        time_forward "$c" before
        IMG=$image wrk -t1 -c"$c" -d"${seconds}s" --latency -s "$anchors/torchserve/post.lua" \
            "http://127.0.0.1:$port/classify" >"$work/wrk.txt" 2>&1 || true
        record resnet-serve "$c" "$work/wrk.txt"
        tail -1 "$results" >&2
        time_forward "$c" after
    done
    kill -TERM "$server_pid"
    wait "$server_pid" || { echo "resnet-serve exited with status $?" >&2; }
    server_pid=
fi

if has torchserve; then
    log "== torchserve (shared harness anchors/torchserve/run.sh)"
    port_free
    TMPDIR=$work/tmp TORCH_VENV=$bench_venvs/torch SECONDS_PER_LEVEL=$seconds \
        bash "$work/tree/anchors/torchserve/run.sh" >"$work/torchserve.txt" 2>&1 ||
        { cat "$work/torchserve.txt" >&2; exit 1; }
    # The harness prints "== torchserve c=N" and wrk's Requests/sec, 50%, 99% (and Non-2xx) lines.
    awk -v dir="$work" '/^== torchserve c=/ { sub(/.*c=/, ""); f = dir "/ts-c" $0 ".txt"; printf "" > f; next }
        f != "" { print >> f }' "$work/torchserve.txt"
    for c in $levels; do
        [[ -f $work/ts-c$c.txt ]] || { echo "no TorchServe figures for c=$c:" >&2; cat "$work/torchserve.txt" >&2; exit 1; }
        record torchserve "$c" "$work/ts-c$c.txt"
        tail -1 "$results" >&2
    done
    versions+=("torchserve $("$bench_venvs/torch/bin/python" -c 'import importlib.metadata as m; print(m.version("torchserve"), "torch", m.version("torch"))')")
fi

if has triton; then
    log "== triton (shared harness anchors/triton/run.sh)"
    port_free
    TRITON_VENV=$bench_venvs/triton PORT=$port DURATION=$seconds LEVELS=$levels IMG=$image \
        bash "$work/tree/anchors/triton/run.sh" bench >"$work/triton.txt" 2>&1 ||
        { cat "$work/triton.txt" >&2; exit 1; }
    # The harness prints one line per level:
    # "triton python-backend c=N Requests/sec R  p50 X  p99 Y  non-2xx K  socket errors: E".
    for c in $levels; do
        line=$(grep -E "^triton python-backend c=$c +Requests" "$work/triton.txt") ||
            { echo "no Triton figures for c=$c:" >&2; cat "$work/triton.txt" >&2; exit 1; }
        sed -E 's/.*Requests\/sec ([^ ]*)  p50 ([^ ]*)  p99 ([^ ]*)  non-2xx ([0-9]*)  socket errors: (.*)/Requests\/sec: \1\n    50% \2\n    99% \3\nNon-2xx or 3xx responses: \4\nSocket errors: \5/' \
            <<<"$line" | sed '/Socket errors: none$/d' >"$work/tr-c$c.txt"
        record triton "$c" "$work/tr-c$c.txt"
        tail -1 "$results" >&2
    done
    versions+=("$(grep -m1 -oE '^triton [0-9.]+' "$work/triton.txt" || echo triton) (nvidia-pytriton $("$bench_venvs/triton/bin/python" -c 'import importlib.metadata as m; print(m.version("nvidia-pytriton"), "onnxruntime", m.version("onnxruntime"))'))")
fi

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$results" "$seconds" "$load_start" "$load_end" "$load_forced" "$(nproc)" "${versions[@]}" <<'PY'
import json, sys
path, seconds, load_start, load_end, forced, cpus, *versions = sys.argv[1:]
lines = [json.loads(l) for l in open(path)]
rows = [l for l in lines if l["kind"] == "http"]
# The faster of the timings around each level: the stricter bound for every target.
forward = {}
for l in lines:
    if l["kind"] == "forward":
        forward[l["batch_size"]] = max(forward.get(l["batch_size"], 0), l["images_per_second"])
forced = forced == "1"
print(f"wrk -t1 --latency, {seconds} s per level, {cpus} CPUs, load average start {load_start} (1 min), "
      f"end {load_end} (1, 5, 15 min)" + ("  FORCED ON A BUSY MACHINE: not comparable" if forced else ""))
print("servers: " + "; ".join(versions))
print(f"{'server':>12} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}  socket errors")
for r in rows:
    print(f"{r['server']:>12} {r['connections']:>5} {r['requests_per_second']:>9.1f} {r['p50_ms']:>8.2f} "
          f"{r['p99_ms']:>8.2f} {r['non_2xx']:>8}  {r['socket_errors'] or 'none'}")
by = {(r["server"], r["connections"]): r for r in rows}
ratios = []
for peer in ("torchserve", "triton"):
    for c in sorted({r["connections"] for r in rows}):
        ours, theirs = by.get(("resnet-serve", c)), by.get((peer, c))
        if not ours or not theirs or min(theirs["requests_per_second"], theirs["p50_ms"], theirs["p99_ms"]) <= 0:
            continue
        ratios.append({"kind": "ratio", "vs": peer, "connections": c,
                       "requests_per_second_ratio": ours["requests_per_second"] / theirs["requests_per_second"],
                       "p50_ratio": ours["p50_ms"] / theirs["p50_ms"], "p99_ratio": ours["p99_ms"] / theirs["p99_ms"]})
if ratios:
    print("resnet-serve / peer (req/s: higher is better; latency: lower is better)")
    print(f"{'vs':>12} {'conns':>5} {'req/s':>8} {'p50':>8} {'p99':>8}")
    for r in ratios:
        print(f"{r['vs']:>12} {r['connections']:>5} {r['requests_per_second_ratio']:>7.2f}x "
              f"{r['p50_ratio']:>7.2f}x {r['p99_ratio']:>7.2f}x")
# The service's targets: what reaches a client of the forward pass's speed, and the lead on the
# peers at 64 connections.
targets = []
def target(name, value, bound, met, unit):
    if not targets:
        print("targets (against the faster of the forward-pass timings just before and just after each level):")
    targets.append({"kind": "target", "target": name, "value": value, "bound": bound, "met": met})
    print(f"  {name:<44} {value:>8.2f}{unit}  (target {bound}{unit})  {'met' if met else 'NOT met'}")
ours = {c: by[("resnet-serve", c)] for (s, c) in by if s == "resnet-serve"}
if forward:
    timed = [l for l in lines if l["kind"] == "forward"]
    print("resnet-serve bench, images/s: " + ", ".join(
        f"batch {b} " + " / ".join(f"{l['images_per_second']:.1f} {l['when']}" for l in timed if l["batch_size"] == b)
        for b in sorted(forward)))
if 1 in ours and 1 in forward:
    one = ours[1]
    over_pass = one["p50_ms"] - 1000 / forward[1]
    target("1 client: p50 - batch-1 pass time", over_pass, "<= +0.30", over_pass <= 0.3, " ms")
    if one["p50_ms"] > 0:
        target("1 client: p99 / p50", one["p99_ms"] / one["p50_ms"], "<= 2.00",
               one["p99_ms"] <= 2 * one["p50_ms"], "x")
for c, bound in ((16, 0.8), (64, 0.9)):
    if c in ours and c in forward and forward[c] > 0:
        ratio = ours[c]["requests_per_second"] / forward[c]
        target(f"{c} clients: req/s / images/s at batch {c}", ratio, f">= {bound:.2f}", ratio >= bound, "x")
for peer, bound in (("torchserve", 5.0), ("triton", 3.0)):
    mine, theirs = ours.get(64), by.get((peer, 64))
    if mine and theirs and theirs["requests_per_second"] > 0:
        ratio = mine["requests_per_second"] / theirs["requests_per_second"]
        target(f"64 clients: req/s / {peer}'s", ratio, f">= {bound:.2f}", ratio >= bound, "x")
        target(f"64 clients: p99 / {peer}'s", mine["p99_ms"] / theirs["p99_ms"], "< 1.00",
               mine["p99_ms"] < theirs["p99_ms"], "x")
errors = [r for r in rows if r["non_2xx"] or r["socket_errors"] or r["requests_per_second"] <= 0]
if errors:
    print("WARNING: failed requests or no figures for: "
          + ", ".join(f"{r['server']} c={r['connections']}" for r in errors))
print(json.dumps({"kind": "run", "seconds_per_level": float(seconds), "cpus": int(cpus), "load_start": float(load_start),
                  "load_end": [float(x) for x in load_end.split()], "forced": forced, "servers": versions}))
for r in lines + ratios + targets:
    print(json.dumps(r))
PY
