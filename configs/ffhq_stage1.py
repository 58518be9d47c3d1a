"""DQ-VAE on FFHQ 256x256 (image-folder dataset), the paper's settings.

Set `--config.data.image_folder_root=/path/to/ffhq/images1024x1024` and
optionally taming's split lists (`image_folder_train_list`,
`image_folder_eval_list`). Same arguments as imagenet_stage1.py.
"""

from dqvq import config_lib


def get_config(arg=None):
  c = config_lib.stage1_config(arg)
  if not config_lib.parse_arg(arg)['runlocal']:
    c.data.name = 'image_folder'
    c.data.image_folder_root = ''  # required: the FFHQ image folder
    c.num_train_steps = 100_000
  if c.model.router in ('entropy', 'random'):
    c.loss.budget_kind = 'none'
  return c
