#!/usr/bin/env bash
# End-to-end check of start_local_slurm.sh / stop_local_slurm.sh:
#   tests/slurm/smoke_local_slurm.sh [STATE_DIR]
# Starts the cluster, runs GPU jobs, an array job, a python-by-absolute-path
# job, an env-inheritance check, scancel, idempotent re-start, stop, and
# start-after-stop; stops the cluster at the end.  Exit 0 = all good.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
S="${1:-${TUNEFLEET_SLURM_DIR:-/tmp/tunefleet-slurm}}"
fail() { echo "SMOKE FAIL: $*" >&2; exit 1; }
ms() { date +%s%3N; }

t=$(ms); eval "$("$HERE/start_local_slurm.sh" "$S")"; echo "start: $(( $(ms) - t )) ms"
S="$TUNEFLEET_SLURM_DIR"
[[ -f "$SLURM_CONF" ]] || fail "SLURM_CONF not exported"

wait_done() {  # wait_done JOBID... : until none of them is pending/running
    local n
    for (( n = 0; n < 300; n++ )); do
        [[ -z "$(squeue -h -j "$(IFS=,; echo "$*")" -t PD,R,CG,CF -o %i 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
    fail "jobs $* did not finish"
}
state() { scontrol show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1; }

rm -f "$S"/smoke-*.txt
export SMOKE_MARKER="inherited-$$"
PY="$(python3 -c 'import sys; print(sys.executable)')"  # absolute interpreter path
g1=$(sbatch --parsable --gres=gpu:1 -o "$S/smoke-%j.txt" --wrap 'echo $CUDA_VISIBLE_DEVICES; sleep 2')
g2=$(sbatch --parsable --gres=gpu:1 -o "$S/smoke-%j.txt" --wrap 'echo $CUDA_VISIBLE_DEVICES; sleep 2')
arr=$(sbatch --parsable --array=0-2%2 -o "$S/smoke-%A_%a.txt" --wrap 'echo task=$SLURM_ARRAY_TASK_ID')
py=$(sbatch --parsable -o "$S/smoke-%j.txt" --wrap "$PY -c 'import os,sys; print(sys.executable, os.environ[\"SMOKE_MARKER\"])'")
squeue >/dev/null || fail "squeue"
scontrol show job "$g1" | grep -q 'TresPerNode=gres:gpu:1' || fail "scontrol show job"
t=$(ms); wait_done "$g1" "$g2" "$arr" "$py"; echo "jobs finished in $(( $(ms) - t )) ms"

gpus="$(cat "$S/smoke-$g1.txt" "$S/smoke-$g2.txt" | sort | tr '\n' ' ')"
[[ "$gpus" == "0 1 " ]] || fail "CUDA_VISIBLE_DEVICES of the two gpu:1 jobs: '$gpus'"
for i in 0 1 2; do
    grep -qx "task=$i" "$S/smoke-${arr}_$i.txt" || fail "array task $i output"
done
grep -qx "$PY $SMOKE_MARKER" "$S/smoke-$py.txt" || fail "python/env job: $(cat "$S/smoke-$py.txt")"
for j in "$g1" "$g2" "$py"; do [[ "$(state "$j")" == COMPLETED ]] || fail "job $j state $(state "$j")"; done

long=$(sbatch --parsable -o /dev/null --wrap 'sleep 300')
for (( n = 0; n < 100; n++ )); do [[ "$(state "$long")" == RUNNING ]] && break; sleep 0.1; done
scancel "$long"
for (( n = 0; n < 100; n++ )); do [[ "$(state "$long")" == CANCELLED ]] && break; sleep 0.1; done
[[ "$(state "$long")" == CANCELLED ]] || fail "scancel: state $(state "$long")"

t=$(ms); "$HERE/start_local_slurm.sh" "$S" >/dev/null 2>&1; echo "idempotent re-start: $(( $(ms) - t )) ms"

pids="$(cat "$S"/pids/*.pid)"
t=$(ms); "$HERE/stop_local_slurm.sh" "$S" 2>/dev/null; echo "stop: $(( $(ms) - t )) ms"
for p in $pids; do [[ ! -d /proc/$p ]] || fail "pid $p still alive after stop"; done
compgen -G "$S/pids/*.pid" >/dev/null && fail "pid files left after stop"

t=$(ms); eval "$("$HERE/start_local_slurm.sh" "$S" 2>/dev/null)"; echo "start after stop: $(( $(ms) - t )) ms"
j=$(sbatch --parsable -o /dev/null --wrap true); wait_done "$j"
[[ "$(state "$j")" == COMPLETED ]] || fail "job after restart: $(state "$j")"
"$HERE/stop_local_slurm.sh" "$S" 2>/dev/null
rm -f "$S"/smoke-*.txt
echo "SMOKE OK"
