"""Data sources for SWAP: small data sets in memory, large ones streamed, one interface for both.

SWAP's phases all read data the same way: phase 1 and phase 2 train on shuffled (and, in phase 2, per-worker)
index orders, BatchNorm is recalibrated after averaging on plain images, and evaluation goes through
accelerate's `gather_for_metrics` (paper Algorithm 1). So a `DataSource` yields batches for any index
`order` the trainer hands it, and gives a plain DataLoader for evaluation.

Two implementations. `InMemorySource` keeps uint8 images on the training device and augments whole batches
there (swap_accel.data.augment): for Fashion-MNIST and CIFAR a per-sample PIL pipeline would cost more than the
small CNN's step. `StreamingSource` is for ImageNet-sized data: DataLoader workers decode and transform
with timm's standard pipeline. Reading data sets and building the sources is `loading`'s.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator

import datasets
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from swap_accel.data.augment import augment_batch, cutout_
from swap_accel.data.sampling import AUGMENT, derive_seed
from swap_accel.recipe import AugmentConfig

DEFAULT_STREAMING_SIZE = 224


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
