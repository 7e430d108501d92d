# shellcheck shell=bash
# Shared by the peer benchmarks (scripts/bench-http.sh, scripts/bench-vs-onnxruntime.sh), sourced
# from the repository root: the pinned Python environments they run the peers in, the Debian
# packages they need, and the idle-machine rule that decides whether their figures may be reported.
#
# Environments live under BENCH_VENVS (default target/bench-venvs), one per requirements file in
# scripts/bench-requirements/, made on first use with PYTHON (default python3) and remade only when
# that file changes (its hash is stamped into the venv), so running a benchmark again installs
# nothing.
#
# Idle rule: LOAD_MAX (default 0.5) is the highest 1-minute load average at which a run may start;
# above it the script waits up to LOAD_WAIT seconds (default 180: installs and builds just before
# leave a tail in the average) and then refuses, unless FORCE=1, in which case the figures are
# printed marked as taken on a busy machine.

bench_venvs=$(mkdir -p "${BENCH_VENVS:-target/bench-venvs}" && cd "${BENCH_VENVS:-target/bench-venvs}" && pwd)
bench_python=${PYTHON:-python3}
bench_reqs=$PWD/scripts/bench-requirements

log() { echo "$*" >&2; }

# need_apt COMMAND PACKAGE: installs the Debian package when the command is missing.
need_apt() {
    command -v "$1" >/dev/null && return
    log "installing $2 (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# need_java17: TorchServe 0.12 needs a Java 17 (or newer) runtime.
need_java17() {
    local major
    major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
    if [[ -z $major || $major -lt 17 ]]; then
        log "installing openjdk-17-jre-headless (Debian package)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    fi
}

venv_stamp() { sha256sum "$bench_reqs/$1.txt" | cut -c1-16; }
venv_ready() { [[ -f $bench_venvs/$1/.pinned && $(cat "$bench_venvs/$1/.pinned") == "$(venv_stamp "$1")" ]]; }

# need_venv NAME [INSTALL-COMMAND...]: makes $bench_venvs/NAME from scripts/bench-requirements/NAME.txt
# unless it is already there at those pins. With no command, pip installs the file as requirements;
# otherwise the command runs with PIP_CONSTRAINT set to the file (a harness's own setup script).
need_venv() {
    local name=$1 venv=$bench_venvs/$1 start=$SECONDS
    shift
    venv_ready "$name" && return
    log "making the $name environment in $venv (first use, pinned by scripts/bench-requirements/$name.txt)"
    [[ -x $venv/bin/python ]] || "$bench_python" -m venv "$venv"
    if (($#)); then
        PIP_CONSTRAINT=$bench_reqs/$name.txt "$@"
    else
        "$venv/bin/pip" install -q --only-binary=:all: -r "$bench_reqs/$name.txt"
    fi
    venv_stamp "$name" >"$venv/.pinned"
    log "  $name ready in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1) on disk"
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# bench_rates: "BATCH IMAGES/S" for each batch size in `resnet-serve bench`'s JSON lines on stdin.
bench_rates() {
    sed -n 's/.*"batch_size":\([0-9]*\),"images_per_second":\([0-9.]*\).*/\1 \2/p'
}

# wrk_summary FILE: "REQ/S P50_MS P99_MS NON_2XX" from a `wrk --latency` report; "0 -1 -1 0" when
# it holds no figures (the server never answered).
wrk_summary() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /m$/) return substr(v, 1, length(v) - 1) * 60000
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return -1
        }
        /Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }  $1 == "99%" { p99 = ms($2) }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        END {
            if (rps == "") { rps = 0; p50 = -1; p99 = -1 }
            printf "%s %s %s %d\n", rps, p50, p99, non2xx
        }' "$1"
}
load_above() { awk -v l="$1" -v m="$2" 'BEGIN { exit !(l > m) }'; }

# shellcheck disable=SC2034  # load_start and load_forced are read by the scripts that source this.
# idle_gate: sets load_start (the 1-minute load average the measurement starts at) and
# load_forced (1 when FORCE=1 let a busy machine through); exits 3 when the machine stays busy.
idle_gate() {
    local max=${LOAD_MAX:-0.5} wait=${LOAD_WAIT:-180} start=$SECONDS
    load_forced=0
    load_start=$(load1)
    while load_above "$load_start" "$max" && ((SECONDS - start < wait)) && [[ ${FORCE:-0} != 1 ]]; do
        log "1-minute load average $load_start > LOAD_MAX=$max: waiting (up to ${wait}s) for the machine to go idle"
        sleep 10
        load_start=$(load1)
    done
    if load_above "$load_start" "$max"; then
        if [[ ${FORCE:-0} == 1 ]]; then
            load_forced=1
            log "WARNING: 1-minute load average $load_start > LOAD_MAX=$max; FORCE=1 so measuring anyway: these figures are not comparable"
        else
            log "refusing to measure: 1-minute load average $load_start > LOAD_MAX=$max (uptime: $(uptime))."
            log "Stop what else runs on this machine, or set LOAD_MAX, or FORCE=1 for figures that must not be reported."
            exit 3
        fi
    fi
    log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
}
