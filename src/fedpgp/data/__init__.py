"""The data layer: dataset loaders, base/novel and few-shot splits, client partitions.

Importing the package registers every loader, so `load_dataset(name, root)` knows all names.
It imports no model code.
"""

from fedpgp.data import cifar, coop, domains, world  # noqa: F401  (registers the loaders)
from fedpgp.data.datasets import (
    ArrayImages,
    DatasetProblemsError,
    DatasetSplits,
    FileImages,
    ImageSource,
    LabeledSet,
    dataset_names,
    load_dataset,
    register,
)
from fedpgp.data.partition import (
    ClientPart,
    PartitionManifest,
    load_or_make_partition,
    make_partition,
    resolve_params,
)
from fedpgp.data.splits import base_novel_split, few_shot_indices

__all__ = [
    "ArrayImages",
    "ClientPart",
    "DatasetProblemsError",
    "DatasetSplits",
    "FileImages",
    "ImageSource",
    "LabeledSet",
    "PartitionManifest",
    "base_novel_split",
    "dataset_names",
    "few_shot_indices",
    "load_dataset",
    "load_or_make_partition",
    "make_partition",
    "register",
    "resolve_params",
]
