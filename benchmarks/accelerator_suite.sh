#!/usr/bin/env bash
# The GPU check, ready to run once on a lent accelerator (one H200: < 8 min).
#
# Prints, each beside its target:
#   stage-1 step (paper DQ-VAE, 256 px, bf16): images/s and MFU   (>= 30%)
#   stage-2 step (base DQ-Transformer, bf16): sequences/s and MFU (>= 50%)
#   sampler (base model, batch 256, KV cache, tokens): images/min (>= 1,000)
#
# MFU = the step's FLOPs (XLA's cost analysis of the compiled step, as the
# benchmarks print them) / step time / the chip's dense bf16 peak
# (PEAK_TFLOPS, default 989.4: H100/H200 SXM). Each part runs in its own
# process under its own time limit, so one slow compile cannot eat the
# budget of the others; a part that fails or times out prints FAIL and the
# suite goes on.
#
# The machine's image has jax with its CUDA plugin, flax, optax and orbax;
# the few pure-data packages the steps import travel as wheels, fetched here
# first (network needed, ~5 MB):
#   bash benchmarks/accelerator_wheels.sh
# then, with the device tool: run(command='bash benchmarks/accelerator_suite.sh',
# carry=['.whl'], timeout_s=540). Output is tee'd to $OUT/suite.log when the
# tool sets OUT. It uses the image's jax (0.11 with the CUDA 13 plugin): the
# CUDA plugin wheels of the pinned jax 0.10.2 exceed what a call can carry
# (64 MiB), so the first line printed names the versions that ran.
#
# SUITE_SMOKE=1 runs the same three parts on toy models (seconds on a CPU):
# tests/test_accelerator_suite.py does, so the script is proven in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PEAK_TFLOPS=${PEAK_TFLOPS:-989.4}
S1_BATCH=${S1_BATCH:-16}
S2_BATCH=${S2_BATCH:-32}
SAMPLE_BATCH=${SAMPLE_BATCH:-256}
LOG=${OUT:+$OUT/suite.log}
LOG=${LOG:-/dev/null}
export PYTHONUNBUFFERED=1

if [[ -d .whl && ${SUITE_SMOKE:-0} != 1 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo 'nvidia-smi: none'
  "$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax",
flax.__version__, jax.devices())'
} 2>&1 | tee -a "$LOG"

# figure LINE KEY: the value of KEY=... in the benchmark's last line.
figure() {
  sed -n "s/.*\\b$2=\\([0-9.eE+-]*\\).*/\\1/p" <<<"$1" | tail -n 1
}

# report NAME RATE_KEY RATE_SCALE RATE_UNIT TARGET_KIND TARGET SECONDS CMD...
# Runs CMD under `timeout SECONDS`, then prints one line:
#   NAME RATE_UNIT=... [mfu=...] target=... PASS|FAIL
report() {
  local name=$1 key=$2 scale=$3 unit=$4 kind=$5 target=$6 limit=$7
  shift 7
  local out status=0
  echo "== $name: $*" | tee -a "$LOG"
  out=$(timeout "$limit" "$@" 2>&1) || status=$?
  tail -n 8 <<<"$out" | tee -a "$LOG"
  local rate gflops
  rate=$(figure "$out" "$key")
  gflops=$(figure "$out" gflops_per_s)
  if [[ $status -ne 0 || -z $rate ]]; then
    echo "$name FAIL (exit $status within ${limit}s)" | tee -a "$LOG"
    return 0
  fi
  "$PY" - "$name" "$rate" "$scale" "$unit" "$kind" "$target" \
    "${gflops:-0}" "$PEAK_TFLOPS" <<'EOF' | tee -a "$LOG"
import sys
name, rate, scale, unit, kind, target, gflops, peak = sys.argv[1:]
value = float(rate) * float(scale)
mfu = float(gflops) * 1e9 / (float(peak) * 1e12)
got = mfu if kind == 'mfu' else value
verdict = 'PASS' if got >= float(target) else 'FAIL'
extra = f' mfu={mfu:.3f}' if kind == 'mfu' else ''
print(f'{name} {unit}={value:.4g}{extra} target_{kind}={target} {verdict}')
EOF
}

if [[ ${SUITE_SMOKE:-0} == 1 ]]; then
  S1_ARGS=(--variant tiny --resolution 32 --batch 2 --steps 1)
  S2_ARGS=(--tiny --batch 2 --steps 1)
  SAMPLER_ARGS=(--width 64 --num_heads 2 --position_layers 1
                --content_layers 1 --batch 2 --coarse 16 --top_k 20)
else
  S1_ARGS=(--resolution 256 --batch "$S1_BATCH" --steps 5)
  S2_ARGS=(--batch "$S2_BATCH" --steps 5)
  SAMPLER_ARGS=(--width 1024 --num_heads 16 --position_layers 6
                --content_layers 18 --batch "$SAMPLE_BATCH")
fi

report stage1 images_per_s 1 images_per_s mfu 0.30 150 \
  "$PY" benchmarks/stage1_step.py --bf16 "${S1_ARGS[@]}"
report stage2 sequences_per_s 1 sequences_per_s mfu 0.50 150 \
  "$PY" benchmarks/stage2_step.py --bf16 "${S2_ARGS[@]}"
report sampler images_per_s 60 images_per_min rate 1000 150 \
  "$PY" benchmarks/sampling.py "${SAMPLER_ARGS[@]}" --naive_steps 0 \
  --repeats 2 --bf16
