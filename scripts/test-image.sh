#!/usr/bin/env bash
# Builds the CPU image from ./Dockerfile as committed, with buildah (no container daemon needed),
# runs it and checks it: readiness, the 20 shared CIFAR-10 PNGs against PyTorch's predictions,
# the HEALTHCHECK command, the user it runs as and where that user can write, SIGTERM under load
# (exit 0, every accepted request answered), and the size the runtime stage adds to its base.
#
#   bash scripts/test-image.sh            # RESNET_SHARED_DIR (default ../shared) for the data
#
# Base images are used from local storage only (--pull=never). Where they are missing they are
# made here and tagged with the names the Dockerfile uses, so the Dockerfile stays the one that
# builds against the real registries: debian:<release>-slim from `debootstrap --variant=minbase`,
# and rust:<version>-<release> from it plus build-essential, pkg-config and this machine's own
# Rust toolchain (which must be the version the Dockerfile names). This machine's extra CA
# certificates (/usr/local/share/ca-certificates) are copied into both, so HTTPS from a RUN step
# (cargo fetching crates) trusts what the host trusts. The debootstrap root filesystem is cached
# in RESNET_CACHE_DIR (default ~/.cache/resnet-serve), and the base images stay in buildah's
# storage. What a run adds to that storage (the tested image, every intermediate image of both
# stages) is removed when it ends, pass or fail, unless KEEP_IMAGE=1: the vfs driver copies every
# layer in full, about 1.5 GB per build-stage step, so images left by each run fill the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

SHARED=${RESNET_SHARED_DIR:-../shared}
CACHE=${RESNET_CACHE_DIR:-$HOME/.cache/resnet-serve}
IMAGE=${IMAGE:-localhost/resnet-serve:test}
PORT=${PORT:-18480}
BUILDAH=(buildah --storage-driver vfs)

log() { printf '[test-image] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing buildah and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah debootstrap uidmap >/dev/null
fi
for f in data/images reference/logits.safetensors; do
  [[ -e $SHARED/$f ]] || die "$SHARED/$f is missing (set RESNET_SHARED_DIR)"
done

# The base image names, read from the Dockerfile's own ARG defaults.
arg_default() { sed -n "s/^ARG $1=\(.*\)$/\1/p" Dockerfile | head -1; }
RUST_VERSION=$(arg_default RUST_VERSION)
RELEASE=$(arg_default DEBIAN_RELEASE)
[[ -n $RUST_VERSION && -n $RELEASE ]] || die "cannot read RUST_VERSION/DEBIAN_RELEASE from Dockerfile"
SLIM=docker.io/library/debian:${RELEASE}-slim
RUST=docker.io/library/rust:${RUST_VERSION}-${RELEASE}

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# Adds this machine's extra CA certificates to a working container.
copy_host_cas() {
  local ctr=$1
  if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    "${BUILDAH[@]}" copy "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
  fi
}

make_slim() {
  local rootfs_tar=$CACHE/debian-$RELEASE-minbase.tar
  if [[ ! -s $rootfs_tar ]]; then
    log "debootstrap --variant=minbase $RELEASE (cached in $rootfs_tar)"
    mkdir -p "$CACHE"
    local dir
    dir=$(mktemp -d)
    debootstrap --variant=minbase "$RELEASE" "$dir" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    # What the official slim images leave out: package caches, lists, documentation.
    rm -rf "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
           "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
           "$dir"/usr/share/info/* "$dir"/var/log/*
    tar -C "$dir" -cf "$rootfs_tar.part" . && mv "$rootfs_tar.part" "$rootfs_tar"
    rm -rf "$dir"
  fi
  log "importing $SLIM"
  local ctr mnt
  ctr=$("${BUILDAH[@]}" from --pull=never scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  tar -C "$mnt" -xf "$rootfs_tar"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  copy_host_cas "$ctr"
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
  "${BUILDAH[@]}" commit --quiet "$ctr" "$SLIM" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
}

make_rust() {
  local host_version sysroot ctr mnt
  host_version=$(rustc --version | awk '{print $2}')
  [[ $host_version == "$RUST_VERSION" ]] \
    || die "the Dockerfile builds with Rust $RUST_VERSION but this machine has $host_version"
  sysroot=$(rustc --print sysroot)
  log "making $RUST from $SLIM, build-essential and the Rust $host_version toolchain at $sysroot"
  ctr=$("${BUILDAH[@]}" from --pull=never "$SLIM")
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends build-essential pkg-config ca-certificates curl git >/dev/null && rm -rf /var/lib/apt/lists/* && update-ca-certificates >/dev/null'
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  # The toolchain as the official image lays it out: RUSTUP_HOME=/usr/local/rustup,
  # CARGO_HOME=/usr/local/cargo with the tools in its bin (here links, not rustup proxies).
  local toolchain=/usr/local/rustup/toolchains/$RUST_VERSION-x86_64-unknown-linux-gnu
  mkdir -p "$mnt$toolchain" "$mnt/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$mnt$toolchain" -xf -
  for tool in "$mnt$toolchain"/bin/*; do
    ln -sf "$toolchain/bin/$(basename "$tool")" "$mnt/usr/local/cargo/bin/"
  done
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config \
    --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$RUST_VERSION" "$ctr"
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- cargo --version >/dev/null \
    || die "cargo does not run in $RUST"
  "${BUILDAH[@]}" commit --quiet "$ctr" "$RUST" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
}

have_image "$SLIM" || make_slim
have_image "$RUST" || make_rust

# A build holds about 7 GB at its peak under vfs (the build stage's layers, each a full copy).
storage_root=$("${BUILDAH[@]}" info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
free_gb=$(df -P -BG "$storage_root" 2>/dev/null | awk 'NR == 2 {sub("G", "", $4); print $4}')
[[ -z $free_gb || $free_gb -ge 8 ]] \
  || die "only ${free_gb} GB free under $storage_root; the image build needs about 8 GB"

# Everything the build adds, intermediate images included, goes when the script ends. Removing an
# image also removes the untagged images under it, so the layers cached by an earlier run go too
# and each run builds both stages afresh; the tagged base images stay.
images_before=$("${BUILDAH[@]}" images --all --quiet --no-trunc | sort -u)
remove_added_images() {
  [[ ${KEEP_IMAGE:-0} == 1 ]] && return 0
  local added id
  added=$(comm -13 <(printf '%s\n' "$images_before") \
    <("${BUILDAH[@]}" images --all --quiet --no-trunc | sort -u))
  for id in $added; do
    "${BUILDAH[@]}" rmi --force "$id" >/dev/null 2>&1 || true
  done
}
trap remove_added_images EXIT

log "building $IMAGE from Dockerfile"
start=$SECONDS
# Docker's image format: OCI has no HEALTHCHECK, and the image must keep it.
"${BUILDAH[@]}" bud --isolation chroot --pull=never --layers --force-rm --format docker -f Dockerfile -t "$IMAGE" . \
  >"${BUILD_LOG:-target/test-image-build.log}" 2>&1 \
  || { tail -40 "${BUILD_LOG:-target/test-image-build.log}" >&2; die "image build failed"; }
log "built in $((SECONDS - start)) s"

# The image's own configuration, applied as a container engine would.
config() { "${BUILDAH[@]}" inspect --type image --format "$1" "$IMAGE"; }
USER_SPEC=$(config '{{.OCIv1.Config.User}}')
WORKDIR=$(config '{{.OCIv1.Config.WorkingDir}}')
mapfile -t ENV_VARS < <(config '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t ENTRYPOINT < <(config '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t CMD < <(config '{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t HEALTHCHECK < <(config '{{with .Docker.Config.Healthcheck}}{{range .Test}}{{println .}}{{end}}{{end}}' | sed '/^$/d')
log "image config: user=$USER_SPEC workdir=$WORKDIR entrypoint=${ENTRYPOINT[*]} cmd=${CMD[*]} healthcheck=${HEALTHCHECK[*]:-none}"
[[ -n $USER_SPEC && -n $WORKDIR && ${#ENTRYPOINT[@]} -gt 0 ]] || die "image config incomplete"

RUN_ARGS=(--isolation chroot --user "$USER_SPEC" --workingdir "$WORKDIR")
for kv in "${ENV_VARS[@]}"; do RUN_ARGS+=(--env "$kv"); done
# As `docker run -e RESNET_PORT=...`: a free port on the host network the container shares.
RUN_ARGS+=(--env "RESNET_PORT=$PORT")

CTR=$("${BUILDAH[@]}" from --pull=never "$IMAGE")
SERVER_PID=
cleanup() {
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true
  "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
  remove_added_images
}
trap cleanup EXIT

log "where the image's user can write"
"${BUILDAH[@]}" run "${RUN_ARGS[@]}" "$CTR" -- sh -c \
  'find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -writable ! -type l -print 2>/dev/null' \
  >target/test-image-writable.txt 2>/dev/null || true
outside=$(grep -v -E '^/app(/|$)' target/test-image-writable.txt \
  | grep -v -x -E '/tmp|/var/tmp|/run/lock' || true)
[[ -z $outside ]] || die "user $USER_SPEC can write outside /app: $outside"
grep -q -x /app target/test-image-writable.txt || die "user $USER_SPEC cannot write /app"
log "writable: $(tr '\n' ' ' <target/test-image-writable.txt)(the temp directories are the sticky, world-writable ones of every Debian image)"

log "starting the container: ${ENTRYPOINT[*]} ${CMD[*]} on port $PORT"
"${BUILDAH[@]}" run "${RUN_ARGS[@]}" "$CTR" -- "${ENTRYPOINT[@]}" "${CMD[@]}" \
  >target/test-image-server.log 2>&1 &
SERVER_PID=$!

# The server process itself (buildah run is its ancestor): the one listening on PORT.
server_process() {
  ss -Hltnp "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2
}

python3 scripts/image_checks.py ready --port "$PORT" --timeout 60 \
  || { tail -20 target/test-image-server.log >&2; die "not ready"; }
PID=$(server_process)
[[ -n $PID ]] || die "no process listens on $PORT"
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$PID/status")
[[ $uids == "10001 10001 10001 10001" ]] || die "server runs with uids $uids, expected 10001"
log "server pid $PID runs as uid 10001 (real, effective, saved, fs)"
grep -q '"weights":"embedded"' target/test-image-server.log \
  || die "startup log does not say the embedded weights are served"

if [[ ${#HEALTHCHECK[@]} -gt 0 ]]; then
  case ${HEALTHCHECK[0]} in
    CMD) hc=("${HEALTHCHECK[@]:1}") ;;
    CMD-SHELL) hc=(/bin/sh -c "${HEALTHCHECK[1]}") ;;
    *) die "unexpected HEALTHCHECK ${HEALTHCHECK[*]}" ;;
  esac
  "${BUILDAH[@]}" run "${RUN_ARGS[@]}" "$CTR" -- "${hc[@]}" || die "HEALTHCHECK ${hc[*]} failed"
  log "HEALTHCHECK ${hc[*]}: exit 0"
else
  die "the image declares no HEALTHCHECK"
fi

python3 scripts/image_checks.py classify --port "$PORT" --shared "$SHARED"
python3 scripts/image_checks.py sigterm --port "$PORT" --pid "$PID" --shared "$SHARED" &
checker=$!
set +e
wait "$SERVER_PID"
server_status=$?
wait "$checker"
checker_status=$?
set -e
SERVER_PID=
log "container exit status after SIGTERM: $server_status"
[[ $server_status -eq 0 ]] || { tail -20 target/test-image-server.log >&2; die "exit status $server_status"; }
[[ $checker_status -eq 0 ]] || die "requests were lost during shutdown"

# Sizes as the unpacked root filesystems (what `docker images` shows for an image on disk).
size_of() {
  local ctr mnt bytes
  ctr=$("${BUILDAH[@]}" from --pull=never "$1")
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  bytes=$(du -sb "$mnt" | cut -f1)
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  echo "$bytes"
}
base_size=$(size_of "$SLIM")
image_size=$(size_of "$IMAGE")
binary_size=$("${BUILDAH[@]}" run "${RUN_ARGS[@]}" "$CTR" -- sh -c 'stat -c %s "$(command -v resnet-serve)"')
python3 - "$base_size" "$image_size" "$binary_size" <<'EOF2'
import sys
base, image, binary = (int(v) for v in sys.argv[1:])
mb = lambda b: b / 1e6
print(f"[test-image] image {mb(image):.1f} MB = {mb(base):.1f} MB base + {mb(image - base):.1f} MB "
      f"runtime stage (binary {mb(binary):.1f} MB, stripped, model built in)", file=sys.stderr)
EOF2
log "all checks passed"
