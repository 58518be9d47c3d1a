"""Datasets (TFDS builders) and the grain input pipeline.

Importing this package registers the `dqvq_demo` and `dqvq_image_folder`
TFDS builders. See `pipeline` for the config fields and batch format.
"""

from dqvq.data.demo import load_demo
from dqvq.data.image_folder import image_folder_config
from dqvq.data.image_folder import load_image_folder
from dqvq.data.pipeline import create_datasets
from dqvq.data.pipeline import Datasets
from dqvq.data.pipeline import host_shard
from dqvq.data.pipeline import make_eval_dataset
from dqvq.data.pipeline import make_global_batch
from dqvq.data.pipeline import make_train_dataset
from dqvq.data.pipeline import shard_for_host
from dqvq.data.sources import DataNotPreparedError
from dqvq.data.sources import KNOWN_DATASETS
from dqvq.data.sources import validate_data_config
from dqvq.data.token_pipeline import create_token_datasets
