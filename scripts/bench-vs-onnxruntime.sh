#!/usr/bin/env bash
# Forward-pass throughput of resnet-serve's fast (and candle) engines against the CPU peers on the
# same model with the same threads: ONNX Runtime (the shared ort_bench.py) and OpenVINO (f32
# precision hint) on the shared ONNX file, PyTorch eager and traced + frozen on the seed model with
# the seed weights (scripts/bench_peers.py). Every engine runs in its own process, once per round,
# in an order rotated each round (a shared machine drifts; no engine always goes first or last);
# then the median images/s with min and max over rounds, and per-round ratios fast / peer.
#
#   scripts/bench-vs-onnxruntime.sh            # 5 rounds, 2 threads, batch 1 and 64, 3 s each
#   ROUNDS=5 THREADS=2 BATCHES=1,64 BENCH_SECONDS=3 SKIP_CANDLE=1 BINARY=path scripts/bench-vs-onnxruntime.sh
#   PEERS=onnxruntime,openvino SETUP_ONLY=1 ...  # peers to run (default all four); only install
#   RESNET_SIMD=avx2 ...                         # any RESNET_* setting reaches `resnet-serve bench`
#
# Refuses to measure (exit 3) when the 1-minute load average is above LOAD_MAX (0.5) after waiting
# LOAD_WAIT (180) seconds for it to fall, unless FORCE=1 (figures then marked as not comparable);
# the load average at start and end is printed with the results. Installs on first use, into
# pinned environments under target/bench-venvs/ (scripts/bench-lib.sh). Needs the shared data
# directory (RESNET_SHARED_DIR, default ../shared). Output: a table on stdout, then JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

shared=$(cd "${RESNET_SHARED_DIR:-../shared}" && pwd)
rounds=${ROUNDS:-5}
threads=${THREADS:-2}
batches=${BATCHES:-1,64}
seconds=${BENCH_SECONDS:-3}
peers=${PEERS:-onnxruntime,openvino,torch-eager,torch-traced-frozen}
read -ra batch_list <<<"${batches//,/ }"
weights="$shared/models/resnet56-seed-random.safetensors"
ort="$shared/bench/ort_bench.py"
for f in "$weights" "$ort" "$shared/bench/resnet56-seed-random.onnx" "$shared/tools/seed_resnet56.py"; do
    [[ -f $f ]] || { echo "missing $f (set RESNET_SHARED_DIR)" >&2; exit 1; }
done

engines=(fast)
[[ ${SKIP_CANDLE:-0} == 1 ]] || engines+=(candle)
for peer in ${peers//,/ }; do
    case $peer in
        onnxruntime | openvino) need_venv ov ;;
        torch-eager | torch-traced-frozen) need_venv torch ;;
        *) echo "unknown peer $peer (onnxruntime, openvino, torch-eager, torch-traced-frozen)" >&2; exit 2 ;;
    esac
    engines+=("$peer")
done
[[ ${SETUP_ONLY:-0} == 1 ]] && { log "environments ready under $bench_venvs"; exit 0; }

# BINARY: an already built resnet-serve to measure instead of building this checkout.
if [[ -z ${BINARY:-} ]]; then cargo build --release --quiet; fi
bin=${BINARY:-target/release/resnet-serve}

idle_gate
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# run_engine KIND ROUND: one process of that engine, its JSON lines tagged with kind and round.
run_engine() {
    local cmd
    case $1 in
        fast | candle) cmd=("$bin" bench --weights "$weights" --device cpu --engine "$1" --threads "$threads"
            --batch-sizes "$batches" --seconds "$seconds") ;;
        onnxruntime) cmd=("$bench_venvs/ov/bin/python" "$ort" --threads "$threads" --seconds "$seconds" "${batch_list[@]}") ;;
        openvino) cmd=("$bench_venvs/ov/bin/python" scripts/bench_peers.py --engine openvino --shared "$shared"
            --threads "$threads" --seconds "$seconds" "${batch_list[@]}") ;;
        torch-*) cmd=("$bench_venvs/torch/bin/python" scripts/bench_peers.py --engine "$1" --shared "$shared"
            --threads "$threads" --seconds "$seconds" "${batch_list[@]}") ;;
    esac
    "${cmd[@]}" | sed "s/^{/{\"kind\":\"$1\",\"round\":$2,/" | tee -a "$log" >&2
}

n=${#engines[@]}
for round in $(seq 1 "$rounds"); do
    log "round $round/$rounds"
    for i in $(seq 0 $((n - 1))); do
        run_engine "${engines[$(((i + round - 1) % n))]}" "$round"
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$log" "$threads" "$rounds" "$load_start" "$load_end" "$load_forced" <<'PY'
import json, statistics, sys
from collections import defaultdict
path, threads, rounds, load_start, load_end, forced = sys.argv[1:]
lines = [json.loads(l) for l in open(path) if l.startswith("{")]
ips = defaultdict(list)            # (kind, batch) -> [images/s per round]
by_round = defaultdict(dict)       # (round, batch) -> {kind: images/s}
names, checks = {}, {}
for l in lines:
    if "check" in l:
        checks[l["kind"]] = l["check"]["max_abs_diff"]
    if "batch_size" not in l:
        continue
    names[l["kind"]] = l["engine"] + (f" {l['version']}" if "version" in l else "")
    ips[(l["kind"], l["batch_size"])].append(l["images_per_second"])
    by_round[(l["round"], l["batch_size"])][l["kind"]] = l["images_per_second"]
kinds = [k for k in ("fast", "candle", "onnxruntime", "openvino", "torch-eager", "torch-traced-frozen") if k in names]
batches = sorted({b for _, b in ips})
forced = forced == "1"
print(f"threads={threads}  rounds={rounds}  load average start {load_start} (1 min), end {load_end} (1, 5, 15 min)"
      + ("  FORCED ON A BUSY MACHINE: not comparable" if forced else ""))
print("engines: " + ", ".join(f"{k}={names[k]}" for k in kinds))
if checks:
    print("logits vs shared references, max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
print(f"{'batch':>5} {'engine':>20} {'median img/s':>13} {'min':>9} {'max':>9} {'fast/engine':>12} {'ratio range':>14}")
out = [{"kind": "run", "threads": int(threads), "rounds": int(rounds), "load_start": float(load_start),
        "load_end": [float(x) for x in load_end.split()], "forced": forced, "engines": names}]
for b in batches:
    for k in kinds:
        v = ips.get((k, b))
        if not v:
            continue
        r = [d["fast"] / d[k] for (_, bb), d in sorted(by_round.items()) if bb == b and k in d and "fast" in d]
        ratio = f"{statistics.median(r):>11.2f}x {min(r):>6.2f}-{max(r):.2f}" if r and k != "fast" else ""
        print(f"{b:>5} {k:>20} {statistics.median(v):>13.1f} {min(v):>9.1f} {max(v):>9.1f} {ratio}")
        row = {"kind": "engine", "engine": k, "batch_size": b, "median_images_per_second": statistics.median(v),
               "min": min(v), "max": max(v), "rounds": len(v)}
        if r and k != "fast":
            row.update(fast_ratio_median=statistics.median(r), fast_ratio_min=min(r), fast_ratio_max=max(r))
        out.append(row)
for row in out:
    print(json.dumps(row))
PY
