r"""Table 6's held-out code length: the photographs, or the way they are cut?

  python benchmarks/table6_crop_law.py --run W/dual_feature_r0.1 \
      [--run W/dual_feature_r0.3 ...] [--count 192]

The study (`python -m dqvq.study`) measures Table 6's mean code length on the
demo's validation split, and again on fresh crops of the training
photographs. The validation split differs from training in two ways at once:
other photographs (chelsea, coffee, coins), and another crop law (fixed
crops at scales 0.35-1.0, stored at 128 px, against training's log-uniform
0.1-1.0 of the shorter side, straight to the model's resolution). This
separates the two. For each trained demo-config run it measures the run's own
routing on

* the validation split (the study's held-out column),
* as many crops of the *held-out* photographs drawn exactly as in training
  (`transforms.random_scale_crop_flip` with the run's `data.crop_scale`, each
  crop from a photograph drawn at random, a seed no run trains with),
* as many fresh crops of the training photographs (the study's
  `training_crops`, its in-distribution column),

and prints the mean length against its expectation, its variance, and PSNR.
If the held-out photographs cut as in training meet the expected length, the
validation split's excess is its crop law; if not, it is the photographs.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.cpu import tuning as cpu_tuning  # defines --cpu_tuning

_RUN = flags.DEFINE_multi_string('run', None, 'A trained stage-1 run of the '
                                 'demo config (e.g. a study model).')
_COUNT = flags.DEFINE_integer('count', 192, 'Crops per drawn set (the '
                              'validation split has 192).')
# Neither the training runs' seeds nor the study's TRAINING_CROPS_SEED.
HELD_OUT_CROPS_SEED = 54321


def held_out_crops(config, count: int, batch_size: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`count` crops of the held-out photographs under the training crop law."""
  from PIL import Image
  from dqvq.data import demo
  from dqvq.data import transforms
  if config.data.crop_scale is None:
    raise app.UsageError('This run trained on fixed crops (data.crop_scale '
                         'is None); give a run of the demo config.')
  photos = [Image.fromarray(p) for _, _, p in
            demo.iter_photos(demo.VALIDATION_PHOTOS)]
  rng = np.random.default_rng(HELD_OUT_CROPS_SEED)
  crops = np.stack([transforms.random_scale_crop_flip(
      photos[int(rng.integers(len(photos)))], config.data.resolution,
      tuple(config.data.crop_scale), rng) for _ in range(count)])
  x = transforms.to_model_range(crops)
  return [(x[i:i + batch_size], np.ones(len(x[i:i + batch_size]), bool))
          for i in range(0, count, batch_size)]


def main(argv) -> None:
  del argv
  if not _RUN.value:
    raise app.UsageError('Give at least one --run (a stage-1 run directory).')
  if _COUNT.value <= 0:
    raise app.UsageError('--count must be positive.')
  cpu_tuning.prepare_process()
  from dqvq.eval import coding
  from dqvq.eval import study_eval
  from dqvq.inference import tokenizer
  print('| run, step | r_fine | expected length | crops | mean length (error) '
        '| var | PSNR dB |')
  print('|---|---|---|---|---|---|---|')
  for run in _RUN.value:
    tok = tokenizer.load_stage1(run)
    c = tok.config
    model = study_eval.Model(c, tok)
    if len(model.factors) != 2:
      raise app.UsageError(f'{run}: Table 6 is about dual-grain models; this '
                           f'one has grain factors {model.factors}.')
    regions = int(np.prod(model.grid(np.zeros(
        (1, c.data.resolution, c.data.resolution, 3)))))
    expected = coding.expected_code_length(tuple(c.model.grain_ratios),
                                           model.factors, regions)
    sets = {
        'validation split (held-out photographs, fixed crops)':
            study_eval.validation_batches(c),
        'held-out photographs, cut as in training':
            held_out_crops(c, _COUNT.value, c.eval_batch_size),
        'training photographs, fresh crops':
            study_eval.training_crops(c, _COUNT.value),
    }
    name = os.path.basename(run.rstrip('/'))
    for label, batches in sets.items():
      f = study_eval.coding_figures(model, batches)
      length = f['code_length_mean']
      print(f'| {name}, {tok.step} | {c.model.grain_ratios[1]:g} | '
            f'{expected:.1f} | {label} | {length:.1f} '
            f'({100 * (length / expected - 1):+.1f}%) | '
            f'{f["code_length_var"]:.0f} | {f["psnr"]:.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
