#!/usr/bin/env bash
# Builds the CUDA + cuDNN binary (`cargo build --release --locked --features cuda,cudnn`) on a
# Debian machine with no GPU and no CUDA toolkit installed, and prints the binary's path as the
# last line of its output.
#
#   scripts/build-cuda.sh
#
# What it sets up (nothing is installed system-wide), in the cache's cuda-toolkit/:
#   venv/   the CUDA 13.0 compiler, headers and libraries (cuBLAS, cuRAND, NVRTC, cuDNN) from
#           NVIDIA's Python wheels, pinned below;
#   lib/    the unversioned names the linker wants (-lcublas, -lcudnn, -lcuda, ...) and
#           libcuda.so.1 from Debian's `libcuda1` (non-free; unpacked, not installed): the NVIDIA
#           driver's user-space library, to link against and to start without a GPU;
# and in target/cuda-toolkit/ of this checkout:
#   env.sh  the library path to run the binary on this machine (it is linked to libcuda.so.1 and
#           the CUDA libraries, so it needs them even for --device cpu);
#   resnet-serve  a wrapper that runs the built binary with env.sh.
# cargo builds into its own target directory, also in the cache. Most of a cold build (about 30
# CPU-minutes) is candle's CUDA kernels; the toolkit's paths are part of cargo's fingerprints
# (RUSTFLAGS, CUDA_ROOT), so with the toolkit and the target directory both in the cache a fresh
# clone, at any path, rebuilds only this crate. Without a writable cache both go under target/.
# Two builds that share a cache must not run at the same time (each rewrites its lib/ links).
# The binary is copied to target/cuda/release/resnet-serve.
#
# CUDA 13.0 because PTX runs only on a driver at least as new as the compiler that made it: 13.0
# needs an R580 driver or newer, and later 13.x compilers need later drivers. On the GPU host
# the binary uses the driver's libcuda.so.1 and any CUDA 13 libraries (a CUDA 13 PyTorch's
# wheels have them; scripts/gpu-check.sh finds them).
#
# Environment:
#   CUDA_COMPUTE_CAP   GPU architecture the kernels are compiled for (default 90: H100/H200;
#                      80 A100, 89 L4/L40S/RTX 40xx, 86 A10/RTX 30xx). Code built for one
#                      capability runs on that one and newer.
#   RESNET_CACHE_DIR   cache for the wheels, the libcuda1 package, the toolkit and the build
#                      (default ~/.cache/resnet-serve; optional: without it everything is
#                      downloaded and built under target/)
#   LIBCUDA            a libcuda.so to link against instead of Debian's (e.g. a toolkit's
#                      stubs/libcuda.so); the binary then needs a real driver to start
#   CUDA_TARGET_DIR    cargo's target directory (default $RESNET_CACHE_DIR/cuda-target, or
#                      target/cuda when the cache cannot be written)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# NVIDIA's wheels, all from the CUDA 13.0 release (nvcc, cicc and the headers must agree).
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
    nvidia-cudnn-cu13==9.13.0.50
)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc's bindings for this CUDA release (it reads the version from nvcc otherwise, and stops on
# one newer than it knows).
export CUDARC_CUDA_VERSION=13000

# This checkout's wrapper and environment file.
toolkit="$root/target/cuda-toolkit"
cache="${RESNET_CACHE_DIR:-${HOME:-/nonexistent}/.cache/resnet-serve}"
tools="$cache/cuda-toolkit"
target_dir="$cache/cuda-target"
if ! mkdir -p "$cache/cuda-wheels" "$cache/debs" "$tools" 2>/dev/null; then
    cache="$toolkit/cache"
    tools="$toolkit"
    target_dir="$root/target/cuda"
    mkdir -p "$cache/cuda-wheels" "$cache/debs"
fi
mkdir -p "$toolkit"
target_dir="${CUDA_TARGET_DIR:-$target_dir}"
venv="$tools/venv"
linkdir="$tools/lib"
binary="$root/target/cuda/release/resnet-serve"

step() { printf '== %s\n' "$*" >&2; }

# --- the toolkit and libraries -------------------------------------------------------------
stamp="$venv/.pins"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${PINS[*]}" ]]; then
    step "CUDA wheels: ${PINS[*]}"
    rm -rf "$venv"
    python3 -m venv "$venv"
    pip=("$venv/bin/pip" --disable-pip-version-check --quiet)
    # From the cache when it has every pinned wheel, else download what is missing first.
    if ! "${pip[@]}" install --no-index --no-deps --find-links "$cache/cuda-wheels" "${PINS[@]}" 2>/dev/null; then
        "${pip[@]}" download --no-deps --dest "$cache/cuda-wheels" "${PINS[@]}"
        "${pip[@]}" install --no-index --no-deps --find-links "$cache/cuda-wheels" "${PINS[@]}"
    fi
    echo "${PINS[*]}" > "$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda="$site/nvidia/cu13"
cudnn="$site/nvidia/cudnn"
[[ -x "$cuda/bin/nvcc" && -f "$cudnn/lib/libcudnn.so.9" ]] || {
    echo "build-cuda.sh: the wheels did not lay out $cuda/bin/nvcc and $cudnn/lib" >&2
    exit 1
}

# --- libcuda: the driver's library, from Debian's non-free libcuda1 ------------------------
# Fetched with a private apt state (the system's own sources, component non-free), so the
# system's apt configuration is left as it is.
fetch_libcuda() {
    local apt="$tools/apt" sources=/etc/apt/sources.list.d/debian.sources
    [[ -f "$sources" ]] || {
        echo "build-cuda.sh: no $sources to find Debian's archive in; set LIBCUDA=/path/to/libcuda.so" >&2
        return 1
    }
    rm -rf "$apt"
    mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache/archives/partial"
    # The first stanza (the main archive), with the non-free component.
    awk 'BEGIN { RS = ""; FS = "\n" }
         NR == 1 { for (i = 1; i <= NF; i++) print ($i ~ /^Components:/ ? "Components: non-free" : $i) }' \
        "$sources" > "$apt/sources/non-free.sources"
    local opts=(
        -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/sources"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o Debug::NoLocking=1 -o "APT::Sandbox::User=$(id -un)"
    )
    apt-get "${opts[@]}" -qq update >&2
    (cd "$cache/debs" && apt-get "${opts[@]}" -qq download libcuda1 >&2)
}
if [[ -z "${LIBCUDA:-}" ]]; then
    deb=$(find "$cache/debs" -name 'libcuda1_*_amd64.deb' 2>/dev/null | sort -V | tail -n1)
    if [[ -z "$deb" ]]; then
        step "libcuda1 (Debian non-free)"
        fetch_libcuda
        deb=$(find "$cache/debs" -name 'libcuda1_*_amd64.deb' | sort -V | tail -n1)
    fi
    [[ -n "$deb" ]] || { echo "build-cuda.sh: libcuda1 could not be downloaded" >&2; exit 1; }
    unpacked="$tools/libcuda1"
    rm -rf "$unpacked"
    dpkg-deb -x "$deb" "$unpacked"
    LIBCUDA=$(find "$unpacked" -name 'libcuda.so.*.*' -type f | head -n1)
    step "libcuda: $(basename "$deb")"
fi
[[ -f "$LIBCUDA" ]] || { echo "build-cuda.sh: LIBCUDA=$LIBCUDA is not a file" >&2; exit 1; }

# --- the names the linker and the loader look for ------------------------------------------
rm -rf "$linkdir"
mkdir -p "$linkdir"
link() { ln -sf "$1" "$linkdir/$2"; }
link "$LIBCUDA" libcuda.so
link "$LIBCUDA" libcuda.so.1
for lib in cudart cublas cublasLt nvrtc; do
    link "$cuda/lib/lib$lib.so.13" "lib$lib.so"
done
link "$cuda/lib/libcurand.so.10" libcurand.so
link "$cudnn/lib/libcudnn.so.9" libcudnn.so

cat > "$toolkit/env.sh" <<EOF
# Source this to run the CUDA build of resnet-serve on this machine (written by build-cuda.sh).
export LD_LIBRARY_PATH="$linkdir:$cuda/lib:$cudnn/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
cat > "$toolkit/resnet-serve" <<EOF
#!/usr/bin/env bash
# The CUDA build of resnet-serve with the libraries it is linked to (written by build-cuda.sh).
. "$toolkit/env.sh"
exec "$binary" "\$@"
EOF
chmod +x "$toolkit/resnet-serve"

# --- the build -----------------------------------------------------------------------------
step "cargo build --release --locked --features cuda,cudnn (sm_$CUDA_COMPUTE_CAP, into $target_dir)"
export PATH="$cuda/bin:$PATH"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda"
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$linkdir"
cargo build --release --locked --features cuda,cudnn --target-dir "$target_dir" >&2

built="$target_dir/release/resnet-serve"
[[ -x "$built" ]] || { echo "build-cuda.sh: no $built after the build" >&2; exit 1; }
if [[ "$built" != "$binary" ]]; then
    mkdir -p "$(dirname "$binary")"
    cp -f "$built" "$binary"
fi
step "built; run it here with $toolkit/resnet-serve (or source $toolkit/env.sh)"
echo "$binary"
