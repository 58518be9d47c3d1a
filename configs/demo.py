"""The README's demo: both stages on the embedded photographs, on a CPU.

One command trains the tokenizer (stage 1, in WORKDIR/stage1) and then the
DQ-Transformer on its codes (stage 2, in WORKDIR/stage2, encoding the images
on the fly with the frozen tokenizer); both resume if interrupted.
`stage1_config()` below is the tokenizer's config on its own.

`dqvq_demo` is built on first use from the photographs inside scikit-image
(no download). A small dual-grain DQ-VAE, r_fine = 0.5, scaled down to fit a
few CPU minutes: 64-pixel crops and F = {4, 8} (8 x 8 regions per image, as
the paper's {8, 16} gives at 128 pixels).

Router: the paper's learned feature router, trained with the budget loss
(r_fine = 0.5) and three of dqvq's options, without which it did not learn to
rank regions in this budget (benchmarks/README.md, "Training the learned
router"):
`router_target='gain'` (a cross-entropy towards the regions where fine codes
lower each batch's error most; paper Eq. 6 alone left it at +0.1 dB over
random regions), `router_inputs='mean_std'` (the gate also sees each fine
grain's spread within its region) and `router_train_routing='inference'`
(training batches are routed by the model's own decision, not a Gumbel draw,
so the fine branch learns the regions it will code). It decides by
`router_inference='expected'`: each image gets round(sum P(fine)) fine
regions, its top-ranked ones. `--config.tokenizer.stage1.model.router=entropy`
gives the official "better version" entropy router instead (its percentile
table is computed from the train split at start).

The loss is L1 + commitment; the GAN and LPIPS are off because minutes of CPU
training cannot use them well and LPIPS's VGG16 weights cannot be downloaded
here (enable them with `--config.loss.disc_weight=1`,
`--config.loss.perceptual_weight=1 --config.lpips_weights=DIR`).

  python -m dqvq.train --config configs/demo.py --workdir /tmp/dqvq_demo
  python -m dqvq.train --config configs/demo.py --workdir W \
      --config.tokenizer.workdir=TOKENIZER_RUN   # stage 2 on a trained one
"""

import os

import ml_collections

from dqvq import config_lib
from dqvq.data import demo as demo_data
from dqvq.models import transformer as transformer_lib


def get_config(arg=None):
  """Stage 2 on top of the demo tokenizer, which trains first."""
  opts = config_lib.parse_arg(arg)
  stage1 = stage1_config(arg)
  c = config_lib.stage2_config(arg)
  c.tokenizer.stage1 = stage1
  c.data = ml_collections.ConfigDict(stage1.data.to_dict())
  # A toy DQ-Transformer (1 position + 2 content layers, width 128, under 1M
  # parameters) that fits ~5 CPU minutes; it learns where the fine codes go
  # and the coarse statistics of the codes, not photographs.
  c.model.update(dict(
      width=128, num_heads=4, position_layers=1, content_layers=2,
      block_size=512, embed_dropout=0.1, attn_dropout=0.0,
      resid_dropout=0.1, remat=False))  # remat only pays for big batches
  # Class-conditional on the source photograph (the demo's label): the
  # samples cycle through the 14 training photographs, so each shows the
  # colours and textures of one of them. Unconditional at this size and
  # length, the samples were a mix of all 14 (README "The demo").
  c.model.num_classes = len(demo_data.PHOTOS)
  c.sample_class_labels = tuple(
      i for i, (name, _) in enumerate(demo_data.PHOTOS)
      if name not in demo_data.VALIDATION_PHOTOS)
  # Contents at temperature 0.7, positions at 1 (the code count stays the
  # data's, about 160 per image): at 1 the contents were speckled noise
  # over the photograph's colours, at 0.7 the textures hold together (the
  # moon's craters, the stained cells, the retina's vessels).
  c.sampling.temperature_content = 0.7
  c.optim.base_learning_rate = 1e-3
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 240
  c.num_eval_batches = 0
  c.log_every = 20
  c.eval_every = 120
  c.image_every = 120
  c.checkpoint_every = 120
  c.num_images = 8
  c.sample_images = 16                # written to WORKDIR/samples
  if opts['runlocal']:
    config_lib.runlocal(c)
    c.model.update(transformer_lib.tiny_kwargs())
    c.sample_images = 4
  return c


def stage1_config(arg=None):
  """The demo tokenizer: a small dual-grain DQ-VAE with the learned router."""
  opts = config_lib.parse_arg(arg)
  c = config_lib.stage1_config(arg)
  c.data.name = 'dqvq_demo'
  c.data.data_dir = os.environ.get(
      'DQVQ_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  c.data.read_threads = 4
  c.model.update(dict(
      grain_factors=(8, 4), grain_ratios=(0.5, 0.5), ch=32,
      ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_factors=(8,),
      z_channels=64, dec_ch=32, dec_ch_mult=(1, 1, 2),
      dec_num_res_blocks=0, dec_attn_factors=(), codebook_size=256,
      codebook_dim=64, router='feature', router_target='gain',
      router_inputs='mean_std', router_inference='expected',
      router_train_routing='inference',
      entropy_thresholds='auto',  # used if router=entropy is set
      # 8 groups: >= 4 channels per GroupNorm group at these widths. With
      # the paper's 32 (1-2 channels per group) colour and brightness did
      # not pass the encoder and the decoder painted blobs and streaks
      # (tests/test_tokenizer_fidelity.py; validation 16.7 -> 19.5 dB).
      norm_groups=8,
      # The paper's decoder has no position embedding (the official adds one);
      # at demo scale it made no difference (train L1 0.245 without, 0.243
      # with, at step 200).
      position_embedding='none'))
  if opts['variant'] in ('entropy', 'random', 'vqgan', 'triple'):
    raise ValueError('configs/demo.py has one model; override config.model.* '
                     'fields to change it.')
  c.loss.perceptual_weight = 0.0
  c.lpips_weights = ''
  c.loss.disc_weight = 0.0
  c.disc.ndf = 32
  c.disc.n_layers = 2
  c.optim.base_learning_rate = 4e-4 / 16
  c.optim.warmup_steps = 20
  c.data.resolution = 64
  # Fresh crops of the training photographs at every scale from 1/10 of the
  # shorter side (texture) to all of it (the scene), at random places.
  c.data.crop_scale = (0.1, 1.0)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 300
  c.num_eval_batches = 0
  c.log_every = 20
  c.eval_every = 150
  c.image_every = 150
  c.checkpoint_every = 150
  c.num_images = 8
  if opts['runlocal']:
    config_lib.runlocal(c)
  return c
