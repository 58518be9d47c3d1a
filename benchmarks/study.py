r"""The paper's claims in miniature, from the benchmarks folder.

  python benchmarks/study.py --workdir W [--steps 300] [--config ...] \
      [--only table5,budget,table6,figure5] [--set FIELD=VALUE ...]

The same command as `python -m dqvq.study` (same flags, same outputs:
W/study.json, W/study.md, rate_distortion.png, coding_vs_error.png), here
beside the benchmarks that measure the study's models further
(`figure5_training_length.py`, `table6_crop_law.py`).
The study lives in the package so that an installed dqvq runs it without a
checkout; this file only puts the checkout on the path and calls it. The
README's "The paper's claims in miniature" gives its figures.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from dqvq import study

if __name__ == '__main__':
  study.define_flags()
  # Defined in dqvq.study, they are this script's own: --helpshort lists them.
  flags.adopt_module_key_flags(study)
  study.cli()
