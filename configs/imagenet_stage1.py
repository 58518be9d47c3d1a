"""DQ-VAE on ImageNet, the paper's settings (Sec. 4.1, official configs).

Default: dual grain F={8,16}, r_fine=0.5, learned feature router, batch 240,
50 epochs. Arguments (comma-separated after ':'):
  triple        F={8,16,32} (official r-03-03 shares)
  entropy       the released "better version" entropy router
  random        random regions at the same shares (Table 5 ablation)
  vqgan         one grain, f=16: the fixed-length baseline
  ratio=R       r_fine of the dual model (paper Table 6: 0.1 ... 0.9)
  runlocal      toy widths, demo data, 2 steps (CPU tests)

  python -m dqvq.train --config configs/imagenet_stage1.py:triple --workdir W
"""

from dqvq import config_lib


def get_config(arg=None):
  c = config_lib.stage1_config(arg)
  if not config_lib.parse_arg(arg)['runlocal']:
    c.data.name = 'imagenet2012'
    c.lpips_weights = ''  # set to the converted LPIPS dir (required)
  else:  # the smoke run covers the perceptual loss, with random VGG weights
    c.loss.perceptual_weight = 1.0
    c.lpips_weights = 'random'
  if c.model.router in ('entropy', 'random'):
    c.loss.budget_kind = 'none'  # no budget loss without a learned gate
  return c
