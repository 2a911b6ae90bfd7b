"""Fashion-MNIST, the embedded real data set: Debian's IDX files (`dataset-fashion-mnist`), converted once into a
`datasets` cache with the training split's per-channel statistics, read back as uint8 tensors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor

from swap_accel.data.caches import build_once, cache_key, cache_root, channel_stats, file_key
from swap_accel.data.sources import DataError
from swap_accel.recipe import DataConfig

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    fix = "replace the file (Debian: apt-get install --reinstall dataset-fashion-mnist) or set data.root"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); {fix}") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= header else None
    if magic != 0x800 + ndim:  # IDX magic: 0x08 = unsigned byte data, then the number of dimensions
        raise DataError(f"{path}: not an IDX file with {ndim} dimension(s) (bad header); {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: truncated or corrupt IDX file ({len(raw) - header} data bytes, header "
                        f"says {int(np.prod(dims))}); {fix}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # writable, for torch.from_numpy


def _convert_fashion_mnist(root: Path, out: Path) -> None:
    # One conversion per machine; its per-split progress bars would only clutter the launch output.
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Array2D(shape=(28, 28), dtype="uint8"),
                                  "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images, labels = _read_idx(root / image_file, 3), _read_idx(root / label_file, 1)
        if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{root}: {image_file} {images.shape} and {label_file} {labels.shape} do not form "
                            f"Fashion-MNIST; replace the files or set data.root")
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        if split == "train":
            (out / "stats.json").write_text(json.dumps(channel_stats(torch.from_numpy(images)[:, None])))
    datasets.DatasetDict(splits).save_to_disk(str(out))


def fashion_mnist_cache(cfg: DataConfig) -> Path:
    root = cfg.root or FASHION_MNIST_ROOT
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST IDX files not found in {root} (missing {', '.join(missing)}); install them "
                        f"with `apt-get install dataset-fashion-mnist` or set data.root")
    # Keyed by the source files, so pointing data.root elsewhere or replacing a file rebuilds the cache.
    key = cache_key([file_key(root / name) for name in names])
    return build_once(cache_root(cfg) / f"fashion_mnist-{key}", lambda out: _convert_fashion_mnist(root, out))


def fashion_mnist_split(cfg: DataConfig, split_name: str) -> tuple[datasets.Dataset, Path]:
    """(the split as a memory-mapped `datasets.Dataset`, the cache directory holding it)."""
    cache = fashion_mnist_cache(cfg)
    splits = datasets.load_from_disk(str(cache))
    if split_name not in splits:
        raise DataError(f"Fashion-MNIST has no split {split_name!r} (splits: {', '.join(splits)}); "
                        f"set data.train_split/test_split to one of them")
    return splits[split_name], cache


def load_fashion_mnist(cfg: DataConfig, split_name: str) -> tuple[Tensor, Tensor, dict]:
    ds, cache = fashion_mnist_split(cfg, split_name)
    # Straight from Arrow storage: ~100x faster than the numpy formatter, which returns int64 copies.
    column = ds.data.column("image")
    images = np.concatenate([chunk.storage.flatten().flatten().to_numpy() for chunk in column.chunks])
    labels = ds.data.column("label").to_numpy()
    stats = json.loads((cache / "stats.json").read_text())
    return torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.from_numpy(labels.astype(np.int64)), stats
