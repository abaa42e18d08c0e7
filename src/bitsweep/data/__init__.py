"""Datasets as uint8 tensors in memory, a device-resident loader, and batched augmentation.

>>> from bitsweep.config import DataConfig
>>> splits = load_dataset(DataConfig(name="synthetic"))
>>> splits.train.images.shape, splits.num_classes
(torch.Size([500, 3, 16, 16]), 10)
"""

from bitsweep.data.download import Archive, default_data_dir
from bitsweep.data.loader import TensorLoader
from bitsweep.data.registry import list_datasets, load_dataset
from bitsweep.data.types import DatasetSplits, ImageSet, channel_stats

__all__ = [
    "Archive",
    "DatasetSplits",
    "ImageSet",
    "TensorLoader",
    "channel_stats",
    "default_data_dir",
    "list_datasets",
    "load_dataset",
]
