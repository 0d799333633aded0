"""Fashion-MNIST from its IDX files, with scikit-learn's digits as the always-there fallback.

IDX is the format of LeCun's MNIST and of Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017,
arXiv:1708.07747): a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in row-major order.
Files may be gzipped. Nothing is downloaded: the default directory is where the Debian
package ``dataset-fashion-mnist`` installs the files.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_DATA_DIR", "DataError", "Dataset", "read_idx", "load_fashion_mnist", "load_digits", "load_dataset", "pooled"]

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type code -> (numpy big-endian dtype, item size in bytes)
_IDX_TYPES = {
    0x08: (np.dtype(">u1"), 1),
    0x09: (np.dtype(">i1"), 1),
    0x0B: (np.dtype(">i2"), 2),
    0x0C: (np.dtype(">i4"), 4),
    0x0D: (np.dtype(">f4"), 4),
    0x0E: (np.dtype(">f8"), 8),
}

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(RuntimeError):
    """A data file is missing, truncated or not in the expected format."""


@dataclass
class Dataset:
    """Images as uint8 ``(N, 1, H, W)`` (normalised per batch), labels as int64 ``(N,)``."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: float
    std: float
    num_classes: int = 10

    def batch(self, images: Tensor, index: Optional[Tensor] = None) -> Tensor:
        """Float32 batch standardised with the training set's mean and std."""
        x = images if index is None else images[index]
        return (x.float() / 255.0 - self.mean) / self.std


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); the file is truncated or corrupt, reinstall it") from None


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in ``.gz``) into a numpy array.

    Raises:
        DataError: naming the file, when the header is invalid or the data is shorter or
            longer than the header says (with the expected and the actual size in bytes).
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, got {len(raw)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_TYPES or ndim == 0:
        raise DataError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}; expected 0000 then a type code "
            f"in {sorted(hex(t) for t in _IDX_TYPES)} and a dimension count >= 1)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: expected a {header}-byte header for {ndim} dims, got {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype, itemsize = _IDX_TYPES[type_code]
    expected = header + math.prod(shape) * itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: expected {expected} bytes for shape {tuple(shape)} ({dtype.name}), got {len(raw)} bytes; "
            "the file is truncated or corrupt, reinstall it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{data_dir}: expected {stem} or {stem}.gz in it, found neither")


def _split(data_dir: str, split: str) -> tuple[Tensor, Tensor]:
    image_stem, label_stem = _FILES[split]
    image_path, label_path = _find(data_dir, image_stem), _find(data_dir, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{label_path}: expected {images.shape[0]} labels to match {image_path}, got shape {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _stats(images: Tensor) -> tuple[float, float]:
    x = images.double() / 255.0
    return float(x.mean()), float(x.std())


def load_fashion_mnist(data_dir: str = DEFAULT_DATA_DIR) -> Dataset:
    """Fashion-MNIST (60000 train / 10000 test, 28x28 grey) from the IDX files in ``data_dir``."""
    train_x, train_y = _split(data_dir, "train")
    test_x, test_y = _split(data_dir, "test")
    mean, std = _stats(train_x)
    return Dataset("fashion-mnist", train_x, train_y, test_x, test_y, mean, std)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), split 1497 train / 300 test with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:-300], order[-300:]
    mean, std = _stats(images[train])
    return Dataset("digits", images[train], labels[train], images[test], labels[test], mean, std)


def load_dataset(data_dir: Optional[str] = None, dataset: str = "auto") -> tuple[Dataset, Optional[str]]:
    """Pick the data: ``dataset`` is ``'auto'``, ``'fashion-mnist'`` or ``'digits'``.

    ``'auto'`` reads Fashion-MNIST from ``data_dir`` (default :data:`DEFAULT_DATA_DIR`) and,
    only when no directory was given and the default one is absent, falls back to digits.
    Returns the dataset and a notice to show the user (or None).
    """
    if dataset not in ("auto", "fashion-mnist", "digits"):
        raise DataError(f"dataset must be 'auto', 'fashion-mnist' or 'digits', got {dataset!r}")
    if dataset == "digits":
        return load_digits(), None
    explicit = data_dir is not None
    data_dir = data_dir or DEFAULT_DATA_DIR
    if not os.path.isdir(data_dir):
        if explicit or dataset == "fashion-mnist":
            raise DataError(
                f"data directory {data_dir!r} not found; point --data-dir at the Fashion-MNIST IDX files "
                "(Debian: apt install dataset-fashion-mnist) or pass --dataset digits"
            )
        notice = (
            f"notice: Fashion-MNIST not found at {data_dir} (Debian: apt install dataset-fashion-mnist); "
            "using scikit-learn's 8x8 digits instead, so the numbers will differ from docs/results.md"
        )
        return load_digits(), notice
    return load_fashion_mnist(data_dir), None


_pooled_cache: list[tuple[Dataset, int, Dataset]] = []


def pooled(data: Dataset, factor: int) -> Dataset:
    """``data`` with every image average-pooled by ``factor`` (28x28 -> 14x14 for 2; a
    trailing row / column that does not fill a window is dropped), as float32 in [0, 255]
    with the mean and std of the pooled training images. ``factor`` 1 returns ``data``
    itself. The result is cached per dataset object (a sweep process pools once)."""
    if factor == 1:
        return data
    for source, f, hit in _pooled_cache:
        if source is data and f == factor:
            return hit

    if factor > min(data.train_images.shape[-2:]):
        raise DataError(f"pool {factor} leaves no pixels of the {tuple(data.train_images.shape[-2:])} images")

    def pool(images: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d(images.float(), factor)

    train, test = pool(data.train_images), pool(data.test_images)
    mean, std = _stats(train)
    out = Dataset(data.name + f" (pooled {factor}x)", train, data.train_labels, test, data.test_labels, mean, std, data.num_classes)
    _pooled_cache[:] = [(data, factor, out)]  # one pooled copy at a time (a sweep uses one setting)
    return out
