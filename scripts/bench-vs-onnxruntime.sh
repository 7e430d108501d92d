#!/usr/bin/env bash
# Forward-pass throughput of resnet-serve's fast and candle CPU engines against ONNX Runtime on
# the same model, alternating the three several times in one run (a shared, noisy machine makes
# single measurements unreliable), then the median images/s of each and the per-round ratios.
#
#   scripts/bench-vs-onnxruntime.sh            # 3 rounds, 2 threads, batch 1 and 64, 3 s each
#   ROUNDS=5 THREADS=2 BATCHES=1,64 BENCH_SECONDS=3 SKIP_CANDLE=1 BINARY=path scripts/bench-vs-onnxruntime.sh
#
# Needs python3 with numpy and onnxruntime, and the shared data directory (RESNET_SHARED_DIR,
# default ../shared) with models/resnet56-seed-random.safetensors and bench/ort_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."

shared=${RESNET_SHARED_DIR:-../shared}
rounds=${ROUNDS:-3}
threads=${THREADS:-2}
batches=${BATCHES:-1,64}
seconds=${BENCH_SECONDS:-3}
weights="$shared/models/resnet56-seed-random.safetensors"
ort="$shared/bench/ort_bench.py"
for f in "$weights" "$ort"; do
    [[ -f $f ]] || { echo "missing $f (set RESNET_SHARED_DIR)" >&2; exit 1; }
done

# BINARY: an already built resnet-serve to measure instead of building this checkout.
if [[ -z ${BINARY:-} ]]; then cargo build --release --quiet; fi
bin=${BINARY:-target/release/resnet-serve}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

engines=(fast)
[[ ${SKIP_CANDLE:-0} == 1 ]] || engines+=(candle)
for round in $(seq 1 "$rounds"); do
    echo "round $round/$rounds" >&2
    for engine in "${engines[@]}"; do
        "$bin" bench --weights "$weights" --device cpu --engine "$engine" --threads "$threads" \
            --batch-sizes "$batches" --seconds "$seconds" |
            sed "s/^{/{\"round\":$round,/" | tee -a "$log" >&2
    done
    python3 "$ort" --threads "$threads" --seconds "$seconds" ${batches//,/ } |
        sed "s/^{/{\"round\":$round,/" | tee -a "$log" >&2
done

python3 - "$log" "$threads" <<'PY'
import json, statistics, sys
from collections import defaultdict
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ips = defaultdict(list)            # (engine kind, batch) -> [images/s per round]
by_round = defaultdict(dict)       # (round, batch) -> {kind: images/s}
names = {}
for l in lines:
    kind = "onnxruntime" if l["engine"] == "onnxruntime" else ("candle" if l["engine"] == "candle" else "fast")
    names[kind] = l["engine"]
    ips[(kind, l["batch_size"])].append(l["images_per_second"])
    by_round[(l["round"], l["batch_size"])][kind] = l["images_per_second"]
batches = sorted({b for _, b in ips})
print(f"threads={sys.argv[2]}  rounds={max(r for r, _ in by_round)}  engines: "
      + ", ".join(f"{k}={v}" for k, v in sorted(names.items())))
print(f"{'batch':>5} {'engine':>12} {'median img/s':>13} {'min':>9} {'max':>9}")
for b in batches:
    for kind in ("fast", "candle", "onnxruntime"):
        v = ips.get((kind, b))
        if v:
            print(f"{b:>5} {kind:>12} {statistics.median(v):>13.1f} {min(v):>9.1f} {max(v):>9.1f}")
print("ratios vs onnxruntime (per round, then median):")
for b in batches:
    for kind in ("fast", "candle"):
        r = [d[kind] / d["onnxruntime"] for (rd, bb), d in sorted(by_round.items())
             if bb == b and kind in d and "onnxruntime" in d]
        if r:
            print(f"  batch {b:>3} {kind:>7}/ort: median {statistics.median(r):.3f}  rounds "
                  + " ".join(f"{x:.3f}" for x in r))
PY
