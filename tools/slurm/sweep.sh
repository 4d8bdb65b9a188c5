#!/bin/bash
# The whole sweep.py protocol as Slurm jobs, each waiting for the one before (afterok):
#   1. the grid, a job array of one train.py run per learning rate (sweep_task.sbatch);
#   2. a step that chooses the rate and lists the final runs (sweep_step.sbatch);
#   3. the final runs, a job array of one run per seed;
#   4. a step that collects the summary (<output_dir>/<name>_sweep.md).
#
#   tools/slurm/sweep.sh --name c10-b16 --dataset cifar10 --model_type ViT-B_16 \
#       --pretrained_dir checkpoint/ViT-B_16.npz --seeds 3 --output_dir /shared/vit/output
#
# Run it on a login node from the repository root, with sweep.py's flags; --output_dir must be
# a folder every node sees. Run it again after a failure: finished runs are not run again.
# SBATCH_* variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...) reach every job it submits.
set -euo pipefail

out="" name="" seeds=1 prev=""
for arg in "$@"; do
  case $prev in
    --output_dir) out=$arg ;;
    --name) name=$arg ;;
    --seeds) seeds=$arg ;;
  esac
  prev=$arg
done
if [[ -z $out || -z $name ]]; then
  echo "error: pass --name and --output_dir (a folder every node sees): the jobs share the" \
    "sweep's files there." >&2
  exit 2
fi
here=tools/slurm
plans=$out/${name}_slurm
mkdir -p "$plans"

# What is still to run: the grid, or, when it is done, the final runs (the steps below then
# find nothing more to do and pass on at once).
python3 sweep.py "$@" --print_commands >"$plans/grid.txt"
runs=$(wc -l <"$plans/grid.txt")
after=()
if ((runs > 0)); then
  grid=$(sbatch --parsable --job-name="$name-grid" --array="0-$((runs - 1))" \
    "$here/sweep_task.sbatch" "$plans/grid.txt")
  after=(--dependency="afterok:$grid")
  echo "Grid: job array $grid, $runs run(s) ($plans/grid.txt)."
fi
choose=$(sbatch --parsable "${after[@]}" --job-name="$name-choose" \
  "$here/sweep_step.sbatch" "$plans/final.txt" "$@" --print_commands)
final=$(sbatch --parsable --dependency="afterok:$choose" --job-name="$name-final" \
  --array="0-$((seeds - 1))" "$here/sweep_task.sbatch" "$plans/final.txt")
collect=$(sbatch --parsable --dependency="afterok:$final" --job-name="$name-collect" \
  "$here/sweep_step.sbatch" "$plans/summary.md" "$@" --collect)
echo "Final runs: job $choose lists them ($plans/final.txt), job array $final runs them."
echo "Summary: job $collect writes $out/${name}_sweep.md."
