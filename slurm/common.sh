# Sourced by the sbatch scripts (bash; they find it with `sfd slurm-script --path common.sh`, so a copy of a
# script elsewhere still does): `sfd_srun ARGS...` runs `srun ARGS...` with signal forwarding and self-requeue,
# then exits the batch script with the job's status.
#
# Why: `#SBATCH --signal=B:USR1@N` and `scancel --signal=USR1 --batch` reach only this batch shell, not the
# tasks of the srun step; and a batch shell that just exits ends the job COMPLETED, never requeued. So:
# - USR1 and TERM are forwarded to srun, which passes them on to every task (verified on a real cluster);
#   the trainer finishes its step, writes a checkpoint and exits 75. The shell keeps waiting for srun:
#   if it exited, SLURM would end the job and kill the tasks in the middle of their checkpoint.
# - srun ending with 75 ("checkpoint written, please requeue": REQUEUE_EXIT in sfd_scale/train/trainer.py,
#   on USR1 or at train.time_budget_s) -> `scontrol requeue`: the job restarts under the same id with
#   SLURM_RESTART_COUNT + 1, and the trainer resumes from its newest verified checkpoint.
# - Never after a TERM: that is `scancel` (stop: requeueing would undo it), the time limit (USR1 came
#   first), or a preemption (PreemptMode=REQUEUE requeues the job itself). The trainer still checkpoints.

SFD_REQUEUE_EXIT=75
_sfd_srun_pid=
_sfd_got=

echo "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s) at $(date '+%F %T')"

_sfd_forward() {  # trap handler: note the signal, pass it on to srun (if running)
    _sfd_got="$_sfd_got $1"
    echo "batch shell got SIG$1 at $(date '+%F %T'): forwarding to srun${_sfd_srun_pid:+ (pid $_sfd_srun_pid)}"
    [ -z "$_sfd_srun_pid" ] || kill -s "$1" "$_sfd_srun_pid" 2>/dev/null || true
}

trap '_sfd_forward USR1' USR1  # from now on: a signal before srun runs is passed on once it does
trap '_sfd_forward TERM' TERM

sfd_srun() {
    srun "$@" &
    _sfd_srun_pid=$!
    case "$_sfd_got" in *USR1*|*TERM*) kill -s "${_sfd_got##* }" "$_sfd_srun_pid" 2>/dev/null || true ;; esac
    local rc prev="" seen
    while :; do  # a trapped signal interrupts `wait` with status > 128: wait again until srun has ended
        seen=$_sfd_got
        rc=0; wait "$_sfd_srun_pid" || rc=$?
        if [ "$rc" -eq 127 ] && [ -n "$prev" ]; then rc=$prev; break; fi  # srun was already reaped
        [ "$seen" != "$_sfd_got" ] && [ "$rc" -gt 128 ] || break
        prev=$rc
    done
    echo "srun exited with $rc at $(date '+%F %T')"
    case "$_sfd_got" in
        *TERM*) ;;  # stopping (scancel, time limit, preemption): no requeue of our own
        *)  # 75: checkpoint written; 128+10: a USR1 came before the trainer had set up its handler
            if [ "$rc" -eq "$SFD_REQUEUE_EXIT" ] || { [ "$rc" -eq 138 ] && [ -n "$_sfd_got" ]; }; then
                echo "requeueing job $SLURM_JOB_ID"
                scontrol requeue "$SLURM_JOB_ID" && exit 0
                echo "scontrol requeue failed: resubmit the same command to continue"
            fi ;;
    esac
    exit "$rc"
}
