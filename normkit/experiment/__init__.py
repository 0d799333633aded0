"""The SN paper's batch-size experiment on small real data (Luo et al., ICLR 2019, Table 2 / Fig. 1).

A small residual CNN whose normalization layers come from :func:`normkit.create_norm` is
trained on Fashion-MNIST (or scikit-learn's digits when it is absent) with BN, GN, SN, ...
at several per-device batch sizes. ``normkit train`` runs one configuration and
``normkit sweep`` the grid, with the paper-style table and plots; see ``docs/EXPERIMENT.md``.
"""

from normkit.experiment.data import Dataset, DataError, load_dataset, read_idx
from normkit.experiment.model import ResNetSmall
from normkit.experiment.train import TrainConfig, scaled_lr, train

__all__ = [
    "Dataset",
    "DataError",
    "load_dataset",
    "read_idx",
    "ResNetSmall",
    "TrainConfig",
    "scaled_lr",
    "train",
]
