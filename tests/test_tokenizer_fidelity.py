"""Regression test: the demo tokenizer reconstructs what it is given.

The demo tokenizer once painted the same bright streak and dark blobs into
the reconstructions of unrelated images, and returned nearly the same gray
picture for every constant image. The cause was GroupNorm with 32 groups at
widths 32-64: one or two channels per group normalise away each image's
colour and brightness, and the decoder learns to smuggle them back through
blobs and border effects (StyleGAN's "droplet" artifact). With >= 4 channels
per group (`config.model.norm_groups`) a short run already reconstructs a
constant image as that constant, without structure.

`probe` trains the demo's stage-1 config (its model, its multi-scale crops)
for a few steps at a small resolution and reconstructs constant images.
Run with the old setting (`norm_groups=32`), the same probe returns nearly
the same mean for every input level; the README's "What held the tokenizer
back" gives the figures of both settings and of the full demo run.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.trainers import loop
from dqvq.trainers import stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = (-0.6, 0.0, 0.6)


def demo_stage1_config(data_dir: str):
  spec = importlib.util.spec_from_file_location(
      'demo_cfg', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.stage1_config()


def probe(data_dir: str, workdir: str, steps: int = 120, resolution: int = 32,
          **model) -> dict[str, np.ndarray]:
  """Trains the demo tokenizer briefly; reconstructs constant images."""
  c = demo_stage1_config(data_dir)
  c.data.data_dir = data_dir
  c.data.resolution = resolution
  c.model.update(model)
  c.batch_size = c.eval_batch_size = 8
  c.num_train_steps = steps
  c.optim.warmup_steps = 10
  c.num_eval_batches = 1
  c.eval_every = c.image_every = c.checkpoint_every = steps
  state = loop.train_and_evaluate(c, workdir)
  x = jnp.stack([jnp.full((resolution, resolution, 3), v) for v in LEVELS])
  # The reconstruction the run's pictures show (clipped, eval mode), jitted:
  # run eagerly, the model's hundreds of ops would compile one by one.
  reconstruct = jax.jit(functools.partial(stage1.reconstruct,
                                          stage1.build_models(c)))
  y = np.asarray(reconstruct(state, x)['reconstruction'])
  return {'mean': y.mean(axis=(1, 2, 3)), 'std': y.std(axis=(1, 2, 3))}


@pytest.mark.long
def test_constant_images_reconstruct_as_constants(demo_data_dir, tmp_path):
  got = probe(demo_data_dir, str(tmp_path))
  # Brightness passes the tokenizer: each output's mean follows its input.
  # (With norm_groups=32 this run gave means -0.17, -0.17, -0.14 for inputs
  # -0.6, 0, 0.6; with 8: -0.61, 0.02, 0.34.)
  np.testing.assert_allclose(got['mean'], LEVELS, atol=0.3)
  assert np.all(np.diff(got['mean']) > 0.25), got['mean']
  # A flat input stays (nearly) flat after 120 steps.
  assert np.all(got['std'] < 0.2), got['std']
