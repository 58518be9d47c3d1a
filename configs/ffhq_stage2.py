"""DQ-Transformer on FFHQ: unconditional, the paper's base model widths.

Data: an image folder (FFHQ's layout) as for `configs/ffhq_stage1.py`; set
`--config.data.image_folder_root=DIR` (and the split lists if you use
taming's ffhqtrain.txt / ffhqvalidation.txt). Arguments: `large`,
`runlocal`.

  python -m dqvq.train --config configs/ffhq_stage2.py --workdir W \
      --config.tokenizer.workdir=/runs/dqvae_ffhq \
      --config.data.image_folder_root=/data/ffhq
"""

from dqvq import config_lib


def get_config(arg=None):
  arg = ','.join(filter(None, [arg, 'uncond']))
  c = config_lib.stage2_config(arg)
  if not config_lib.parse_arg(arg, extra=('large', 'uncond'))['runlocal']:
    c.data.name = 'image_folder'
  return c
