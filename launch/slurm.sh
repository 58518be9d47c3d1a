#!/usr/bin/env bash
# Writes and submits a Slurm batch job that runs one dqvq command on GPU nodes.
#
# No coordinator flags are passed: under `srun`, jax.distributed.initialize()
# reads the job layout from SLURM_* variables (coordinator = first node,
# process id = SLURM_PROCID) and, with one process per GPU, gives each process
# the GPU numbered SLURM_LOCALID. That is why tasks are NOT bound to GPUs here
# (no --gpus-per-task): every task must see all of its node's GPUs for those
# ids to exist. With one process per node, JAX_LOCAL_DEVICE_IDS lists all the
# node's GPUs, since the automatic choice would leave that process one GPU.
set -euo pipefail

prog=$(basename "$0")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --nodes N --gpus-per-node G [options] [-- ARGS...]

Writes an sbatch script that runs \`srun PYTHON -m MODULE ARGS\` on N nodes
with G GPUs each, and submits it with sbatch. Logs go to %x-%j.out
(job name - job id) in the directory you submit from.

Options:
  --nodes N               nodes (required)
  --gpus-per-node G       GPUs per node (required)
  --per-node              one process per node that drives all its GPUs
                          (default: one process per GPU, --ntasks-per-node=G)
  --partition NAME        Slurm partition
  --account NAME          Slurm account
  --time LIMIT            time limit, e.g. 24:00:00 or 2-00:00:00
  --job-name NAME         job name (default dqvq)
  --cpus-per-task C       CPUs per process (Slurm's default of 1 starves the
                          input pipeline; set it)
  --output-dir DIR        where %x-%j.out goes (default: submit directory)
  --sbatch-flag FLAG      extra #SBATCH line, e.g. --sbatch-flag=--exclusive
                          (repeatable)
  --setup COMMAND         shell line run on the first node before srun, e.g.
                          'module load cuda' (repeatable, in order)
  --module MODULE         python module to run (default dqvq.train)
  --python PYTHON         interpreter on the nodes (default python3: sbatch
                          passes your environment, so an active venv works)
  --env NAME=VALUE        exported in the job (repeatable)
  --script FILE           where to write the batch script (default
                          \${TMPDIR:-/tmp}/dqvq_launch/JOB-TIMESTAMP.sbatch)
  --dry-run               print the batch script and the sbatch command only
  -h, --help              show this help

Arguments after \`--\` go to the python command unchanged. Use absolute or
shared paths for --workdir: every node writes checkpoints there.

Example (2 nodes x 8 GPUs, 16 processes):
  $prog --nodes 2 --gpus-per-node 8 --partition gpu --time 48:00:00 \\
      --cpus-per-task 12 -- \\
      --config configs/imagenet_stage1.py --workdir /shared/runs/in_stage1
EOF
}

# die_usage, quote, check_module_python_env (uses $prog and usage).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nodes=''
gpus_per_node=''
per_node=0
partition=''
account=''
time_limit=''
job_name=dqvq
cpus_per_task=''
output_dir=''
sbatch_flags=()
setup=()
module=dqvq.train
python=python3
extra_env=()
script=''
dry_run=0
args=()

while (($#)); do
  split_option "$1"
  case $opt in
    -h | --help) usage; exit 0 ;;
    --) shift; args=("$@"); break ;;
    --dry-run | --per-node) flag_option ;;
    --nodes | --gpus-per-node | --partition | --account | --time | \
      --job-name | --cpus-per-task | --output-dir | --sbatch-flag | \
      --setup | --module | --python | --env | --script)
      value_option "$@"
      ;;
    *) die_usage "unknown argument '$1' (python flags go after --)" ;;
  esac
  shift "$taken"
  case $opt in
    --dry-run) dry_run=1 ;;
    --per-node) per_node=1 ;;
    --nodes) nodes=$value ;;
    --gpus-per-node) gpus_per_node=$value ;;
    --partition) partition=$value ;;
    --account) account=$value ;;
    --time) time_limit=$value ;;
    --job-name) job_name=$value ;;
    --cpus-per-task) cpus_per_task=$value ;;
    --output-dir) output_dir=$value ;;
    --sbatch-flag) sbatch_flags+=("$value") ;;
    --setup) setup+=("$value") ;;
    --module) module=$value ;;
    --python) python=$value ;;
    --env) extra_env+=("$value") ;;
    --script) script=$value ;;
  esac
done

positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
[[ -n $nodes ]] || die_usage "--nodes is required"
[[ -n $gpus_per_node ]] || die_usage "--gpus-per-node is required"
positive "$nodes" ||
  die_usage "--nodes must be a positive integer, got '$nodes'"
positive "$gpus_per_node" ||
  die_usage "--gpus-per-node must be a positive integer, got '$gpus_per_node'"
[[ -z $cpus_per_task ]] || positive "$cpus_per_task" ||
  die_usage "--cpus-per-task must be a positive integer, got '$cpus_per_task'"
# sbatch reads #SBATCH lines word by word: values cannot hold spaces.
for pair in "partition=$partition" "account=$account" "time=$time_limit" \
  "job-name=$job_name" "output-dir=$output_dir"; do
  [[ ${pair#*=} != *[[:space:]]* ]] ||
    die_usage "--${pair%%=*} cannot contain whitespace, got '${pair#*=}'"
done
[[ -n $job_name && $job_name != */* ]] ||
  die_usage "--job-name must be non-empty without '/', got '$job_name'"
for f in ${sbatch_flags[@]+"${sbatch_flags[@]}"}; do
  [[ $f == -* && $f != *[[:space:]]* ]] ||
    die_usage "--sbatch-flag takes one sbatch option like --exclusive, got '$f'"
done
check_module_python_env
for a in ${args[@]+"${args[@]}"}; do
  case $a in
    --coordinator_address* | --num_processes* | --process_id*)
      die_usage "do not pass '$a' after --: under srun JAX reads these" \
        "from Slurm"
      ;;
  esac
done
if [[ -z $script ]]; then
  script="${TMPDIR:-/tmp}/dqvq_launch/$job_name-$(date +%Y%m%d-%H%M%S).sbatch"
fi

if ((per_node)); then
  tasks_per_node=1
else
  tasks_per_node=$gpus_per_node
fi
log_pattern='%x-%j.out'
[[ -z $output_dir ]] || log_pattern="${output_dir%/}/$log_pattern"

# The batch script, on stdout.
generate() {
  local kv line d ids=()
  echo '#!/usr/bin/env bash'
  echo "# Written by launch/$prog on $(date '+%Y-%m-%d %H:%M:%S'):" \
    "$nodes node(s) x $gpus_per_node GPU(s), $tasks_per_node process(es) per" \
    "node."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  [[ -z $cpus_per_task ]] || echo "#SBATCH --cpus-per-task=$cpus_per_task"
  [[ -z $partition ]] || echo "#SBATCH --partition=$partition"
  [[ -z $account ]] || echo "#SBATCH --account=$account"
  [[ -z $time_limit ]] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$log_pattern"
  for line in ${sbatch_flags[@]+"${sbatch_flags[@]}"}; do
    echo "#SBATCH $line"
  done
  # No `set -u`: environment-module setup lines (Lmod) trip over it.
  echo 'set -eo pipefail'
  # The repository on the path keeps `-m dqvq.*` working from the submit
  # directory, so relative paths in ARGS mean what they meant there.
  echo "export PYTHONPATH=$(quote "$repo_root")\${PYTHONPATH:+:\$PYTHONPATH}"
  echo 'export PYTHONUNBUFFERED=1'
  if [[ -n $cpus_per_task ]]; then
    # srun (Slurm >= 22.05) no longer inherits --cpus-per-task from sbatch.
    echo "export SRUN_CPUS_PER_TASK=$cpus_per_task"
  fi
  if ((per_node)); then
    for ((d = 0; d < gpus_per_node; d++)); do ids+=("$d"); done
    echo "export JAX_LOCAL_DEVICE_IDS=$(IFS=,; echo "${ids[*]}")"
  fi
  for kv in ${extra_env[@]+"${extra_env[@]}"}; do
    echo "export ${kv%%=*}=$(quote "${kv#*=}")"
  done
  for line in ${setup[@]+"${setup[@]}"}; do echo "$line"; done
  # --kill-on-bad-exit: one failed process ends the step instead of leaving
  # the others blocked in a collective until the time limit.
  quote srun --kill-on-bad-exit=1 "$python" -m "$module" \
    ${args[@]+"${args[@]}"}
}

if ((dry_run)); then
  echo "# Batch script (would be written to $script):"
  generate
  echo "# Submit command:"
  quote sbatch --parsable "$script"
  exit 0
fi

command -v sbatch >/dev/null ||
  { echo "$prog: error: sbatch not found; run this on a Slurm login node" \
      "(or use --dry-run to see the script)." >&2; exit 1; }
mkdir -p "$(dirname "$script")"
[[ -z $output_dir ]] || mkdir -p "$output_dir"
generate >"$script"
echo "$prog: wrote $script" >&2
job=$(sbatch --parsable "$script")
job_id=${job%%;*}
log=${log_pattern//%x/$job_name}
log=${log//%j/$job_id}
echo "$prog: submitted job $job_id; log: $log" \
  "(follow: tail -F $(quote "$log"))" >&2
echo "$job_id"
