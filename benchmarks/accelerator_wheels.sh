#!/usr/bin/env bash
# Fetches, into .whl/, the wheels that benchmarks/accelerator_suite.sh
# installs on the lent GPU machine: the packages the three benchmarked steps
# import that its image lacks (the image has jax + CUDA, flax, optax, orbax,
# numpy, absl, etils, PIL). Pinned as requirements.txt pins them; CPython
# 3.12, manylinux x86_64, as on that machine. Run it here, where pip reaches
# PyPI; the wheels total about 5 MB (a call may carry 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ml-collections==1.1.0 grain==0.2.18 array_record==0.8.6 \
  portpicker==1.6.0
du -sh .whl
