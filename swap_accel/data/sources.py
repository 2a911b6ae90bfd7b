"""Data sources for SWAP: small data sets in memory, large ones streamed, one interface for both.

SWAP's phases all read data the same way: phase 1 and phase 2 train on shuffled (and, in phase 2, per-worker)
index orders, BatchNorm is recalibrated after averaging on plain images, and evaluation goes through
accelerate's `gather_for_metrics` (paper Algorithm 1). So a `DataSource` yields batches for any index
`order` the trainer hands it, and gives a plain DataLoader for evaluation.

Two implementations. `InMemorySource` keeps uint8 images on the training device and augments whole batches
there (swap_accel.data.augment): for Fashion-MNIST and CIFAR a per-sample PIL pipeline would cost more than the
small CNN's step. `StreamingSource` is for ImageNet-sized data: DataLoader workers decode and transform
with timm's standard pipeline.

`prepare_data` does the one-time work (IDX → `datasets` conversion, per-channel statistics) before any
process group exists. Every launched process calls it, so caches are built under a file lock in a temporary
directory and renamed into place atomically; the loser of the race finds the cache and reuses it.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from filelock import FileLock
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from swap_accel.data.augment import augment_batch, cutout_
from swap_accel.data.resized import build_copy, load_copy
from swap_accel.data.sampling import AUGMENT, derive_seed
from swap_accel.recipe import AugmentConfig, DataConfig

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEFAULT_STREAMING_SIZE = 224
# `datasets` renames split folders val/valid/dev to "validation"; accept the folder names in the recipe too.
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_DECODE_CHUNK = 1024


class DataError(ValueError):
    """A data problem, phrased as one line naming the problem and the fix."""


class DataSource:
    """Common interface of the in-memory and streaming sources (see module docstring)."""

    num_samples: int
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    class_names: list[str]
    device: torch.device

    def batches(
        self, order: Tensor, batch_size: int | list[int], *, augment: bool, generator: torch.Generator | None,
        epoch: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (float32 normalized images [B,C,H,W], int64 labels [B]) on `self.device` following `order`.
        `epoch` keys a streaming source's per-image augmentation (the in-memory one draws from `generator`).

        Every index of `order` (int64, any length, may repeat or be a shard) is yielded exactly once and in
        order, the last partial batch included; a list of sizes gives batches of exactly those sizes.
        augment=False gives plain normalized images (BN recalibration, evaluation).
        """
        raise NotImplementedError

    def eval_loader(self, batch_size: int) -> DataLoader:
        """All samples in index order as CPU (normalized images, int64 labels), for accelerate's prepare."""
        raise NotImplementedError

    def for_stage(self, image_size: int | None, min_scale: float | None, read_resized: int | None = None) -> DataSource:
        """This source with its training images at `image_size` px and RandomResizedCrop's scale from `min_scale`,
        read from the copies resized to a `read_resized` px shorter side (a schedule's stage, paper Figure 5); None
        keeps the source's own. In-memory data trains at its native size: the recipe refuses stages for it."""
        if image_size is None and min_scale is None and read_resized is None:
            return self
        raise ValueError(f"{type(self).__name__} trains at its native size; stage image sizes need streaming data")


def _split_order(order: Tensor, num_samples: int, batch_size: int | list[int]) -> tuple[Tensor, ...]:
    """`order` cut into batches of `batch_size`, the last one partial, or of the listed sizes (a worker group's
    member shard, sampling.worker_shard); no batches at all for an empty order."""
    if min(batch_size if isinstance(batch_size, list) else [batch_size], default=1) <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size}")
    order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
    # Checked on the CPU: an out-of-range index on CUDA is an asynchronous device assert, not an error.
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= num_samples):
        low, high = int(order.min()), int(order.max())
        raise ValueError(f"order holds indices outside [0, {num_samples}): min {low}, max {high}")
    return order.split(batch_size) if order.numel() else ()


class _NormalizedTensors(Dataset):
    """CPU view of an in-memory source for `eval_loader`; `__getitems__` normalizes a whole batch at once."""

    def __init__(self, images: Tensor, labels: Tensor, shift: Tensor, scale: Tensor) -> None:
        self.images, self.labels, self.shift, self.scale = images, labels, shift, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.images[i].float() - self.shift[0]) * self.scale[0], self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = (self.images[idx].float() - self.shift) * self.scale
        return list(zip(x.unbind(0), self.labels[idx].unbind(0), strict=True))


class InMemorySource(DataSource):
    """uint8 images held on the device, augmented per batch on the device (crop, flip, cutout)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: list[float],
        std: list[float],
        class_names: list[str],
        augment: AugmentConfig,
        device: torch.device,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"need uint8 images [N,C,H,W] and labels [N], got {images.dtype} {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.num_samples, self.in_chans = images.shape[0], images.shape[1]
        self.image_size = (images.shape[2], images.shape[3])
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.mean, self.std, self.augment = list(mean), list(std), augment
        self._cpu_images, self._cpu_labels = images, labels.to(torch.int64)
        self.images = images.to(self.device)
        self.labels = self._cpu_labels.to(self.device)
        # (x/255 - mean)/std == (x - 255 mean) * 1/(255 std): one subtract and one multiply per batch.
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self._scale = 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self._shift_dev, self._scale_dev = self._shift.to(self.device), self._scale.to(self.device)

    def batches(
        self, order: Tensor, batch_size: int | list[int], *, augment: bool, generator: torch.Generator | None,
        epoch: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        chunks = _split_order(order, self.num_samples, batch_size)
        if augment and generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"the augmentation generator is on {generator.device} but the images are on "
                             f"{self.device}; create it with torch.Generator(device=...)")
        for idx in chunks:
            idx = idx.to(self.device, non_blocking=True)
            x = self.images[idx]
            if augment:
                x = augment_batch(x, self.augment, generator)
            x = (x.float() - self._shift_dev) * self._scale_dev
            if augment:
                cutout_(x, self.augment.cutout_size, generator)
            yield x, self.labels[idx]

    def eval_loader(self, batch_size: int) -> DataLoader:
        data = _NormalizedTensors(self._cpu_images, self._cpu_labels, self._shift, self._scale)
        return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=False)


class _TransformedRows(Dataset):
    """HF rows → (transformed RGB image, label); picklable, so it works in DataLoader workers."""

    def __init__(self, rows: datasets.Dataset, image_column: str, label_column: str, transform: Callable) -> None:
        self.rows, self.image_column, self.label_column, self.transform = rows, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        """`key`: a row index, or (row index, the epoch's augmentation key) for a training image."""
        i, epoch_key = key if isinstance(key, tuple) else (key, None)
        row = self.rows[int(i)]
        # timm's ImageNet pipeline expects 3 channels; grey, palette, CMYK and RGBA files all occur in the wild.
        image = row[self.image_column].convert("RGB")
        if epoch_key is None:
            return self.transform(image), row[self.label_column]
        # Derived here, in the DataLoader worker, not for the whole epoch in the training process.
        seed = derive_seed(epoch_key, i)
        # Exact resume: this image's augmentation is a pure function of its seed, whichever DataLoader worker
        # decodes it and wherever in the epoch a launch starts. timm's transforms draw from Python's `random` and
        # torch's global RNG; both are seeded here and put back after, so nothing else's stream moves.
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            x = self.transform(image)
        random.setstate(python_state)
        return x, row[self.label_column]


class StreamingSource(DataSource):
    """Images decoded and transformed by DataLoader workers with timm's train/eval pipelines.

    The train transform's randomness for image i in epoch e is seeded from (the initial seed of the caller's
    augmentation generator, e, i): one stream per process or worker member, and one draw per image and epoch,
    the same in a resumed launch as in the uninterrupted one.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        *,
        image_column: str,
        label_column: str,
        class_names: list[str],
        image_size: int,
        num_workers: int,
        device: torch.device,
        copies: dict[int, datasets.Dataset] | None = None,
    ) -> None:
        """`copies`: the same rows with images resized to each shorter side (data.resized), for stages that read
        them."""
        self.device = torch.device(device)
        self.num_samples, self.in_chans, self.image_size = len(rows), 3, (image_size, image_size)
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.num_workers = num_workers
        self._rows = rows.select_columns([image_column, label_column])
        self._columns = (image_column, label_column)
        self._copies = {side: resized_rows.select_columns([image_column, label_column])
                        for side, resized_rows in (copies or {}).items()}
        self._train = self._transformed(image_size, is_training=True)
        self._eval = self._transformed(image_size, is_training=False)
        self._stages: dict[tuple, StreamingSource] = {}

    def _transformed(self, image_size: int, *, is_training: bool, min_scale: float | None = None,
                     rows: datasets.Dataset | None = None) -> _TransformedRows:
        kwargs = dict(input_size=(3, image_size, image_size), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        if min_scale is not None:
            kwargs["scale"] = (min_scale, 1.0)
        return _TransformedRows(self._rows if rows is None else rows, *self._columns,
                                create_transform(**kwargs, is_training=is_training))

    def for_stage(self, image_size: int | None, min_scale: float | None, read_resized: int | None = None) -> DataSource:
        """A view whose train transform crops to `image_size` from at least `min_scale` of the image, read from the
        `read_resized` copy; evaluation keeps data.image_size and the full images. Every epoch builds its
        DataLoader anew, so the next epoch's workers use it."""
        if image_size is None and min_scale is None and read_resized is None:
            return self
        if read_resized is not None and read_resized not in self._copies:
            raise ValueError(f"no copy resized to {read_resized} px was loaded (load_data(..., resized=...))")
        key = (image_size, min_scale, read_resized)
        if key not in self._stages:
            view = copy.copy(self)
            size = image_size or self.image_size[0]
            view._train = self._transformed(size, is_training=True, min_scale=min_scale,
                                            rows=self._copies.get(read_resized))
            view.image_size = (size, size)
            self._stages[key] = view
        return self._stages[key]

    def _loader(self, data: Dataset, **kwargs) -> DataLoader:
        return DataLoader(data, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, **kwargs)

    def batches(
        self, order: Tensor, batch_size: int | list[int], *, augment: bool, generator: torch.Generator | None,
        epoch: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        index_lists = [chunk.tolist() for chunk in _split_order(order, self.num_samples, batch_size)]
        if not index_lists:
            return
        if augment and generator is not None:
            epoch_key = derive_seed(generator.initial_seed(), AUGMENT, epoch)
            index_lists = [[(i, epoch_key) for i in chunk] for chunk in index_lists]
        loader = self._loader(self._train if augment else self._eval, batch_sampler=index_lists)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def eval_loader(self, batch_size: int) -> DataLoader:
        return self._loader(self._eval, batch_size=batch_size, shuffle=False, drop_last=False)


# ---------------------------------------------------------------------------------------------- caches


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("SWAP_ACCEL_CACHE") or Path.home() / ".cache" / "swap_accel")


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Build directory `final` once across concurrent processes: lock, build in a temp dir, rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp-"))
            try:
                build(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _channel_stats(images: Tensor) -> dict[str, list[float]]:
    """Per-channel mean/std in 0..1 units; float64 sums over chunks of ~4M values keep memory flat."""
    n, c = images.shape[:2]
    total, total_sq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(max(1, 2**22 // images[0].numel())):
        x = chunk.to(torch.float64)
        total += x.sum((0, 2, 3))
        total_sq += x.square().sum((0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    # Clamp at one grey level so a constant channel normalizes to 0 instead of dividing by zero.
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1.0)
    return {"mean": (mean / 255).tolist(), "std": (std / 255).tolist()}


# --------------------------------------------------------------------------------------- Fashion-MNIST


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
            (out / "stats.json").write_text(json.dumps(_channel_stats(torch.from_numpy(images)[:, None])))
    datasets.DatasetDict(splits).save_to_disk(str(out))


def _fashion_mnist_cache(cfg: DataConfig) -> Path:
    root = cfg.root or FASHION_MNIST_ROOT
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST IDX files not found in {root} (missing {', '.join(missing)}); install them "
                        f"with `apt-get install dataset-fashion-mnist` or set data.root")
    # Keyed by the source files, so pointing data.root elsewhere or replacing a file rebuilds the cache.
    key = _digest([_file_key(root / name) for name in names])
    return _build_once(cache_root(cfg) / f"fashion_mnist-{key}", lambda out: _convert_fashion_mnist(root, out))


def _fashion_mnist_split(cfg: DataConfig, split_name: str) -> tuple[datasets.Dataset, Path]:
    """(the split as a memory-mapped `datasets.Dataset`, the cache directory holding it)."""
    cache = _fashion_mnist_cache(cfg)
    splits = datasets.load_from_disk(str(cache))
    if split_name not in splits:
        raise DataError(f"Fashion-MNIST has no split {split_name!r} (splits: {', '.join(splits)}); "
                        f"set data.train_split/test_split to one of them")
    return splits[split_name], cache


def _load_fashion_mnist(cfg: DataConfig, split_name: str) -> tuple[Tensor, Tensor, dict]:
    ds, cache = _fashion_mnist_split(cfg, split_name)
    # Straight from Arrow storage: ~100x faster than the numpy formatter, which returns int64 copies.
    column = ds.data.column("image")
    images = np.concatenate([chunk.storage.flatten().flatten().to_numpy() for chunk in column.chunks])
    labels = ds.data.column("label").to_numpy()
    stats = json.loads((cache / "stats.json").read_text())
    return torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.from_numpy(labels.astype(np.int64)), stats


# ------------------------------------------------------------------------------------ hub, imagefolder


def _describe(cfg: DataConfig) -> str:
    return f"data set {cfg.name}" if cfg.source == "hub" else f"image folder {cfg.root}"


def _load_hf(cfg: DataConfig) -> datasets.DatasetDict:
    """`load_dataset` for a hub name, a local dataset directory (parquet files or `save_to_disk` output, both
    understood offline by datasets >= 4) or an image folder (root/split/class/image)."""
    if cfg.source == "imagefolder":
        if not cfg.root.is_dir():
            raise DataError(f"image folder {cfg.root} does not exist; set data.root to a directory laid out as "
                            f"root/train/<class>/<image> (and root/val or root/test)")
        args, kwargs = ("imagefolder",), {"data_dir": str(cfg.root)}
    else:
        if cfg.name.startswith(("/", ".", "~")) and not Path(cfg.name).expanduser().exists():
            raise DataError(f"data.name {cfg.name} looks like a local path but does not exist; fix the path or "
                            f"use a hub name such as uoft-cs/cifar10")
        args, kwargs = (str(Path(cfg.name).expanduser()) if cfg.name.startswith("~") else cfg.name,), {}
    # An explicit data.cache_dir holds HF's cache too (tests, sandboxes); otherwise HF's own cache is reused.
    hf_cache = str(cfg.cache_dir / "hf") if cfg.cache_dir else None
    try:
        loaded = datasets.load_dataset(*args, **kwargs, cache_dir=hf_cache)
    except (FileNotFoundError, ConnectionError) as e:
        raise DataError(f"cannot load {_describe(cfg)}: {str(e).splitlines()[0]}; check the name/path, or the "
                        f"network and HF cache for hub data sets") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{_describe(cfg)} loaded as {type(loaded).__name__}, not a dict of splits; "
                        f"use a non-streaming map-style data set")
    return loaded


def _split(splits: datasets.DatasetDict, name: str, cfg: DataConfig) -> datasets.Dataset:
    resolved = name if name in splits else _SPLIT_ALIASES.get(name, name)
    if resolved not in splits and cfg.source == "imagefolder" and name == "test" and "validation" in splits:
        resolved = "validation"  # ImageNet layout: root/train and root/val, and the recipe kept the default
    if resolved not in splits:
        raise DataError(f"{_describe(cfg)} has no split {name!r} (splits: {', '.join(splits)}); "
                        f"set data.train_split/data.test_split to one of them")
    ds = splits[resolved]
    if len(ds) == 0:
        raise DataError(f"{_describe(cfg)}: split {resolved!r} is empty; point data at a non-empty data set")
    return ds


def _columns(ds: datasets.Dataset, cfg: DataConfig) -> tuple[str, str, list[str]]:
    """(image column, label column, class names), autodetected unless the recipe names them."""
    features, what = ds.features, _describe(cfg)
    available = ", ".join(f"{name} ({type(f).__name__})" for name, f in features.items())
    for key, kind in (("image_column", datasets.Image), ("label_column", datasets.ClassLabel)):
        name = getattr(cfg, key)
        if name is not None and not isinstance(features.get(name), kind):
            problem = "not found" if name not in features else f"is not a {kind.__name__} column"
            raise DataError(f"{what}: {key} {name!r} {problem} (columns: {available}); set data.{key} to one of them")
    image = cfg.image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
    # cifar100 has fine_label and coarse_label: the paper's task is the 100-way fine one.
    label = cfg.label_column or next((n for n in ("label", "fine_label") if n in labels), labels[0] if labels else None)
    if image is None:
        raise DataError(f"{what}: no Image column (columns: {available}); set data.image_column")
    if label is None:
        hint = " (datasets adds labels only for 2+ class folders)" if cfg.source == "imagefolder" else ""
        raise DataError(f"{what}: no ClassLabel column{hint} (columns: {available}); SWAP needs a classification "
                        f"data set with at least 2 classes: set data.label_column or fix the data")
    names = features[label].names
    if len(names) < 2:
        raise DataError(f"{what} has a single class ({names}); SWAP needs a classification data set with at least "
                        f"2 classes")
    return image, label, names


def _labels(ds: datasets.Dataset, column: str, num_classes: int, cfg: DataConfig) -> Tensor:
    labels = torch.from_numpy(np.asarray(ds.select_columns([column]).with_format("numpy")[:][column], np.int64))
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{_describe(cfg)}: split {ds.split} has labels outside [0, {num_classes}) (min {low}, max "
                        f"{high}; -1 means unlabelled); use a labelled split, e.g. data.test_split: validation")
    return labels


def _decode(ds: datasets.Dataset, column: str, cfg: DataConfig) -> Tensor:
    """All images as uint8 [N,C,H,W], decoded in chunks through the numpy formatter."""
    view, out = ds.select_columns([column]).with_format("numpy"), None
    for start in range(0, len(ds), _DECODE_CHUNK):
        array = view[start : start + _DECODE_CHUNK][column]
        shape = out.shape[1:] if out is not None else None
        if array.dtype == object or array.dtype != np.uint8 or (shape and array.shape[1:3] != shape[1:]):
            raise DataError(f"{_describe(cfg)}: images differ in size/channels or are not 8-bit (e.g. near sample "
                            f"{start}), so they cannot be stacked in memory; set data.in_memory: false (streaming "
                            f"resizes to data.image_size)")
        chunk = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)
        if out is None:
            out = torch.empty((len(ds), *chunk.shape[1:]), dtype=torch.uint8)
        elif chunk.shape[1] != out.shape[1]:
            raise DataError(f"{_describe(cfg)}: images have mixed channel counts; set data.in_memory: false")
        out[start : start + len(chunk)] = chunk
    return out


def _train_stats(cfg: DataConfig, train: datasets.Dataset, column: str, images: Tensor | None = None) -> dict:
    """Per-channel mean/std of the FULL train split (also used for the test split), cached per data set."""
    key = _digest([cfg.source, cfg.name, cfg.root, column, [_file_key(Path(f["filename"])) for f in train.cache_files]])
    cache = cache_root(cfg) / "stats" / f"{cfg.source}-{key}"

    def build(out: Path) -> None:
        stats = _channel_stats(images if images is not None else _decode(train, column, cfg))
        (out / "stats.json").write_text(json.dumps(stats))

    return json.loads((_build_once(cache, build) / "stats.json").read_text())


# ------------------------------------------------------------------------------------------- public API


def _seed0_order(num_samples: int) -> Tensor:
    """One permutation of a split, the same across runs and processes: subsets and the held-out split are its
    slices, so they are class-balanced on average and never overlap."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))


def _subset(num_samples: int, k: int | None, key: str) -> Tensor | None:
    """First k of the seed-0 permutation."""
    if k is None:
        return None
    if k > num_samples:
        raise DataError(f"data.{key}={k} exceeds the {num_samples} samples of the split; lower it or remove it")
    return _seed0_order(num_samples)[:k].sort().values


def _indices(num_samples: int, cfg: DataConfig, split: str) -> Tensor | None:
    """The samples of its split a source holds (None: all). "train" and "holdout" share one seed-0
    permutation of the training split: train_subset takes its first samples, data.holdout_samples its last, so
    the two never overlap and setting a hold-out leaves an explicit train_subset as it was."""
    if split == "test":
        return _subset(num_samples, cfg.test_subset, "test_subset")
    held = cfg.holdout_samples
    if not held:
        if split == "holdout":
            raise DataError("no held-out split: set data.holdout_samples=N to carve N images out of the training "
                            "split (they are then not trained on)")
        return _subset(num_samples, cfg.train_subset, "train_subset")
    train = cfg.train_subset or num_samples - held
    if train < 1 or train + held > num_samples:
        raise DataError(f"data.holdout_samples={held} plus {train} training images exceed the {num_samples} samples "
                        "of the training split; lower data.holdout_samples or data.train_subset")
    order = _seed0_order(num_samples)
    return (order[:train] if split == "train" else order[num_samples - held :]).sort().values


# The length of the training split per data set, as load_data read it: provenance() needs it, and a second read of a
# large hub or image-folder data set in the same process would cost seconds.
_TRAIN_SPLIT_SIZES: dict[str, int] = {}


def _train_split_key(cfg: DataConfig) -> str:
    return _digest([cfg.source, cfg.name, cfg.root, cfg.train_split])


def train_split_size(cfg: DataConfig) -> int:
    """Images in cfg.train_split before any subset or hold-out; no image is decoded (the Fashion-MNIST cache's or the
    HF split's row count), so the CLI can ask before any process group forms."""
    key = _train_split_key(cfg)
    if key not in _TRAIN_SPLIT_SIZES:
        if cfg.source == "fashion_mnist":
            _TRAIN_SPLIT_SIZES[key] = len(_fashion_mnist_split(cfg, cfg.train_split)[0])
        else:
            _TRAIN_SPLIT_SIZES[key] = len(_split(_load_hf(cfg), cfg.train_split, cfg))
    return _TRAIN_SPLIT_SIZES[key]


def provenance(cfg: DataConfig) -> dict:
    """What a checkpoint records of the images it was trained on (checkpoint manifests, key "data").

    `train_indices` is the sha256 of the training indices exactly as load_data(split="train") selects them (every
    index of the split without subset or hold-out) and of the split's length. Two records with the same source, name,
    split and digest trained on the same images; and since the hold-out is the other end of the same seed-0
    permutation (`_indices`), a recipe whose training digest equals a checkpoint's holds out no image that checkpoint
    trained on. A hub name identifies its data; a Fashion-MNIST or image-folder root is only where the data lies
    (a moved copy is the same data), so it is not recorded.
    """
    total = train_split_size(cfg)
    idx = _indices(total, cfg, "train")
    idx = torch.arange(total) if idx is None else idx
    digest = hashlib.sha256(f"{total}:".encode())
    digest.update(idx.to(torch.int64).numpy().astype("<i8").tobytes())
    return {"source": cfg.source, "name": cfg.name if cfg.source == "hub" else None, "split": cfg.train_split,
            "split_samples": total, "train_subset": cfg.train_subset, "holdout_samples": cfg.holdout_samples,
            "train_samples": len(idx), "train_indices": digest.hexdigest()}


def _show(value: object) -> str:
    return "null" if value is None else str(value)


def describe_provenance(p: dict) -> str:
    """One provenance record as a phrase for an error line."""
    data = p["source"] + (f" {p['name']}" if p.get("name") else "")
    return (f"{data} split {p['split']!r} with train_subset={_show(p['train_subset'])}, holdout_samples="
            f"{_show(p['holdout_samples'])} ({p['train_samples']} of {p['split_samples']} images, indices sha256 "
            f"{p['train_indices'][:12]})")


def provenance_sets(p: dict) -> str:
    """The overrides that give a recipe the subset and hold-out of record `p`."""
    return (f"--set data.train_subset={_show(p['train_subset'])} "
            f"--set data.holdout_samples={_show(p['holdout_samples'])}")


def same_data_set(theirs: dict, ours: dict) -> bool:
    return all(theirs.get(k) == ours.get(k) for k in ("source", "name", "split", "split_samples"))


def same_training_images(theirs: dict, ours: dict) -> bool:
    return same_data_set(theirs, ours) and theirs.get("train_indices") == ours.get("train_indices")


def held_out_trained_on(theirs: dict, ours: dict) -> int:
    """How many of `ours`'s held-out images `theirs` trained on. Both are slices of one seed-0 permutation of the same
    split (`_indices`): training takes its first `train_samples`, the hold-out its last `holdout_samples`."""
    if not ours.get("holdout_samples") or not same_data_set(theirs, ours):
        return 0
    return max(0, theirs["train_samples"] - (ours["split_samples"] - ours["holdout_samples"]))


def _check_size(cfg: DataConfig, images: Tensor) -> None:
    # In-memory data trains at its native size; resizing belongs to the streaming path's transforms.
    if cfg.image_size is not None and images.shape[2:] != (cfg.image_size, cfg.image_size):
        raise DataError(f"data.image_size={cfg.image_size} but the in-memory images are "
                        f"{images.shape[2]}x{images.shape[3]}; remove data.image_size or set data.in_memory: false")
    side = min(images.shape[2:])
    for key, value in (("cutout_size", cfg.augment.cutout_size), ("crop_padding", cfg.augment.crop_padding)):
        if value >= side and value > 0:  # a hole or a shift as large as the image leaves nothing of it
            raise DataError(f"data.augment.{key}={value} is not smaller than the {images.shape[2]}x{images.shape[3]} "
                            f"images; use less than {side} (0 turns it off)")


def prepare_data(cfg: DataConfig, resized: list[int] = ()) -> None:
    """One-time conversion/caching and existence checks, and the training split's copies resized to each shorter
    side in `resized` (streaming data); safe before any process group, and concurrently."""
    if cfg.source == "fashion_mnist":
        _fashion_mnist_cache(cfg)
        return
    splits = _load_hf(cfg)
    train, test = _split(splits, cfg.train_split, cfg), _split(splits, cfg.test_split, cfg)
    for ds in (train, test):
        _, label, names = _columns(ds, cfg)
        _labels(ds, label, len(names), cfg)
    if cfg.in_memory:
        _train_stats(cfg, train, _columns(train, cfg)[0])
    for side in resized:
        _resized_copy(cfg, train, side)


def _resized_copy(cfg: DataConfig, train: datasets.Dataset, side: int) -> datasets.Dataset:
    """The whole training split with its images resized to a `side` px shorter side (data.resized), built once
    under the cache (file lock, temporary directory, rename) and read from there after; rows in split order."""
    image, label, _ = _columns(train, cfg)
    final = cache_root(cfg) / "resized" / f"{_digest([_train_split_key(cfg), len(train), side])}-{side}px"
    _build_once(final, lambda out: build_copy(train.select_columns([image, label]), image, side, out,
                                              num_proc=cfg.num_workers))
    return load_copy(final)


def load_data(cfg: DataConfig, device: torch.device, *, split: str, resized: list[int] = ()) -> DataSource:
    """The "train", "test" or "holdout" source: cfg.train_split less the held-out images (`_indices`), cfg.test_split,
    or the held-out images of cfg.train_split; subset per cfg.train_subset/test_subset. A streaming train source
    also reads the copies resized to each shorter side in `resized` (`for_stage`).

    In-memory sources of any split normalize with the train split's statistics.
    """
    if split not in ("train", "test", "holdout"):
        raise ValueError(f"split must be 'train', 'test' or 'holdout', got {split!r}")
    split_name = cfg.test_split if split == "test" else cfg.train_split
    if cfg.source == "fashion_mnist":
        images, labels, stats = _load_fashion_mnist(cfg, split_name)
        if split != "test":
            _TRAIN_SPLIT_SIZES[_train_split_key(cfg)] = len(labels)
        idx = _indices(len(labels), cfg, split)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        _check_size(cfg, images)
        return InMemorySource(images, labels, **stats, class_names=FASHION_MNIST_CLASSES, augment=cfg.augment,
                              device=device)
    splits = _load_hf(cfg)
    ds = _split(splits, split_name, cfg)
    image, label, names = _columns(ds, cfg)
    labels = _labels(ds, label, len(names), cfg)
    if split != "test":
        _TRAIN_SPLIT_SIZES[_train_split_key(cfg)] = len(ds)
    idx = _indices(len(ds), cfg, split)
    copies = {side: _resized_copy(cfg, ds, side) for side in resized} if split == "train" else {}
    if idx is not None:
        ds, labels = ds.select(idx.tolist()), labels[idx]
        copies = {side: rows.select(idx.tolist()) for side, rows in copies.items()}
    if not cfg.in_memory:
        return StreamingSource(ds, image_column=image, label_column=label, class_names=names,
                               image_size=cfg.image_size or DEFAULT_STREAMING_SIZE, num_workers=cfg.num_workers,
                               device=device, copies=copies)
    images = _decode(ds, image, cfg)
    _check_size(cfg, images)
    train_images = images if split == "train" and idx is None else None
    stats = _train_stats(cfg, _split(splits, cfg.train_split, cfg), image, train_images)
    return InMemorySource(images, labels, **stats, class_names=names, augment=cfg.augment, device=device)
