#!/usr/bin/env bash
# Stop the single-node SLURM test cluster started by start_local_slurm.sh.
#
#   tests/slurm/stop_local_slurm.sh [STATE_DIR]
#
# STATE_DIR defaults to ${TUNEFLEET_SLURM_DIR:-/tmp/tunefleet-slurm}.
# Only the daemons recorded in STATE_DIR/pids/<name>.pid are stopped (and only
# if the PID still belongs to that daemon of this STATE_DIR): SIGTERM, up to
# 10 s grace, then SIGKILL.  Jobs still queued/running in this cluster are
# cancelled first so no slurmstepd/job processes are left behind.  A reused
# system-wide munged is never touched.  STATE_DIR itself is kept (rm -rf it to
# reset job ids/state).  Exits 0 when nothing was running.
set -uo pipefail

export PATH="/usr/sbin:/sbin:/usr/bin:/bin:${PATH:-}"
export LC_ALL=C
PROG=stop_local_slurm
log() { echo "$PROG: $*" >&2; }

S="${1:-${TUNEFLEET_SLURM_DIR:-/tmp/tunefleet-slurm}}"
if [[ ! -d "$S" ]]; then
    log "no state dir $S; nothing to stop"
    exit 0
fi
S="$(cd "$S" && pwd -P)"
PIDS="$S/pids"
CONF="$S/etc/slurm.conf"
if [[ ! -d "$PIDS" ]] || ! compgen -G "$PIDS/*.pid" >/dev/null; then
    log "nothing recorded in $PIDS; nothing to stop"
    exit 0
fi

exec 9>"$S/.lock"
flock -w 300 9 || { log "could not lock $S/.lock"; exit 1; }

is_ours() {  # is_ours NAME PID MARKER
    local name=$1 pid=$2 marker=$3 comm cmd
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name" ]] || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd" == *"$marker"* ]]
}

# munged started by us has its socket (AuthInfo=socket=...) on its command line
MSOCK="$(sed -n 's/^AuthInfo=.*socket=\([^,]*\).*/\1/p' "$CONF" 2>/dev/null | head -n1)"

marker_for() {
    case $1 in
        munged) echo "--socket=${MSOCK:-/nonexistent}" ;;
        *) echo "$CONF" ;;
    esac
}

pid_of() {  # pid_of NAME -> echoes recorded pid if it is still our daemon
    local f="$PIDS/$1.pid" pid
    [[ -f "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    is_ours "$1" "$pid" "$(marker_for "$1")" && echo "$pid"
}

# 1. cancel this cluster's jobs while slurmctld + slurmd are still there
if ctld=$(pid_of slurmctld) && pid_of slurmd >/dev/null; then
    export SLURM_CONF="$CONF"
    jobs="$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs >/dev/null 2>&1 || true
        for (( n = 0; n < 150; n++ )); do   # KillWait=5 -> usually < 6 s
            left="$(squeue -h -t RUNNING,COMPLETING,CONFIGURING,SUSPENDED -o '%A' 2>/dev/null)"
            [[ -z "$left" ]] && break
            sleep 0.1
        done
    fi
fi

# 2. terminate the daemons: slurmd + slurmctld together, munged last
stop_group() {
    local name pid n alive
    declare -A pids=()
    for name in "$@"; do
        if pid="$(pid_of "$name")"; then
            pids[$name]=$pid
            kill -TERM "$pid" 2>/dev/null || true
            log "sent SIGTERM to $name (pid $pid)"
        else
            [[ -f "$PIDS/$name.pid" ]] && log "$name (pid $(cat "$PIDS/$name.pid")) not running"
        fi
    done
    for (( n = 0; n < 100; n++ )); do
        alive=0
        for name in "${!pids[@]}"; do [[ -d /proc/${pids[$name]} ]] && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        if is_ours "$name" "$pid" "$(marker_for "$name")"; then
            log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$PIDS/$name.pid"; done
}
stop_group slurmd slurmctld
stop_group munged
log "stopped (state kept in $S)"
exit 0
