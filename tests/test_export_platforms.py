"""Every program a pod runs, exported for GPU and TPU from this CPU host.

`jax.export` with platforms=('cuda', 'tpu') lowers a program for those
platforms without their hardware, so a program that could not run on a pod
(a CPU-only primitive, a shape or sharding that only lowers on CPU) fails
here, in CI. The CPU-only code of dqvq (`dqvq.cpu.fast_conv`) names its
ops with the scope `fast_conv.SCOPE`, which the exported module keeps in its
op locations: an accelerator's program must hold none of it, while the same
program built for a CPU run does (so the check can fail).
"""

import types

import jax
import pytest

from dqvq.cpu import fast_conv
from dqvq.cpu import tuning as cpu_tuning
from dqvq import export
from dqvq.inference import bundle
from dqvq import sharding
from dqvq.tools import aot

from conftest import load_config  # pylint: disable=g-bad-import-order

ACCELERATORS = ('cuda', 'tpu')


def _step_config(stage: int):
  if stage == 1:
    c = load_config('demo').stage1_config('runlocal')
    c.lpips_weights = 'random'  # LPIPS and the GAN are in the step
    c.model.entropy_thresholds = None
  else:
    c = load_config('imagenet_stage2').get_config('runlocal,cfg=0.1')
  return c


def _exported_step(stage: int, mesh, cpu_kernels: bool, platforms):
  """The jitted, sharded, donated train step as `dqvq.train` compiles it."""
  config = _step_config(stage)
  step, abstract, shardings, batch, frozen = aot._stage_parts(  # pylint: disable=protected-access
      config, mesh, (16, 8), 1024, cpu_kernels)
  replicated = sharding.replicated(mesh)
  fn = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh),
                                   replicated),
               out_shardings=(shardings, replicated), donate_argnums=(0,))
  return jax.export.export(fn, platforms=platforms)(
      sharding.with_shardings(abstract, shardings), batch, frozen)


def test_accelerator_devices_get_no_cpu_kernels():
  # The decision trainers, aot and the tokenizer make from their devices.
  gpu = [types.SimpleNamespace(platform='gpu')] * 2
  tpu = [types.SimpleNamespace(platform='tpu')] * 4
  assert not cpu_tuning.cpu_kernels(gpu)
  assert not cpu_tuning.cpu_kernels(tpu)
  assert not cpu_tuning.cpu_kernels(jax.devices()[:1] + tpu)
  assert cpu_tuning.cpu_kernels(jax.devices())


@pytest.mark.parametrize('stage', [1, 2])
def test_train_step_exports_for_gpu_and_tpu_without_cpu_code(stage):
  mesh = sharding.create_mesh(devices=jax.devices())
  exported = _exported_step(stage, mesh, False, ACCELERATORS)
  assert exported.platforms == ACCELERATORS
  module = exported.mlir_module()
  assert fast_conv.SCOPE not in module
  # Nor host callbacks or LAPACK calls, which only a CPU could run.
  assert 'xla_python_cpu_callback' not in module and 'lapack' not in module
  if stage == 1:
    # The control: a CPU run's stage-1 step holds the CPU kernels.
    assert cpu_tuning.cpu_kernels(mesh)
    cpu = _exported_step(stage, mesh, True, ('cpu',))
    assert fast_conv.SCOPE in cpu.mlir_module()


def _programs(path, names):
  return {n: bundle.load_program(path, n) for n in names}


def test_tokenizer_and_sampler_programs_export_for_gpu_and_tpu(
    stage1_workdir, stage2_workdir, tmp_path):
  tok_path = export.export_run(stage1_workdir, str(tmp_path / 'tok'),
                               programs=['encode', 'decode'],
                               platforms=list(ACCELERATORS))
  gen_path = export.export_run(stage2_workdir, str(tmp_path / 'gen'),
                               programs=['sample'], program_batch=4,
                               platforms=list(ACCELERATORS))
  programs = {**_programs(tok_path, ('encode', 'decode')),
              **_programs(gen_path, ('sample',))}
  for name, program in programs.items():
    assert program.platforms == ACCELERATORS, name
    assert fast_conv.SCOPE not in program.mlir_module(), name
  # The same tokenizer exported for CPU alone keeps its CPU kernels (the
  # encoder's strided convolutions), so the check above can fail.
  cpu_path = export.export_run(stage1_workdir, str(tmp_path / 'tok_cpu'),
                               programs=['encode'], platforms=['cpu'])
  assert fast_conv.SCOPE in _programs(cpu_path, ('encode',))[
      'encode'].mlir_module()
