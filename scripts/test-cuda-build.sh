#!/usr/bin/env bash
# Builds the CUDA binary with scripts/build-cuda.sh and runs its CPU-side tests
# (tests/cuda_binary.rs) with it: on a machine without a GPU, `--device cuda` is refused at once
# with a clear message, `--device auto` serves on the CPU with the fast engine, and its CPU
# engines give PyTorch's logits. The tests fail, rather than skip, if the binary is missing.
#
#   scripts/test-cuda-build.sh
#
# Environment: as scripts/build-cuda.sh; RESNET_SHARED_DIR (default ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."

log=target/cuda-build.log
mkdir -p target
started=$SECONDS
bash scripts/build-cuda.sh 2>&1 | tee "$log"
binary=$(tail -n1 "$log")
echo "== CUDA build: $binary ($(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s)"
[[ -x "$binary" ]] || { echo "test-cuda-build.sh: no binary at $binary" >&2; exit 1; }

# The wrapper sets the library path for the binary only, not for cargo and the test harness.
wrapper=target/cuda-toolkit/resnet-serve
RESNET_CUDA_BINARY="$PWD/$wrapper" REQUIRE_CUDA_BINARY=1 \
    cargo test --release --locked --test cuda_binary -- --test-threads 1
