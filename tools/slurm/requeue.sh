# Shared by the job scripts here; they source it from the repository root (the folder sbatch ran
# in: Slurm runs a copy of the script, so its own path says nothing).

# resume_flag TRAIN_ARGS...: prints --resume when the run's <output_dir>/<name>_last.pt exists
# (a requeued job continues it) and the arguments do not already say --resume.
resume_flag() {
  local name="" out=output prev="" arg
  for arg in "$@"; do
    [[ $arg == --resume || $arg == --resume=* ]] && return 0
    case $prev in
      --name) name=$arg ;;
      --output_dir) out=$arg ;;
    esac
    prev=$arg
  done
  if [[ -n $name && -f $out/${name}_last.pt ]]; then
    echo --resume
  fi
}

# run_requeueable JOB COMMAND...: run COMMAND, pass the scheduler's warning (SIGUSR1, sent to this
# shell by `#SBATCH --signal=B:USR1@90`) on to it, and requeue JOB when the run stopped to be
# continued: train.py exits 138 after saving its last state; torchrun reports any failure of its
# workers as 1, so after the warning every non-zero code counts. Returns COMMAND's exit code.
run_requeueable() {
  local job=$1 warned=0 pid rc
  shift
  trap 'warned=1; kill -USR1 "$pid" 2>/dev/null' USR1
  "$@" &
  pid=$!
  wait "$pid"
  rc=$?
  while kill -0 "$pid" 2>/dev/null; do # a trapped signal ends `wait` early
    wait "$pid"
    rc=$?
  done
  trap - USR1
  if ((rc == 138 || (warned && rc != 0))); then
    echo "Stopped before the time limit with its state saved (exit $rc): requeueing $job," \
      "which continues it with --resume."
    scontrol requeue "$job"
  fi
  return "$rc"
}
