"""Reading data sets into sources: Fashion-MNIST's IDX files, hub data sets and image folders, their splits,
subsets and held-out images, the caches that make a second read cheap, and `load_data`, which builds the
`sources.DataSource` a phase trains on.

`prepare_data` does the one-time work (IDX → `datasets` conversion, per-channel statistics, pre-resized copies)
before any process group exists. Every launched process calls it, so caches are built under a file lock in a
temporary directory and renamed into place atomically; the loser of the race finds the cache and reuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor

from swap_accel.data.caches import build_once, cache_key, cache_root, channel_stats, file_key
from swap_accel.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_cache,
    fashion_mnist_split,
    load_fashion_mnist,
)
from swap_accel.data.resized import build_copy, load_copy
from swap_accel.data.sources import DEFAULT_STREAMING_SIZE, DataError, DataSource, InMemorySource, StreamingSource
from swap_accel.recipe import DataConfig

# `datasets` renames split folders val/valid/dev to "validation"; accept the folder names in the recipe too.
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_DECODE_CHUNK = 1024


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
    files = [file_key(Path(f["filename"])) for f in train.cache_files]
    key = cache_key([cfg.source, cfg.name, cfg.root, column, files])
    cache = cache_root(cfg) / "stats" / f"{cfg.source}-{key}"

    def build(out: Path) -> None:
        stats = channel_stats(images if images is not None else _decode(train, column, cfg))
        (out / "stats.json").write_text(json.dumps(stats))

    return json.loads((build_once(cache, build) / "stats.json").read_text())


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
    return cache_key([cfg.source, cfg.name, cfg.root, cfg.train_split])


def train_split_size(cfg: DataConfig) -> int:
    """Images in cfg.train_split before any subset or hold-out; no image is decoded (the Fashion-MNIST cache's or the
    HF split's row count), so the CLI can ask before any process group forms."""
    key = _train_split_key(cfg)
    if key not in _TRAIN_SPLIT_SIZES:
        if cfg.source == "fashion_mnist":
            _TRAIN_SPLIT_SIZES[key] = len(fashion_mnist_split(cfg, cfg.train_split)[0])
        else:
            _TRAIN_SPLIT_SIZES[key] = len(_split(_load_hf(cfg), cfg.train_split, cfg))
    return _TRAIN_SPLIT_SIZES[key]


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
        fashion_mnist_cache(cfg)
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
    final = cache_root(cfg) / "resized" / f"{cache_key([_train_split_key(cfg), len(train), side])}-{side}px"
    build_once(final, lambda out: build_copy(train.select_columns([image, label]), image, side, out,
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
        images, labels, stats = load_fashion_mnist(cfg, split_name)
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
