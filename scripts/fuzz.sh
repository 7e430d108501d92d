#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for SECONDS each (default 60), starting from the
# committed seeds in fuzz/seeds/<target>/ and growing fuzz/corpus/<target>/, then prints each
# target's executions, coverage and findings (crash/oom/timeout files in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS]             all targets
#   FUZZ_TARGETS="jpeg" scripts/fuzz.sh 600
#
# Installs cargo-fuzz when missing. cargo-fuzz passes nightly-only flags (sanitizer, coverage
# instrumentation); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Runs at the lowest
# CPU priority. FUZZ_SANITIZER=none builds without AddressSanitizer (faster, but large single
# allocations are then caught only by the RSS limit). Exits non-zero when any target found
# something.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-60}"
TARGETS=(${FUZZ_TARGETS:-preprocess jpeg weights pytorch})
SANITIZER="${FUZZ_SANITIZER:-address}"
# Fewer codegen units than cargo-fuzz's default of 1 keep the instrumented build of the
# dependencies to minutes on small machines; the fuzzers run about as fast.
BUILD_FLAGS=(--sanitizer "$SANITIZER" --codegen-units 4)
RSS_LIMIT_MB="${FUZZ_RSS_LIMIT_MB:-2048}"
# No legitimate input of at most max_len bytes needs a single allocation this large (4M pixels
# at 16-bit RGBA is 32 MiB; deflate expands 32 KiB to at most 32 MiB): a bigger one means a
# size taken from a header before it was checked.
MALLOC_LIMIT_MB="${FUZZ_MALLOC_LIMIT_MB:-256}"

max_len() {
    case "$1" in
        preprocess | jpeg) echo 32768 ;; # image bombs are small; larger inputs only slow mutation
        *) echo 16384 ;;          # the largest checkpoint/header seed is about 6 KB
    esac
}

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

nice -n 19 cargo fuzz build "${BUILD_FLAGS[@]}"

found=0
summary=()
for target in "${TARGETS[@]}"; do
    corpus="fuzz/corpus/$target"
    artifacts="fuzz/artifacts/$target"
    log="fuzz/artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    echo "== $target: ${SECONDS_PER_TARGET}s"
    before=$(find "$artifacts" -type f | wc -l)
    status=0
    nice -n 19 cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_LIMIT_MB" \
        -malloc_limit_mb="$MALLOC_LIMIT_MB" -max_len="$(max_len "$target")" -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" 2>&1 | tee "$log" || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n1 || true)
    new=$(( $(find "$artifacts" -type f | wc -l) - before ))
    if [[ $status -ne 0 || $new -gt 0 ]]; then
        found=1
    fi
    summary+=("$target: ${execs:-?} executions, ${cov:-no coverage line}, corpus $(find "$corpus" -type f | wc -l) files, $new new finding(s), exit $status")
done

echo
echo "== summary (${SECONDS_PER_TARGET}s per target)"
printf '%s\n' "${summary[@]}"
if [[ $found -ne 0 ]]; then
    echo "findings are in fuzz/artifacts/<target>/; reproduce one with"
    echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD_FLAGS[*]} <target> fuzz/artifacts/<target>/<file>"
fi
exit "$found"
