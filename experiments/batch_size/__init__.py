"""The SN paper's batch-size experiment on small real data (Luo et al., ICLR 2019, Table 2 / Fig. 1).

A small residual CNN whose normalization layers come from :func:`normkit.create_norm` is
trained on Fashion-MNIST (or scikit-learn's digits when it is absent) with BN, GN, SN, ...
at several per-device batch sizes. ``python -m experiments.batch_size train`` runs one
configuration and ``python -m experiments.batch_size sweep`` the grid, with the paper-style
table and plots; see ``docs/EXPERIMENT.md``. An application on normkit's public API only,
run from the repository root; its own dependencies are in ``requirements.txt`` here.
"""

__version__ = "0.3.0"

from .data import Dataset, DataError, load_dataset, read_idx
from .model import ResNetSmall
from .train import TrainConfig, scaled_lr, train

__all__ = [
    "__version__",
    "Dataset",
    "DataError",
    "load_dataset",
    "read_idx",
    "ResNetSmall",
    "TrainConfig",
    "scaled_lr",
    "train",
]
