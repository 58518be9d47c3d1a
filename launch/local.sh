#!/usr/bin/env bash
# Runs one dqvq command as N JAX processes on this machine.
#
# This is how multi-host code paths (process 0 logging, collective
# checkpointing, host-local -> global batches) get exercised without a pod:
# every process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=I` and, on CPU, D fake devices, exactly as separate hosts would.
# Each process logs to LOGDIR/process_I.log; process 0's output is also shown
# here. When one process fails the others are stopped, because the survivors
# would otherwise hang forever in their next collective.
set -euo pipefail

prog=$(basename "$0")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --num_processes N [options] [-- ARGS...]

Runs \`PYTHON -m MODULE ARGS\` as N JAX processes on localhost, coordinated
through 127.0.0.1:PORT.

Options:
  --num_processes N        processes to start (required, >= 1)
  --devices_per_process D  devices per process (default 1): fake CPU devices
                           with --platform cpu, GPUs with --platform gpu
  --platform cpu|gpu       cpu (default): JAX_PLATFORMS=cpu and XLA_FLAGS
                           --xla_force_host_platform_device_count=D;
                           gpu: process I sees GPUs I*D .. I*D+D-1
                           through CUDA_VISIBLE_DEVICES
  --port PORT              coordinator port (default 12355)
  --logdir DIR             per-process logs (default
                           \${TMPDIR:-/tmp}/dqvq_launch/local-TIMESTAMP)
  --module MODULE          python module to run (default dqvq.train)
  --python PYTHON          interpreter (default python3, an active venv's)
  --env NAME=VALUE         extra environment variable (repeatable)
  --dry-run                print the N commands with their environment
  -h, --help               show this help

Arguments after \`--\` go to the python command unchanged.

Example (2 processes x 4 fake CPU devices, the demo run):
  $prog --num_processes 2 --devices_per_process 4 -- \\
      --config configs/demo.py:runlocal --workdir /tmp/dqvq_local
EOF
}

# die_usage, quote, check_module_python_env (uses $prog and usage).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

num_processes=''
devices_per_process=1
platform=cpu
port=12355
logdir=''
module=dqvq.train
python=python3
extra_env=()
dry_run=0
args=()

while (($#)); do
  split_option "$1"
  case $opt in
    -h | --help) usage; exit 0 ;;
    --) shift; args=("$@"); break ;;
    --dry-run) flag_option ;;
    --num-processes | --devices-per-process | --platform | --port | \
      --logdir | --module | --python | --env)
      value_option "$@"
      ;;
    *) die_usage "unknown argument '$1' (python flags go after --)" ;;
  esac
  shift "$taken"
  case $opt in
    --dry-run) dry_run=1 ;;
    --num-processes) num_processes=$value ;;
    --devices-per-process) devices_per_process=$value ;;
    --platform) platform=$value ;;
    --port) port=$value ;;
    --logdir) logdir=$value ;;
    --module) module=$value ;;
    --python) python=$value ;;
    --env) extra_env+=("$value") ;;
  esac
done

[[ -n $num_processes ]] || die_usage "--num_processes is required"
[[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
  die_usage "--num_processes must be a positive integer, got '$num_processes'"
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die_usage "--devices_per_process must be a positive integer, got" \
    "'$devices_per_process'"
[[ $platform == cpu || $platform == gpu ]] ||
  die_usage "--platform must be cpu or gpu, got '$platform'"
if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
  die_usage "--port must be in 1..65535, got '$port'"
fi
check_module_python_env
for a in ${args[@]+"${args[@]}"}; do
  case $a in
    --coordinator_address* | --num_processes* | --process_id*)
      die_usage "do not pass '$a' after --: $prog sets it for every process"
      ;;
  esac
done
if [[ -z $logdir ]]; then
  logdir="${TMPDIR:-/tmp}/dqvq_launch/local-$(date +%Y%m%d-%H%M%S)-$$"
fi

# The environment and argv of process $1, into the global `cmd`.
build_command() {
  local i=$1 env_vars=() first ids=() d f inherited=() xla_flags=()
  if [[ $platform == cpu ]]; then
    env_vars+=(JAX_PLATFORMS=cpu)
    # Other XLA flags are kept; an inherited device count would fight ours.
    read -r -a inherited <<<"${XLA_FLAGS:-}"
    for f in ${inherited[@]+"${inherited[@]}"}; do
      [[ $f == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$f")
    done
    xla_flags+=("--xla_force_host_platform_device_count=$devices_per_process")
    env_vars+=("XLA_FLAGS=${xla_flags[*]}")
  else
    first=$((i * devices_per_process))
    for ((d = first; d < first + devices_per_process; d++)); do
      ids+=("$d")
    done
    env_vars+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]}")")
  fi
  # The repository on the path keeps `-m dqvq.*` working from any directory,
  # so relative --workdir/--config paths stay relative to where you are.
  env_vars+=("PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}")
  env_vars+=(PYTHONUNBUFFERED=1)
  cmd=(env "${env_vars[@]}" ${extra_env[@]+"${extra_env[@]}"}
       "$python" -m "$module"
       "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$num_processes" "--process_id=$i"
       ${args[@]+"${args[@]}"})
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    build_command "$i"
    echo "# process $i of $num_processes, log: $logdir/process_$i.log"
    quote "${cmd[@]}"
  done
  exit 0
fi

mkdir -p "$logdir"
echo "$prog: $num_processes processes of \`$module\`, coordinator" \
  "127.0.0.1:$port, logs in $logdir" >&2

# Monitor mode puts each process in its own process group, so stopping one
# also stops whatever it started (tee, data-loading workers).
set -m
pids=()
running=()

stop_running() {
  local i waited=0
  for i in "${!pids[@]}"; do
    if ((running[i])); then kill -TERM -- "-${pids[i]}" 2>/dev/null || true; fi
  done
  # A grace period for clean shutdown, then no more waiting.
  for i in "${!pids[@]}"; do
    while ((running[i] && waited < 100)) &&
      kill -0 "${pids[i]}" 2>/dev/null; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if ((running[i])); then
      kill -KILL -- "-${pids[i]}" 2>/dev/null || true
      wait "${pids[i]}" 2>/dev/null || true
      running[i]=0
    fi
  done
}

on_signal() {
  echo "$prog: interrupted; stopping all processes." >&2
  stop_running
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'stop_running' EXIT

for ((i = 0; i < num_processes; i++)); do
  build_command "$i"
  log="$logdir/process_$i.log"
  quote "${cmd[@]}" >"$log"
  if ((i == 0)); then
    ( "${cmd[@]}" 2>&1 | tee -a "$log" ) </dev/null &
  else
    "${cmd[@]}" </dev/null >>"$log" 2>&1 &
  fi
  pids[i]=$!
  running[i]=1
done
# The groups exist now; without monitor mode bash does not announce each
# stopped job, and Ctrl-C reaches this script (not a foreground `sleep`).
set +m

# Polling rather than `wait -n -p` keeps this working on bash < 5.1 (macOS).
remaining=$num_processes
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    ((running[i])) || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    status=0
    wait "${pids[i]}" || status=$?
    running[i]=0
    remaining=$((remaining - 1))
    if ((status != 0)); then
      stop_running
      log="$logdir/process_$i.log"
      {
        echo "$prog: process $i failed with exit status $status;" \
          "stopped the other processes."
        echo "$prog: last lines of $log:"
        tail -n 20 "$log" | sed 's/^/  | /'
      } >&2
      exit "$status"
    fi
  done
  ((remaining == 0)) || sleep 0.2
done
echo "$prog: all $num_processes processes finished; logs in $logdir" >&2
