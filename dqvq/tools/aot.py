r"""Ahead-of-time check: does a config's train step compile and fit a topology?

  python -m dqvq.tools.aot --config configs/imagenet_stage2.py:large \
      --devices 64 --fsdp 16 --device_memory_gb 16
  python -m dqvq.tools.aot --config configs/imagenet_stage1.py --topology v5e:4x4

Compiles the config's real train step (generator and discriminator updates
for stage 1, the DQ-Transformer update for stage 2) for a mesh of the given
shape without data, a tokenizer run or any allocation, and prints per device:
the state's size under its shardings (params and optimizer, the figure the
trainer logs before compiling), XLA's memory analysis of the compiled step
(arguments, outputs, temporaries) and its FLOPs. It fails (exit 1) when the
step does not fit `--device_memory_gb`. Without `--topology` the devices are
fake CPU devices (XLA's CPU compiler plans the same shardings and buffers;
accelerators fuse differently, so treat the temporaries as an estimate);
with it, `jax.experimental.topologies` compiles for that accelerator when
its compiler (libtpu, CUDA) is installed here.

Stage 2 needs only the tokenizer's shape: its grain factors and codebook
size come from `config.tokenizer.stage1` or the tokenizer run's checkpoint
when there is one, else from `--grain_factors` / `--codebook_size` (the
paper's dual-grain DQ-VAE by default).
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; only when run as a script (dqvq.train defines --config
  too, and absl refuses a second definition in one process)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (e.g. configs/imagenet_stage2.py:large).',
      lock_config=False)
  flags.DEFINE_integer('devices', 8, 'Fake CPU devices to compile for '
                       '(without --topology).')
  flags.DEFINE_integer('data', -1, 'Mesh data axis (-1: the rest).')
  flags.DEFINE_integer('fsdp', None, "Mesh fsdp axis (default: the config's "
                       'mesh.fsdp).')
  flags.DEFINE_string(
      'topology', None, 'An accelerator topology, e.g. v5e:4x4 (platform '
      'tpu) or a jax.experimental.topologies name.')
  flags.DEFINE_string('platform', 'tpu', 'Platform of --topology.')
  flags.DEFINE_float('device_memory_gb', 0.0,
                     'Fail when a device needs more (0: no limit).')
  flags.DEFINE_list('grain_factors', ['16', '8'],
                    'Stage 2 without a tokenizer: its grains.')
  flags.DEFINE_integer('codebook_size', 1024,
                       'Stage 2 without a tokenizer: codebook size.')


GiB = 2**30


def _tokenizer_shape(config: Any, grain_factors: Sequence[int],
                     codebook_size: int) -> Any:
  """Something with `.vae.grain_factors` / `.vae.codebook_size`."""
  model = None
  if config.tokenizer.get('stage1') is not None:
    model = config.tokenizer.stage1.model
  elif config.tokenizer.workdir and os.path.isdir(
      os.path.join(config.tokenizer.workdir, 'checkpoints')):
    from dqvq import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    ckpt = ckpt_lib.Checkpointer(config.tokenizer.workdir, save_every=0)
    model = ckpt.read_meta(ckpt.latest_step())['config']['model']
    ckpt.close()
  if model is not None:
    grain_factors, codebook_size = model['grain_factors'], model[
        'codebook_size']
  return types.SimpleNamespace(vae=types.SimpleNamespace(
      grain_factors=tuple(int(f) for f in grain_factors),
      codebook_size=int(codebook_size)))


def _stage_parts(config: Any, mesh: Any, grain_factors: Sequence[int],
                 codebook_size: int, cpu_kernels: bool) -> tuple[Any, ...]:
  """(step fn, abstract state, state shardings, abstract batch, frozen)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from dqvq import sharding
  # pylint: enable=g-import-not-at-top
  b, key = config.batch_size, jax.random.key(0)
  res = config.data.resolution
  if config.stage == 1:
    from dqvq.models import perceptual  # pylint: disable=g-import-not-at-top
    from dqvq.trainers import stage1  # pylint: disable=g-import-not-at-top
    models = stage1.build_models(config, cpu_kernels)
    abstract = jax.eval_shape(
        lambda r: stage1.init_state(models, r, (1, res, res, 3)), key)
    shardings = sharding.infer_state_shardings(abstract, mesh)
    batch = {'image': jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32),
             'label': jax.ShapeDtypeStruct((b,), jnp.int32),
             'mask': jax.ShapeDtypeStruct((b,), jnp.bool_)}
    frozen = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                           perceptual.init_lpips_params(0))
              if stage1.uses_lpips(config) else None)
    return (lambda s, x, f: stage1.train_step(models, s, x, f), abstract,
            shardings, batch, frozen)
  from dqvq import sequence  # pylint: disable=g-import-not-at-top
  from dqvq.trainers import stage2  # pylint: disable=g-import-not-at-top
  tok = _tokenizer_shape(config, grain_factors, codebook_size)
  layout = sequence.layout_from_config(config, tok.vae)
  models = stage2.build_models(config, layout)
  abstract = jax.eval_shape(lambda r: stage2.init_state(models, r), key)
  shardings = stage2.state_shardings(models, mesh, abstract)
  fine = res // tok.vae.grain_factors[-1]
  coarse = res // tok.vae.grain_factors[0]
  batch = {'codes': jax.ShapeDtypeStruct((b, fine, fine), jnp.int32),
           'grain_map': jax.ShapeDtypeStruct((b, coarse, coarse), jnp.int32),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32),
           'mask': jax.ShapeDtypeStruct((b,), jnp.bool_)}
  return (lambda s, x, f: stage2.train_step(models, s, x, f), abstract,
          shardings, batch, None)


def check(config: Any, devices: Sequence[Any], *, data: int = -1,
          fsdp: int | None = None, grain_factors: Sequence[int] = (16, 8),
          codebook_size: int = 1024) -> dict[str, float]:
  """Compiles the train step for a mesh over `devices`; returns figures.

  Keys: 'state_gib' (sharded state per device), 'argument_gib',
  'output_gib', 'temp_gib', 'alias_gib', 'total_gib' (arguments + outputs +
  temporaries - donated aliases, per device) and 'gflop' (per step, whole
  program as XLA counts it).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from dqvq.cpu import fast_conv
  from dqvq.cpu import tuning as cpu_tuning
  from dqvq import sharding
  from dqvq.trainers import checks
  # pylint: enable=g-import-not-at-top
  checks.validate_config(config, num_devices=len(devices),
                              tokenizer_ready=config.stage == 1)
  fsdp = config.mesh.fsdp if fsdp is None else fsdp
  mesh = sharding.create_mesh(data, fsdp, devices=devices)
  # The mesh's platform decides, as in training: a TPU or GPU topology
  # planned from a CPU host gets the accelerator's program, not CPU kernels.
  cpu_kernels = cpu_tuning.cpu_kernels(mesh)
  step, abstract, shardings, batch, frozen = _stage_parts(
      config, mesh, grain_factors, codebook_size, cpu_kernels)
  batch_sh = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  fn = jax.jit(step, in_shardings=(shardings, batch_sh, replicated),
               out_shardings=(shardings, replicated), donate_argnums=(0,))
  compiled = fn.lower(sharding.with_shardings(abstract, shardings), batch,
                      frozen).compile()
  mem = compiled.memory_analysis()
  figures = {'state_gib': sharding.bytes_per_device(abstract, shardings) / GiB}
  for name in ('argument', 'output', 'temp', 'alias'):
    figures[f'{name}_gib'] = float(getattr(
        mem, f'{name}_size_in_bytes', 0) or 0) / GiB
  figures['total_gib'] = (figures['argument_gib'] + figures['output_gib'] +
                          figures['temp_gib'] - figures['alias_gib'])
  if config.stage == 1 and cpu_kernels:
    # The CPU weight gradients loop over blocks of rows, whose bodies XLA
    # counts once: count FLOPs on the same step traced in one block (a
    # fresh function, so that jax traces it anew).
    with fast_conv.whole_image_weight_grads():
      compiled = jax.jit(lambda s, x, f: step(s, x, f)).lower(
          sharding.with_shardings(abstract, shardings), batch,
          frozen).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  figures['gflop'] = float((cost or {}).get('flops', 0.0)) / 1e9
  return figures


def _devices() -> list[Any]:
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.topology:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      topo = topologies.get_topology_desc(FLAGS.topology, FLAGS.platform)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise app.UsageError(
          f'Cannot build topology {FLAGS.topology!r} for platform '
          f'{FLAGS.platform!r} on this machine ({e}); install that '
          "platform's jax plugin (e.g. jax[tpu]) or use --devices N to "
          'plan on fake CPU devices.') from e
    return list(topo.devices)
  if jax.device_count() != FLAGS.devices:
    raise app.UsageError(
        f'jax already has {jax.device_count()} devices; run dqvq.tools.aot as its '
        'own process so --devices can set the fake CPU device count.')
  return jax.devices()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required.')
  config = FLAGS.config
  figures = check(config, _devices(), data=FLAGS.data, fsdp=FLAGS.fsdp,
                  grain_factors=[int(f) for f in FLAGS.grain_factors],
                  codebook_size=FLAGS.codebook_size)
  print(' '.join(f'{k}={v:.4g}' for k, v in figures.items()))
  if FLAGS.device_memory_gb and figures['total_gib'] > FLAGS.device_memory_gb:
    print(f'error: the step needs {figures["total_gib"]:.2f} GiB per device, '
          f'more than --device_memory_gb={FLAGS.device_memory_gb:g}: raise mesh.fsdp, '
          'lower batch_size or use compute_dtype=bfloat16.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  # The fake CPU device count must be set before jax starts its backend.
  for i, arg in enumerate(sys.argv):
    if arg.startswith('--devices'):
      n = arg.split('=', 1)[1] if '=' in arg else sys.argv[i + 1]
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_'
                                 f'force_host_platform_device_count={n}')
  define_flags()
  app.run(main)
