"""DQ-Transformer on ImageNet: the paper's class-conditional base model.

6 Position + 18 Content layers, width 1024, 8 heads (313,999,360 params),
AdamW lr 5e-4 (0.9, 0.95), weight decay 0.01 on linear weights, cosine
schedule, batch 240, 100 epochs (official `class_imagenet_p6c18.yml`).
Arguments (comma-separated after ':'):
  large      6 + 42 layers (the paper's 608M model)
  uncond     unconditional
  cfg=P      label dropout P (null class) for classifier-free guidance
  runlocal   toy widths, demo data, 2 steps (CPU tests)

Tokens: a token dataset from `python -m dqvq.tokenize` (recommended) or the
images encoded on the fly:

  python -m dqvq.tokenize --stage1_workdir /runs/dqvae --out /data/tokens
  python -m dqvq.train --config configs/imagenet_stage2.py --workdir W \
      --config.tokenizer.workdir=/runs/dqvae --config.tokens_dir=/data/tokens
"""

from dqvq import config_lib


def get_config(arg=None):
  opts = config_lib.parse_arg(arg, extra=('large', 'uncond'))
  c = config_lib.stage2_config(arg)
  if 'cfg' in opts:
    c.model.label_dropout = float(opts['cfg'])
  if not opts['runlocal']:
    c.data.name = 'imagenet2012'
  return c
