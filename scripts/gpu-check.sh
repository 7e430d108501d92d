#!/usr/bin/env bash
# The CUDA build on a GPU: for a machine with an NVIDIA GPU and a CUDA 13 PyTorch, and no Rust or
# network. Carry there the binary that scripts/build-cuda.sh made and the shared reference data
# (models/, data/, reference/logits.safetensors, tools/seed_resnet56.py). The binary is about
# 150 MB with line tables, 54 MB stripped, 8 MB compressed:
#   strip -o DIR/resnet-serve target/cuda/release/resnet-serve && xz DIR/resnet-serve
#
#   scripts/gpu-check.sh [BINARY]        (default target/cuda/release/resnet-serve; BINARY.xz is
#                                         unpacked into GPU_CHECK_OUT first)
#
# 1. libraries: the CUDA 13 and cuDNN 9 libraries the binary is linked to, from PyTorch's NVIDIA
#    wheels (or a system toolkit), onto LD_LIBRARY_PATH for the binary.
# 2. eval on the GPU, both shared models (the seed-random one, and the pretrained checkpoint
#    converted here): top-1 agreement 1.0 and max |logit diff| <= 1e-3 against PyTorch's
#    reference logits, accuracy >= 0.932 for the pretrained one. The binary keeps cuDNN and
#    cuBLAS in FP32 unless NVIDIA_TF32_OVERRIDE is set; the same evals with TF32 allowed are
#    reported too, not judged.
# 3. bench: `resnet-serve bench` at batch 1, 64, 256 and 1024, and PyTorch on the same model and
#    measure (host images in, logits back): eager, and channels-last with cudnn.benchmark; FP32,
#    then with TF32 allowed. On CUDA also resnet-serve with `--cuda-graphs false`, reported only.
# 4. HTTP load on 127.0.0.1: the server on the GPU, 1, 16 and 64 concurrent clients posting a
#    PNG to /classify for a few seconds each, and the GPU memory the server then holds (reported
#    only); then SIGTERM, which must end it with status 0.
#
# Output: JSON lines on stdout, each with a "check" field, also kept in $GPU_CHECK_OUT; the last
# line is {"check": "summary", ...}. Exit status 1 when a judged check failed.
#
# Environment: RESNET_SHARED_DIR (default ../shared), PYTHON (python3, the one with PyTorch),
# GPU_CHECK_DEVICE (cuda; cpu runs every step on the CPU, to try the script without a GPU),
# BATCH_SIZES (1,64,256,1024), BENCH_SECONDS (3), LOAD_LEVELS (1,16,64), LOAD_SECONDS (5),
# PORT (18090), GPU_CHECK_OUT (target/gpu-check: the JSON lines and the logs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

binary=$(realpath "${1:-target/cuda/release/resnet-serve}")
shared=$(realpath "${RESNET_SHARED_DIR:-../shared}")
py=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
batch_sizes=${BATCH_SIZES:-1,64,256,1024}
bench_seconds=${BENCH_SECONDS:-3}
load_levels=${LOAD_LEVELS:-1,16,64}
load_seconds=${LOAD_SECONDS:-5}
port=${PORT:-18090}
out=${GPU_CHECK_OUT:-target/gpu-check}
helper="$PWD/scripts/gpu_check.py"
mkdir -p "$out"
out=$(realpath "$out")
if [[ $binary == *.xz ]]; then
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$binary" "$out/resnet-serve" && chmod +x "$out/resnet-serve" || exit 2
    binary="$out/resnet-serve"
fi
results="$out/gpu-check.jsonl"
: > "$results"

# The binary runs FP32 unless this is set; each step below sets it where it wants TF32.
unset NVIDIA_TF32_OVERRIDE
# precision PRECISION COMMAND...: COMMAND in FP32, or with TF32 allowed (tf32*).
precision() {
    case $1 in
        tf32*) shift; NVIDIA_TF32_OVERRIDE=1 "$@" ;;
        *) shift; "$@" ;;
    esac
}

failed=()
# Runs a step whose JSON lines go to stdout and $results; a non-zero status marks it failed.
check() {
    local name=$1
    shift
    printf '== %s\n' "$name" >&2
    "$@" | tee -a "$results"
    local status=${PIPESTATUS[0]}
    if ((status != 0)); then
        failed+=("$name")
        printf '== %s FAILED (status %d)\n' "$name" "$status" >&2
    fi
}
tag() { "$py" "$helper" tag "$@"; }

[[ -x "$binary" ]] || { echo "gpu-check.sh: no binary at $binary (pass its path)" >&2; exit 2; }
for f in models/resnet56-seed-random.safetensors models/resnet56-4bfd9763.th \
    data/cifar10-test-846.safetensors reference/logits.safetensors; do
    [[ -f "$shared/$f" ]] || { echo "gpu-check.sh: $shared/$f missing (set RESNET_SHARED_DIR)" >&2; exit 2; }
done
seed="$shared/models/resnet56-seed-random.safetensors"
data="$shared/data/cifar10-test-846.safetensors"
reference="$shared/reference/logits.safetensors"
[[ $device == cuda ]] && expect_device=cuda:0 || expect_device=$device

# --- 1. libraries --------------------------------------------------------------------------
check libraries "$py" "$helper" libs "$binary" --write "$out/ld-library-path"
LD_LIBRARY_PATH=$(cat "$out/ld-library-path" 2>/dev/null || echo "${LD_LIBRARY_PATH:-}")
export LD_LIBRARY_PATH
gpu_info() {
    local smi="none"
    if command -v nvidia-smi >/dev/null; then
        smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)
    fi
    "$binary" --version | "$py" -c 'import json, sys; print(json.dumps({"version": sys.stdin.read().strip()}))' \
        | tag check=environment "binary=$binary" "device=$device" "nvidia_smi=$smi"
}
check environment gpu_info

# --- 2. eval parity ------------------------------------------------------------------------
"$binary" convert "$shared/models/resnet56-4bfd9763.th" "$out/pretrained.safetensors" \
    --preset imagenet 2>>"$out/convert.log" || failed+=(convert)
# eval NAME WEIGHTS REFERENCE_KEY LABEL [JUDGE ARGS...]: one eval on the device, judged.
run_eval() {
    local name=$1 weights=$2 key=$3 label=$4
    shift 4
    precision "$label" timeout 600 "$binary" eval --device "$device" --weights "$weights" --data "$data" \
        --reference "$reference" --reference-key "$key" --json 2>>"$out/eval.log" \
        | "$py" "$helper" judge "$name" --label "$label" --device "$expect_device" "$@"
}
check "eval seed-random" run_eval seed-random "$seed" seed_random_logits fp32
check "eval pretrained" run_eval pretrained "$out/pretrained.safetensors" paper_logits fp32 \
    --min-accuracy 0.932
if [[ $device == cuda ]]; then
    # Reported only: how far TF32 convolutions move the logits.
    run_eval seed-random "$seed" seed_random_logits tf32-allowed | tee -a "$results"
    run_eval pretrained "$out/pretrained.safetensors" paper_logits tf32-allowed \
        | tee -a "$results"
fi

# --- 3. bench ------------------------------------------------------------------------------
# bench PRECISION IMPL [FLAGS...]: `resnet-serve bench` with FLAGS, reported as IMPL.
bench() {
    local label=$1 impl=$2
    shift 2
    precision "$label" timeout 900 "$binary" bench --device "$device" --weights "$seed" --batch-sizes "$batch_sizes" \
        --seconds "$bench_seconds" --json "$@" 2>>"$out/bench.log" \
        | tag check=bench "impl=$impl" "precision=$label"
}
check "bench resnet-serve" bench fp32 resnet-serve
if [[ $device == cuda ]]; then
    bench tf32 resnet-serve | tee -a "$results"
    # The same pass launched kernel by kernel, as without CUDA graphs.
    bench fp32 resnet-serve-without-cuda-graphs --cuda-graphs false | tee -a "$results"
fi
torch_args=(--shared "$shared" --device "$device" --batch-sizes "$batch_sizes" --seconds "$bench_seconds")
[[ $device == cuda ]] && torch_args+=(--tf32)
check "bench pytorch" timeout 1200 "$py" "$helper" torch "${torch_args[@]}"

# --- 4. HTTP load --------------------------------------------------------------------------
load() {
    local base="http://127.0.0.1:$port" image server status=0
    image=$(find "$shared/data/images" -name '*.png' | sort | head -n1)
    "$binary" serve --device "$device" --host 127.0.0.1 --port "$port" \
        --weights "$seed" --log-format json >"$out/serve.log" 2>&1 &
    server=$!
    if "$py" "$helper" ready "$base/health/ready" --seconds 120; then
        "$py" -c 'import json, sys, urllib.request
info = json.load(urllib.request.urlopen(sys.argv[1]))
print(json.dumps({"check": "served-model", "pass": info["device"] == sys.argv[2], **info}))
sys.exit(0 if info["device"] == sys.argv[2] else 1)' "$base/v1/model" "$expect_device" || status=1
        "$py" "$helper" load --url "$base" --image "$image" --levels "$load_levels" \
            --seconds "$load_seconds" || status=1
        # Reported only: the GPU memory the server holds after the load, with a CUDA graph for
        # each batch size it has seen.
        if [[ $device == cuda ]] && command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
                | awk -F', *' -v pid="$server" '$1 == pid { mib = $2 }
                    END { printf "{\"check\": \"gpu-memory\", \"server_mib\": %s}\n", (mib == "" ? "null" : mib) }'
        fi
    else
        status=1
    fi
    kill -TERM "$server" 2>/dev/null
    local exit_status=0
    wait "$server" || exit_status=$?
    echo "{\"check\": \"shutdown\", \"exit_status\": $exit_status, \"pass\": $([[ $exit_status == 0 ]] && echo true || echo false)}"
    ((exit_status == 0)) || status=1
    return "$status"
}
check "http load" load

# --- summary -------------------------------------------------------------------------------
"$py" -c 'import json, sys; f = sys.argv[1:]; print(json.dumps({"check": "summary", "pass": not f, "failed": f}))' \
    "${failed[@]}" | tee -a "$results"
((${#failed[@]} == 0))
