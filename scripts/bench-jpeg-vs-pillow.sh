#!/usr/bin/env bash
# A 12-megapixel JPEG through `POST /classify` against Pillow + torchvision preprocessing of the
# same file alone (`Image.open(...).convert("RGB")`, `Resize(32)`, `CenterCrop(32)`,
# `ToTensor()`, `Normalize(...)`), both measured in one run, interleaved. Starts the release
# binary on a free loopback port with the seed-random weights, makes the image once
# (4000x3000, 4:2:0, quality 90, under target/bench-jpeg/), prints both medians and their
# ratio, and exits 1 when /classify takes more than MAX_RATIO (default 1.0) times as long.
# Timings mean something only on a quiet machine.
#
#   scripts/bench-jpeg-vs-pillow.sh [RUNS]
#
# Environment: BINARY (default target/release/resnet-serve, built when missing),
# RESNET_SHARED_DIR (default ../shared), BENCH_JPEG_VENV (an existing venv with torch,
# torchvision and Pillow, used as it is; by default target/bench-jpeg-venv is made with the
# versions pinned below, the Pillow a new torchvision install brings, and reused; several GiB).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-15}
PINS=(torch==2.15.0 torchvision==0.29.2 pillow==13.0.0 numpy)
shared=${RESNET_SHARED_DIR:-$(cd .. && pwd)/shared}
weights="$shared/models/resnet56-seed-random.safetensors"
venv=${BENCH_JPEG_VENV:-}
image=target/bench-jpeg/12mp.jpg
if [[ ! -f "$weights" ]]; then
    echo "bench-jpeg-vs-pillow: $weights not found (set RESNET_SHARED_DIR)" >&2
    exit 1
fi

if [[ -z "$venv" ]]; then
    venv=target/bench-jpeg-venv
    if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.pins" 2>/dev/null)" != "${PINS[*]}" ]]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
        echo "${PINS[*]}" > "$venv/.pins"
    fi
fi

bin=${BINARY:-target/release/resnet-serve}
if [[ ! -x "$bin" ]]; then
    cargo build --release --locked --bin resnet-serve
fi

make=()
if [[ ! -f "$image" ]]; then
    mkdir -p "$(dirname "$image")"
    make=(--make)
fi

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$bin" serve --weights "$weights" --host 127.0.0.1 --port "$port" --grpc-port 0 >"$log" 2>&1 &
server=$!
stop() {
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$log"
}
trap stop EXIT

ready=0
for _ in $(seq 1 600); do
    if ! kill -0 "$server" 2>/dev/null; then break; fi
    if "$venv/bin/python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/health/ready', timeout=1).status != 200)" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [[ $ready != 1 ]]; then
    echo "bench-jpeg-vs-pillow: the server ($bin) did not become ready" >&2
    cat "$log" >&2
    exit 1
fi

echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$venv/bin/python" scripts/bench_jpeg_vs_pillow.py --url "http://127.0.0.1:$port" \
    --image "$image" "${make[@]}" --runs "$RUNS" --max-ratio "${MAX_RATIO:-1.0}"
