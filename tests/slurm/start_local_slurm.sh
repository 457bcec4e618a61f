#!/usr/bin/env bash
# Start (or re-use) a real single-node SLURM cluster for tunefleet's tests.
#
#   tests/slurm/start_local_slurm.sh [STATE_DIR]
#
# STATE_DIR defaults to ${TUNEFLEET_SLURM_DIR:-/tmp/tunefleet-slurm}.
# Everything (config, state, spool, logs, pid files, fake GPU device nodes,
# private munge socket/key) lives under STATE_DIR.  Only the daemons this
# script starts are recorded in STATE_DIR/pids/<name>.pid (what
# stop_local_slurm.sh stops).
#
# stdout: only the `export ...` lines a caller needs (so `eval "$(...)"` works);
#         the same lines are written to STATE_DIR/env.sh.
# stderr: progress and errors.  Exit status non-zero (with a one-line reason
#         plus a log tail) when SLURM cannot be installed or does not come up.
#
# Optional environment knobs (changing one rewrites slurm.conf and restarts the
# slurm daemons started by this script):
#   TUNEFLEET_SLURM_GPUS          number of fake GPUs on the node   (default 2)
#   TUNEFLEET_SLURM_CPUS          CPUs to advertise (default: real count from
#                                 `slurmd -C`; a larger value oversubscribes)
#   TUNEFLEET_SLURMCTLD_PORT      slurmctld port                     (default 6817)
#   TUNEFLEET_SLURMD_PORT         slurmd port                        (default 6818)
#   TUNEFLEET_SLURM_START_TIMEOUT seconds to wait for the node to be idle (60)
set -euo pipefail

export PATH="/usr/sbin:/sbin:/usr/bin:/bin:${PATH:-}"
export LC_ALL=C

PROG=start_local_slurm
log() { echo "$PROG: $*" >&2; }
STARTED_NOW=()   # "name:marker" of daemons started by this invocation
die() {
    echo "$PROG: ERROR: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "---- tail of $2 ----" >&2
        tail -n 25 "$2" >&2 || true
    fi
    # do not leak what this invocation started (newest first)
    local i name marker pid n
    for (( i = ${#STARTED_NOW[@]} - 1; i >= 0; i-- )); do
        name=${STARTED_NOW[$i]%%:*}; marker=${STARTED_NOW[$i]#*:}
        pid="$(cat "$PIDS/$name.pid" 2>/dev/null || true)"
        if is_ours "$name" "$pid" "$marker"; then
            kill -TERM "$pid" 2>/dev/null || true
            for (( n = 0; n < 50; n++ )); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
            [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null
            echo "$PROG: stopped $name (pid $pid) started by this call" >&2
        fi
        rm -f "$PIDS/$name.pid"
    done
    exit 1
}

[[ $EUID -eq 0 ]] || die "must run as root (slurmd and munged need it)"

S="${1:-${TUNEFLEET_SLURM_DIR:-/tmp/tunefleet-slurm}}"
mkdir -p "$S" || die "cannot create state dir $S"
S="$(cd "$S" && pwd -P)"
if (( ${#S} > 60 )); then
    log "WARNING: STATE_DIR '$S' is long; unix socket paths under it may exceed 107 chars"
fi

NGPUS="${TUNEFLEET_SLURM_GPUS:-2}"
CTLD_PORT="${TUNEFLEET_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${TUNEFLEET_SLURMD_PORT:-6818}"
TIMEOUT="${TUNEFLEET_SLURM_START_TIMEOUT:-60}"
[[ "$NGPUS" =~ ^[0-9]+$ ]] || die "TUNEFLEET_SLURM_GPUS must be an integer"

ETC="$S/etc"; PIDS="$S/pids"; RUN="$S/run"; LOGD="$S/log"; DEV="$S/dev"
CONF="$ETC/slurm.conf"
mkdir -p "$ETC" "$PIDS" "$RUN" "$LOGD" "$DEV" "$S/state/slurmctld" "$S/spool/slurmd"
chmod 755 "$S"

# Serialise concurrent start/stop calls on the same STATE_DIR.
exec 9>"$S/.lock"
flock -w 300 9 || die "could not lock $S/.lock within 300 s"

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
# is_ours NAME PID MARKER: PID is alive, its comm is NAME, its cmdline has MARKER
is_ours() {
    local name=$1 pid=$2 marker=$3 comm cmd
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name" ]] || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd" == *"$marker"* ]]
}
# recorded_alive NAME MARKER: the daemon recorded in pids/NAME.pid is running
recorded_alive() {
    local f="$PIDS/$1.pid"
    [[ -f "$f" ]] || return 1
    is_ours "$1" "$(cat "$f" 2>/dev/null)" "$2"
}
munge_ok() {  # munge_ok SOCKET
    [[ -S "$1" ]] || return 1
    munge -n -S "$1" 2>/dev/null | unmunge -S "$1" >/dev/null 2>&1
}
port_listening() {  # port_listening PORT -> 0 if some process listens on it
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR>1 && $4=="0A" && substr($2, length($2)-4)==p {f=1} END{exit !f}' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# wait_pidfile FILE NAME MARKER SECONDS -> echoes pid once FILE names a live daemon
wait_pidfile() {
    local f=$1 name=$2 marker=$3 n=$(( $4 * 10 )) pid
    while (( n-- > 0 )); do
        if [[ -s "$f" ]]; then
            pid="$(tr -dc '0-9' <"$f")"
            if is_ours "$name" "$pid" "$marker"; then echo "$pid"; return 0; fi
        fi
        sleep 0.1
    done
    return 1
}
# detached DAEMON launch: stdin /dev/null, stdout/stderr to LOG, every other fd
# closed (the daemons must not inherit our lock fd or a caller's pipes, or
# `subprocess.run(..., capture_output=True)` / flock would wait on them forever)
launch() {  # launch LOG CMD...
    local logf=$1; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            (( fd > 2 )) && eval "exec $fd>&-"
        done 2>/dev/null
        exec "$@" </dev/null >>"$logf" 2>&1
    )
}
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }
node_up() {  # idle / mixed / allocated / completing, and responding (no '*')
    local st re='^(idle|mixed|allocated|completing)[-+~#!%$@^]*$'
    st="$(node_state)"
    [[ "$st" =~ $re ]]
}

# --------------------------------------------------------------------------
# 1. install packages if needed
# --------------------------------------------------------------------------
missing=()
for c in sbatch squeue scancel scontrol sinfo slurmctld slurmd munged munge unmunge; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if (( ${#missing[@]} )); then
    log "installing slurm-wlm + munge (missing: ${missing[*]}) ..."
    t0=$SECONDS
    command -v apt-get >/dev/null 2>&1 || die "apt-get not available; cannot install SLURM"
    {
        apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o DPkg::Lock::Timeout=300 slurm-wlm munge
    } >"$LOGD/apt.log" 2>&1 || die "apt-get install of slurm-wlm/munge failed" "$LOGD/apt.log"
    for c in "${missing[@]}"; do
        command -v "$c" >/dev/null 2>&1 || die "'$c' still missing after installing slurm-wlm/munge" "$LOGD/apt.log"
    done
    log "installed in $((SECONDS - t0)) s"
fi
getent passwd munge >/dev/null || die "user 'munge' does not exist (munge package broken?)"

# --------------------------------------------------------------------------
# 2. munge: our own munged in STATE_DIR, else a working system-wide one,
#    else start our own (private socket + private key; /etc/munge untouched)
# --------------------------------------------------------------------------
SYS_SOCK=/run/munge/munge.socket.2
# The munge user must be able to reach its dir; if STATE_DIR sits below a
# root-only (0700) directory, or the path is too long for a unix socket,
# fall back to a short dir in /tmp keyed by STATE_DIR.
MDIR="$S/munge"
if ! setpriv --reuid=munge --regid=munge --clear-groups test -x "$S" 2>/dev/null \
   || (( ${#MDIR} > 80 )); then
    MDIR="/tmp/tunefleet-munge-$(printf '%s' "$S" | cksum | cut -d' ' -f1)"
fi
MSOCK="$MDIR/munge.socket.2"

start_munged() {
    mkdir -p "$MDIR"
    chown munge:munge "$MDIR"
    chmod 0755 "$MDIR"
    if [[ ! -s "$MDIR/munge.key" ]]; then
        rm -f "$MDIR/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            setpriv --reuid=munge --regid=munge --clear-groups \
                mungekey --create --keyfile="$MDIR/munge.key" >/dev/null 2>&1 || true
        fi
        if [[ ! -s "$MDIR/munge.key" ]]; then
            dd if=/dev/urandom of="$MDIR/munge.key" bs=1024 count=1 status=none
        fi
        chown munge:munge "$MDIR/munge.key"
        chmod 0400 "$MDIR/munge.key"
    fi
    rm -f "$MDIR/munged.pid"
    launch "$LOGD/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        munged --force --socket="$MSOCK" --key-file="$MDIR/munge.key" \
        --pid-file="$MDIR/munged.pid" --log-file="$MDIR/munged.log" \
        --seed-file="$MDIR/munged.seed" \
        || die "munged failed to start" "$MDIR/munged.log"
    local pid
    pid="$(wait_pidfile "$MDIR/munged.pid" munged "$MSOCK" 10)" \
        || die "munged did not start" "$MDIR/munged.log"
    echo "$pid" >"$PIDS/munged.pid"
    STARTED_NOW+=("munged:""$MSOCK")
    local n=50
    until munge_ok "$MSOCK"; do
        (( n-- > 0 )) || die "munged (pid $pid) does not answer on $MSOCK" "$MDIR/munged.log"
        sleep 0.1
    done
    log "started munged (pid $pid, socket $MSOCK)"
}

if recorded_alive munged "$MSOCK" && munge_ok "$MSOCK"; then
    SOCK="$MSOCK"
elif munge_ok "$MSOCK"; then
    SOCK="$MSOCK"            # someone else's munged on our socket: use, don't own
    rm -f "$PIDS/munged.pid"
elif munge_ok "$SYS_SOCK"; then
    SOCK="$SYS_SOCK"
    rm -f "$PIDS/munged.pid"
    log "re-using the already running munged on $SYS_SOCK (not started by us)"
else
    if [[ -f "$PIDS/munged.pid" ]]; then
        # recorded but broken: stop it before starting a fresh one
        old="$(cat "$PIDS/munged.pid" 2>/dev/null || true)"
        if is_ours munged "$old" "$MSOCK"; then kill -TERM "$old" 2>/dev/null || true; sleep 1; fi
        rm -f "$PIDS/munged.pid"
    fi
    start_munged
    SOCK="$MSOCK"
fi

# --------------------------------------------------------------------------
# 3. configuration (rewritten only when its content changes)
# --------------------------------------------------------------------------
NODE="$(hostname -s 2>/dev/null || true)"
[[ "$NODE" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || NODE=localhost

HWC="$(slurmd -C 2>/dev/null | head -n1)" || true
hw() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$HWC"; }
CPUS="$(hw CPUs)"; BOARDS="$(hw Boards)"; SPB="$(hw SocketsPerBoard)"
CPS="$(hw CoresPerSocket)"; TPC="$(hw ThreadsPerCore)"
[[ -n "$CPUS" ]] || CPUS="$(nproc)"
mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
REALMEM=$(( mem_kb / 1024 * 9 / 10 ))
if [[ -n "${TUNEFLEET_SLURM_CPUS:-}" && "${TUNEFLEET_SLURM_CPUS}" != "$CPUS" ]]; then
    [[ "$TUNEFLEET_SLURM_CPUS" =~ ^[1-9][0-9]*$ ]] || die "TUNEFLEET_SLURM_CPUS must be a positive integer"
    CPUS="$TUNEFLEET_SLURM_CPUS"
    TOPO="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
    SLURMD_PARAMS="SlurmdParameters=config_overrides"
elif [[ -n "$BOARDS" && -n "$SPB" && -n "$CPS" && -n "$TPC" ]]; then
    TOPO="CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC"
    SLURMD_PARAMS="#SlurmdParameters="
else
    TOPO="CPUs=$CPUS"
    SLURMD_PARAMS="#SlurmdParameters="
fi
DEFMEM=$(( REALMEM / CPUS ))
if (( NGPUS > 0 )); then
    GRES_NODE="Gres=gpu:$NGPUS"
else
    GRES_NODE=""
fi

new="$(mktemp "$ETC/.slurm.conf.XXXXXX")"
cat >"$new" <<EOF
# Generated by tests/slurm/start_local_slurm.sh -- single-node test cluster.
ClusterName=tunefleet
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$S/state/slurmctld
SlurmdSpoolDir=$S/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGD/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
GresTypes=gpu
ReturnToService=2
# keep finished jobs visible to squeue/scontrol for 10 min (no accounting DB)
MinJobAge=600
KillWait=5
InactiveLimit=0
MailProg=/bin/true
# start submitted jobs right away (default batch_sched_delay=3 s adds ~2 s/job)
SchedulerParameters=batch_sched_delay=0
$SLURMD_PARAMS
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $TOPO RealMemory=$REALMEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if (( NGPUS > 0 )); then
    gres_line="NodeName=$NODE Name=gpu File=$DEV/nvidia[0-$((NGPUS - 1))]"
    (( NGPUS > 1 )) || gres_line="NodeName=$NODE Name=gpu File=$DEV/nvidia0"
else
    gres_line="# no fake GPUs (TUNEFLEET_SLURM_GPUS=0)"
fi
printf '# Generated by tests/slurm/start_local_slurm.sh -- fake GPUs (char devices 1,3 = /dev/null)\nAutoDetect=off\n%s\n' \
    "$gres_line" >"$new.gres"

CONF_CHANGED=0
install_if_changed() {  # install_if_changed NEW DEST
    if [[ -f "$2" ]] && cmp -s "$1" "$2"; then rm -f "$1"; else mv -f "$1" "$2"; chmod 644 "$2"; CONF_CHANGED=1; fi
}
install_if_changed "$new" "$CONF"
install_if_changed "$new.gres" "$ETC/gres.conf"

# fake GPU device nodes
for (( i = 0; i < NGPUS; i++ )); do
    if [[ ! -c "$DEV/nvidia$i" ]]; then
        rm -f "$DEV/nvidia$i"
        mknod "$DEV/nvidia$i" c 1 3 || die "mknod $DEV/nvidia$i failed (need CAP_MKNOD)"
        chmod 666 "$DEV/nvidia$i"
    fi
done

export SLURM_CONF="$CONF"

# --------------------------------------------------------------------------
# 4. daemons
# --------------------------------------------------------------------------
stop_recorded() {  # stop_recorded NAME  (only if it is ours)
    local f="$PIDS/$1.pid" pid n
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f" 2>/dev/null || true)"
    if is_ours "$1" "$pid" "$CONF"; then
        kill -TERM "$pid" 2>/dev/null || true
        for (( n = 0; n < 100; n++ )); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if (( CONF_CHANGED )); then
    if recorded_alive slurmctld "$CONF" || recorded_alive slurmd "$CONF"; then
        log "configuration changed: restarting our slurm daemons"
    fi
    stop_recorded slurmd
    stop_recorded slurmctld
fi

write_env() {
    local envf="$S/env.sh"
    {
        echo "export SLURM_CONF=$CONF"
        echo "export TUNEFLEET_SLURM_DIR=$S"
    } >"$envf.tmp"
    mv -f "$envf.tmp" "$envf"
    cat "$envf"
}

# fast path: everything already up
if recorded_alive slurmctld "$CONF" && recorded_alive slurmd "$CONF" && node_up; then
    log "cluster in $S already up (node $NODE: $(node_state))"
    write_env
    exit 0
fi

started_any=0
if ! recorded_alive slurmctld "$CONF"; then
    rm -f "$PIDS/slurmctld.pid"
    if port_listening "$CTLD_PORT"; then
        die "port $CTLD_PORT is already in use by another process (set TUNEFLEET_SLURMCTLD_PORT)"
    fi
    rm -f "$RUN/slurmctld.pid"
    t0=$SECONDS
    launch "$LOGD/slurmctld.out" slurmctld -f "$CONF" \
        || die "slurmctld failed to start" "$LOGD/slurmctld.log"
    pid="$(wait_pidfile "$RUN/slurmctld.pid" slurmctld "$CONF" 15)" \
        || die "slurmctld did not start" "$LOGD/slurmctld.log"
    echo "$pid" >"$PIDS/slurmctld.pid"
    STARTED_NOW+=("slurmctld:""$CONF")
    log "started slurmctld (pid $pid)"
    started_any=1
    # wait until it answers
    n=$(( 20 * 10 ))
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        (( n-- > 0 )) || die "slurmctld (pid $pid) does not answer" "$LOGD/slurmctld.log"
        is_ours slurmctld "$pid" "$CONF" || die "slurmctld (pid $pid) died" "$LOGD/slurmctld.log"
        sleep 0.1
    done
fi

if ! recorded_alive slurmd "$CONF"; then
    rm -f "$PIDS/slurmd.pid"
    if port_listening "$SLURMD_PORT"; then
        die "port $SLURMD_PORT is already in use by another process (set TUNEFLEET_SLURMD_PORT)"
    fi
    rm -f "$RUN/slurmd.pid"
    launch "$LOGD/slurmd.out" slurmd -f "$CONF" -N "$NODE" \
        || die "slurmd failed to start" "$LOGD/slurmd.log"
    pid="$(wait_pidfile "$RUN/slurmd.pid" slurmd "$CONF" 15)" \
        || die "slurmd did not start" "$LOGD/slurmd.log"
    echo "$pid" >"$PIDS/slurmd.pid"
    STARTED_NOW+=("slurmd:""$CONF")
    log "started slurmd (pid $pid)"
    started_any=1
fi

# --------------------------------------------------------------------------
# 5. wait for the node
# --------------------------------------------------------------------------
deadline=$(( SECONDS + TIMEOUT ))
resumed=0
while ! node_up; do
    st="$(node_state)"
    for d in slurmctld slurmd; do
        recorded_alive "$d" "$CONF" || die "$d died while waiting for node $NODE (state '$st')" "$LOGD/$d.log"
    done
    if (( ! resumed )) && [[ "$st" =~ ^(drain|drained|draining|down)$ ]]; then
        # slurmd is up and responding but the node was left drained/down
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        resumed=1
    fi
    if (( SECONDS >= deadline )); then
        reason="$(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null | head -n1)"
        die "node $NODE not idle after ${TIMEOUT} s (state '$st', reason '$reason')" "$LOGD/slurmd.log"
    fi
    sleep 0.2
done

# --------------------------------------------------------------------------
# 6. end-to-end probe after a (re)start: slurmctld only starts scheduling ~3 s
#    after it comes up, and this proves that munge + slurmd can launch a job.
#    TUNEFLEET_SLURM_PROBE=0 skips it.
# --------------------------------------------------------------------------
if (( started_any )) && [[ "${TUNEFLEET_SLURM_PROBE:-1}" != 0 ]]; then
    probe="$(sbatch --parsable --job-name=tunefleet-startup-probe -o /dev/null -e /dev/null \
        --wrap true 2>"$LOGD/probe.err")" || die "probe job submission failed: $(head -n1 "$LOGD/probe.err")" "$LOGD/slurmctld.log"
    probe="${probe%%;*}"
    pst=""
    while :; do
        pst="$(scontrol show job "$probe" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1)"
        [[ "$pst" == COMPLETED ]] && break
        case "$pst" in
            FAILED|CANCELLED|NODE_FAIL|BOOT_FAIL|TIMEOUT|OUT_OF_MEMORY|DEADLINE)
                die "probe job $probe ended $pst" "$LOGD/slurmd.log" ;;
        esac
        (( SECONDS < deadline + 30 )) || die "probe job $probe not completed (state '$pst')" "$LOGD/slurmctld.log"
        sleep 0.2
    done
fi
log "cluster up in $S (node $NODE: $(node_state), ${CPUS} CPUs, ${NGPUS} fake GPUs)"
write_env
