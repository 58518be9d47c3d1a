#!/usr/bin/env bash
# Runs one dqvq command on every worker of a Cloud TPU VM (a pod slice).
#
# Steps: create the TPU VM unless it exists, copy this checkout to every
# worker, install the requirements (plus the jax[tpu] build that matches the
# pinned jax) into a venv there, run the command on all workers at once while
# streaming its output here and into a local log, and optionally delete the VM.
# No coordinator flags are passed: on TPU VMs jax.distributed.initialize()
# finds the other workers through the TPU metadata server, so every worker
# runs the same command. Checkpoints are written by all workers together, so
# --workdir must be a gs:// bucket (or a filesystem every worker mounts).
set -euo pipefail

prog=$(basename "$0")
invocation=("$0" "$@")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --name NAME --zone ZONE --accelerator TYPE [options] [-- ARGS...]

Runs \`python -m MODULE ARGS\` on every worker of TPU VM NAME.

Options:
  --name NAME             TPU VM name (required)
  --zone ZONE             zone, e.g. us-central2-b (required)
  --accelerator TYPE      accelerator type, e.g. v4-32 or v5litepod-16
                          (required unless --no-create)
  --version VERSION       TPU software version (default tpu-ubuntu2204-base;
                          v5e wants v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --project PROJECT       GCP project (default: gcloud's configured one)
  --spot                  create a Spot VM
  --preemptible           create a preemptible VM
  --create-flag FLAG      extra flag for \`tpu-vm create\`, e.g.
                          --create-flag=--network=my-net (repeatable)
  --no-create             use an existing VM; never create one
  --no-copy               do not copy the code (already on the workers)
  --no-install            do not install requirements (reuse the workers' venv)
  --remote-dir DIR        code directory on the workers, relative to the home
                          directory (default dqvq; its .venv survives copies)
  --remote-python PYTHON  interpreter that creates the workers' venv (default
                          python3.11, installed with apt-get when missing)
  --module MODULE         python module to run (default dqvq.train)
  --env NAME=VALUE        environment variable for the command (repeatable)
  --log FILE              local copy of the run's output (default
                          \${TMPDIR:-/tmp}/dqvq_launch/tpu-NAME-TIMESTAMP.log)
  --delete                delete the VM after the command succeeds
  --delete-on-failure     delete the VM when a step fails or is interrupted
                          (with --delete: delete it in every case)
  --dry-run               print every command instead of running it
  -h, --help              show this help

Arguments after \`--\` go to the python command unchanged.

Example (a v4-32 slice: 4 workers, 16 chips):
  $prog --name dqvq-v4 --zone us-central2-b --accelerator v4-32 --delete -- \\
      --config configs/imagenet_stage1.py --workdir gs://my-bucket/in_stage1
EOF
}

# die_usage, quote, check_module_python_env (uses $prog and usage).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name=''
zone=''
accelerator=''
version='tpu-ubuntu2204-base'
project=''
spot=0
preemptible=0
create_flags=()
create=1
copy=1
install=1
remote_dir=dqvq
remote_python=python3.11
module=dqvq.train
extra_env=()
log=''
delete=0
delete_on_failure=0
dry_run=0
args=()

while (($#)); do
  split_option "$1"
  case $opt in
    -h | --help) usage; exit 0 ;;
    --) shift; args=("$@"); break ;;
    --spot | --preemptible | --no-create | --no-copy | --no-install | \
      --delete | --delete-on-failure | --dry-run)
      flag_option
      ;;
    --name | --zone | --accelerator | --accelerator-type | --version | \
      --project | --create-flag | --remote-dir | --remote-python | --module | \
      --env | --log)
      value_option "$@"
      ;;
    *) die_usage "unknown argument '$1' (python flags go after --)" ;;
  esac
  shift "$taken"
  case $opt in
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --no-create) create=0 ;;
    --no-copy) copy=0 ;;
    --no-install) install=0 ;;
    --delete) delete=1 ;;
    --delete-on-failure) delete_on_failure=1 ;;
    --dry-run) dry_run=1 ;;
    --name) name=$value ;;
    --zone) zone=$value ;;
    --accelerator | --accelerator-type) accelerator=$value ;;
    --version) version=$value ;;
    --project) project=$value ;;
    --create-flag) create_flags+=("$value") ;;
    --remote-dir) remote_dir=$value ;;
    --remote-python) remote_python=$value ;;
    --module) module=$value ;;
    --env) extra_env+=("$value") ;;
    --log) log=$value ;;
  esac
done

[[ -n $name ]] || die_usage "--name is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--name must be lowercase letters, digits and '-', starting" \
    "with a letter (a GCP resource name), got '$name'"
[[ -n $zone ]] || die_usage "--zone is required"
((!create)) || [[ -n $accelerator ]] ||
  die_usage "--accelerator is required to create the VM (or pass --no-create)"
((!(spot && preemptible))) ||
  die_usage "--spot and --preemptible exclude each other; pick one"
[[ -n $version ]] || die_usage "--version must not be empty"
for f in ${create_flags[@]+"${create_flags[@]}"}; do
  [[ $f == --* ]] || die_usage "--create-flag takes a gcloud flag, got '$f'"
done
[[ $remote_dir =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ &&
  ! $remote_dir =~ (^|/)\.\.?(/|$) ]] ||
  die_usage "--remote-dir must be a relative path without '.' or '..'" \
    "parts, got '$remote_dir'"
[[ $remote_python =~ ^[A-Za-z0-9_./-]+$ ]] ||
  die_usage "--remote-python must be a command name or path, got" \
    "'$remote_python'"
python=$remote_python check_module_python_env
for a in ${args[@]+"${args[@]}"}; do
  case $a in
    --coordinator_address* | --num_processes* | --process_id*)
      die_usage "do not pass '$a' after --: on TPU VMs JAX finds the" \
        "workers itself"
      ;;
  esac
done
if [[ -z $log ]]; then
  log="${TMPDIR:-/tmp}/dqvq_launch/tpu-$name-$(date +%Y%m%d-%H%M%S).log"
fi

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
rdir=$(quote "$remote_dir")
remote_tarball=dqvq-code.tgz

# Step commands run by every worker (one shell line each).
extract_cmd="set -e; mkdir -p $rdir; find $rdir -mindepth 1 -maxdepth 1"
extract_cmd+=" ! -name .venv -exec rm -rf {} +;"
extract_cmd+=" tar -xzf $remote_tarball -C $rdir; rm -f $remote_tarball"

jax_version=$(sed -n 's/^jax==\([0-9][0-9a-z.]*\).*/\1/p' \
  "$repo_root/requirements.txt" 2>/dev/null | head -n 1)
jax_tpu="jax[tpu]${jax_version:+==$jax_version}"
py=$(quote "$remote_python")
install_cmd="set -e; cd $rdir; if ! { command -v $py && $py -c 'import"
install_cmd+=" ensurepip, venv'; } >/dev/null 2>&1; then"
if [[ $remote_python =~ ^python3\.[0-9]+$ ]]; then
  install_cmd+=" sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive"
  install_cmd+=" apt-get install -y -qq $py $py-venv;"
else
  install_cmd+=" echo '$remote_python (with venv) not found' >&2; exit 1;"
fi
install_cmd+=" fi; [ -x .venv/bin/python ] || $py -m venv .venv;"
install_cmd+=" .venv/bin/python -m pip install -q --upgrade pip;"
install_cmd+=" .venv/bin/python -m pip install -q -r requirements.txt"
install_cmd+=" $(quote "$jax_tpu")"

env_vars=(PYTHONUNBUFFERED=1 ${extra_env[@]+"${extra_env[@]}"})
run_cmd="cd $rdir && exec $(quote env "${env_vars[@]}" .venv/bin/python \
  -m "$module" ${args[@]+"${args[@]}"})"

create_cmd=("${tpu[@]}" create "$name" "${where[@]}"
            --accelerator-type="$accelerator" --version="$version")
((!spot)) || create_cmd+=(--spot)
((!preemptible)) || create_cmd+=(--preemptible)
create_cmd+=(${create_flags[@]+"${create_flags[@]}"})

ssh_all() {  # ssh_all COMMAND: the argv that runs COMMAND on every worker.
  cmd=("${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command "$1")
}

if ((dry_run)); then
  echo "# 1. Create the TPU VM unless it exists:"
  if ((create)); then
    quote "${tpu[@]}" describe "$name" "${where[@]}" '--format=value(state)'
    quote "${create_cmd[@]}"
  else
    echo "# (--no-create)"
  fi
  echo "# 2. Copy the code (the files git lists: tracked, and untracked but" \
    "not ignored):"
  if ((copy)); then
    echo "$(quote git -C "$repo_root" ls-files -z --cached --others \
      --exclude-standard) > /tmp/dqvq-files"
    quote tar -czf /tmp/dqvq-code.tgz -C "$repo_root" --null -T /tmp/dqvq-files
    quote "${tpu[@]}" scp /tmp/dqvq-code.tgz "$name:$remote_tarball" \
      --worker=all "${where[@]}"
    ssh_all "$extract_cmd"; quote "${cmd[@]}"
  else
    echo "# (--no-copy)"
  fi
  echo "# 3. Install the requirements on every worker:"
  if ((install)); then ssh_all "$install_cmd"; quote "${cmd[@]}"; else
    echo "# (--no-install)"; fi
  echo "# 4. Run on every worker at once, output also appended to $log:"
  ssh_all "$run_cmd"; quote "${cmd[@]}"
  if ((delete || delete_on_failure)); then
    when='after success'
    ((!delete_on_failure)) || when='after a failure'
    ((!(delete && delete_on_failure))) || when='in every case'
    echo "# 5. Delete the VM ($when):"
    quote "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
  exit 0
fi

command -v gcloud >/dev/null || {
  echo "$prog: error: gcloud not found; install the Google Cloud SDK" \
    "(https://cloud.google.com/sdk) or use --dry-run." >&2
  exit 1
}
mkdir -p "$(dirname "$log")"
tmp_dir=''

step() {  # step ARGV...: show, record and run one command.
  echo "+ $(quote "$@")" | tee -a "$log" >&2
  "$@"
}

finish() {
  local status=$?
  [[ -z $tmp_dir ]] || rm -rf "$tmp_dir"
  if ((status == 0 && delete)) || ((status != 0 && delete_on_failure)); then
    echo "$prog: deleting TPU VM $name (exit status $status)." >&2
    step "${tpu[@]}" delete "$name" "${where[@]}" --quiet ||
      echo "$prog: warning: could not delete $name; delete it yourself." >&2
  elif ((status != 0)); then
    echo "$prog: failed (exit status $status); TPU VM $name is kept (see" \
      "--delete-on-failure). Log: $log" >&2
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "# $(date '+%Y-%m-%d %H:%M:%S'): $(quote "${invocation[@]}")" >>"$log"

if ((create)); then
  state=$("${tpu[@]}" describe "$name" "${where[@]}" '--format=value(state)' \
    2>/dev/null) || state=''
  if [[ -z $state ]]; then
    step "${create_cmd[@]}"
  elif [[ $state != READY ]]; then
    echo "$prog: error: TPU VM $name exists but is $state; delete it" \
      "($(quote "${tpu[@]}" delete "$name" "${where[@]}")) or pick another" \
      "--name." >&2
    exit 1
  else
    echo "$prog: TPU VM $name exists and is READY; reusing it." >&2
  fi
fi

if ((copy)); then
  tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/dqvq-launch.XXXXXX")
  tarball="$tmp_dir/dqvq-code.tgz"
  if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Files deleted but not yet committed are still listed; tar would fail.
    while IFS= read -r -d '' f; do
      [[ ! -e $repo_root/$f ]] || printf '%s\0' "$f"
    done < <(git -C "$repo_root" ls-files -z --cached --others \
      --exclude-standard) >"$tmp_dir/files"
    # COPYFILE_DISABLE keeps macOS tar from adding ._* resource files.
    COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$repo_root" --null \
      -T "$tmp_dir/files"
  else
    COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$repo_root" --exclude=.git \
      --exclude=.venv --exclude=__pycache__ .
  fi
  step "${tpu[@]}" scp "$tarball" "$name:$remote_tarball" --worker=all \
    "${where[@]}"
  ssh_all "$extract_cmd"; step "${cmd[@]}"
fi

if ((install)); then
  ssh_all "$install_cmd"; step "${cmd[@]}"
fi

ssh_all "$run_cmd"
echo "$prog: running on every worker of $name; log: $log" >&2
echo "+ $(quote "${cmd[@]}")" | tee -a "$log" >&2
"${cmd[@]}" 2>&1 | tee -a "$log"
echo "$prog: finished on every worker of $name." >&2
