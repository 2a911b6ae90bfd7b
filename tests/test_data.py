"""Data sources and augmentation on real data: Fashion-MNIST as Debian installs it, plus tiny hub-style and
image-folder data sets built in tmp_path (nothing is downloaded, nothing is mocked).

Local hub-style data sets: with datasets 5, `load_dataset(<dir>)` reads offline both a directory of parquet files
(the hub's own layout, data/<split>-00000-of-00001.parquet) and a `DatasetDict.save_to_disk` directory; both are
tested. Every test passes cache_dir under tmp_path, so nothing depends on or writes to ~/.cache.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from swap_accel.data.augment import augment_batch, cutout_
from swap_accel.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, FASHION_MNIST_ROOT
from swap_accel.data.loading import load_data, prepare_data
from swap_accel.data.sources import DataError, InMemorySource, StreamingSource
from swap_accel.recipe import AugmentConfig, DataConfig

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(
    not FASHION_MNIST_ROOT.is_dir(), reason=f"{FASHION_MNIST_ROOT} missing: apt-get install dataset-fashion-mnist"
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _tiny_fashion(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Valid Fashion-MNIST-format IDX files with a few random images (for error and concurrency tests)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        image_file, label_file = FASHION_MNIST_FILES[split]
        _write_idx(root / image_file, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / label_file, np.arange(n) % 10)
    return root


def _pil_images(n: int, size: tuple[int, int], seed: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _cifar_like(path: Path, layout: str, *, names: tuple[str, ...] = ("cat", "dog", "ship"), cifar100: bool = False):
    """A CIFAR-shaped hub data set (`img` Image column, ClassLabel labels) saved locally in `layout`."""
    splits = {}
    for split, n, seed in (("train", 12, 0), ("test", 6, 1)):
        columns = {"img": _pil_images(n, (32, 32), seed)}
        features = {"img": datasets.Image()}
        label_columns = ("coarse_label", "fine_label") if cifar100 else ("label",)
        for col in label_columns:
            columns[col] = [i % len(names) for i in range(n)]
            features[col] = datasets.ClassLabel(names=list(names))
        splits[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    if layout == "parquet":
        (path / "data").mkdir(parents=True)
        for split, ds in splits.items():
            ds.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict(splits).save_to_disk(str(path))
    return splits


@pytest.fixture(scope="session")
def fashion_cfg(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Real Fashion-MNIST converted once per test session into a temporary cache."""
    if not FASHION_MNIST_ROOT.is_dir():
        pytest.skip(f"{FASHION_MNIST_ROOT} missing: apt-get install dataset-fashion-mnist")
    cfg = DataConfig(cache_dir=tmp_path_factory.mktemp("fashion_cache"))
    prepare_data(cfg)
    return cfg


@pytest.fixture(scope="session")
def fashion_train(fashion_cfg: DataConfig) -> InMemorySource:
    return load_data(fashion_cfg, CPU, split="train")


# --------------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_loads_real_data(fashion_cfg: DataConfig, fashion_train: InMemorySource) -> None:
    test = load_data(fashion_cfg, CPU, split="test")
    assert (fashion_train.num_samples, test.num_samples) == (60000, 10000)
    assert fashion_train.images.dtype == torch.uint8 and fashion_train.images.shape == (60000, 1, 28, 28)
    assert (fashion_train.num_classes, fashion_train.in_chans, fashion_train.image_size) == (10, 1, (28, 28))
    assert fashion_train.class_names == FASHION_MNIST_CLASSES
    assert torch.bincount(fashion_train.labels).tolist() == [6000] * 10
    # The published Fashion-MNIST statistics; the test split must be normalized with the train ones.
    assert fashion_train.mean == pytest.approx([0.2860], abs=1e-4)
    assert fashion_train.std == pytest.approx([0.3530], abs=1e-4)
    assert (test.mean, test.std) == (fashion_train.mean, fashion_train.std)
    # Images equal the raw IDX bytes (first and last sample).
    with gzip.open(FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    assert torch.equal(test.images[[0, -1], 0], torch.from_numpy(raw[[0, -1]].copy()))


@needs_fashion
def test_conversion_cache_is_reused(fashion_cfg: DataConfig) -> None:
    caches = [p for p in Path(fashion_cfg.cache_dir).iterdir() if p.is_dir()]
    assert len(caches) == 1 and caches[0].name.startswith("fashion_mnist-")
    before = {p: p.stat() for p in [caches[0], caches[0] / "stats.json", caches[0] / "dataset_dict.json"]}
    prepare_data(fashion_cfg)
    load_data(fashion_cfg, CPU, split="test")
    # A rebuild would rename a fresh directory into place (new inode) and rewrite the files (new mtimes).
    for path, stat in before.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), path
    assert [p for p in Path(fashion_cfg.cache_dir).iterdir() if p.is_dir()] == caches


@needs_fashion
def test_subset_is_deterministic(fashion_cfg: DataConfig, fashion_train: InMemorySource) -> None:
    cfg = fashion_cfg.model_copy(update={"train_subset": 1000})
    a, b = load_data(cfg, CPU, split="train"), load_data(cfg, CPU, split="train")
    assert a.num_samples == 1000 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.mean == fashion_train.mean  # statistics of the full train split, not of the subset
    assert torch.bincount(a.labels, minlength=10).min() >= 60  # ~100 per class on average
    with pytest.raises(DataError, match="train_subset=70000 exceeds"):
        load_data(fashion_cfg.model_copy(update={"train_subset": 70000}), CPU, split="train")


@pytest.mark.slow
def test_concurrent_prepare_data_builds_one_cache(tmp_path: Path) -> None:
    root, cache = _tiny_fashion(tmp_path / "idx"), tmp_path / "cache"
    code = (
        "import sys; from swap_accel.data.loading import prepare_data; from swap_accel.recipe import DataConfig; "
        "prepare_data(DataConfig(root=sys.argv[1], cache_dir=sys.argv[2]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(cache)], cwd=REPO) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    # One cache directory and no temporary build directory left over by either process.
    dirs = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(dirs) == 1 and dirs[0].startswith("fashion_mnist-") and ".tmp-" not in dirs[0]
    source = load_data(DataConfig(root=root, cache_dir=cache), CPU, split="test")
    assert source.num_samples == 20 and source.labels.tolist() == [i % 10 for i in range(20)]


# ------------------------------------------------------------------------------------------ batches


def _indexed_source(n: int = 23) -> InMemorySource:
    """A source whose label is the sample index, so yielded labels show which samples came out."""
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return InMemorySource(images, torch.arange(n), mean=[0.5] * 3, std=[0.25] * 3,
                          class_names=[str(i) for i in range(n)], augment=AugmentConfig(crop_padding=2), device=CPU)


@pytest.mark.parametrize("augment", [False, True])
def test_batches_yield_every_index_once_in_order(augment: bool) -> None:
    source = _indexed_source()
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))[:17]  # a shard, not all samples
    out = list(source.batches(order, 5, augment=augment, generator=torch.Generator().manual_seed(2)))
    assert [len(y) for _, y in out] == [5, 5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in out]), order)
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8) for x, _ in out)
    assert list(source.batches(torch.empty(0, dtype=torch.int64), 5, augment=augment, generator=None)) == []
    assert augment_batch(source.images[:0], source.augment, None).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        next(source.batches(torch.tensor([0, 23]), 5, augment=augment, generator=None))


def test_plain_batches_are_normalized_and_match_eval_loader() -> None:
    source = _indexed_source()
    x = torch.cat([x for x, _ in source.batches(torch.arange(23), 4, augment=False, generator=None)])
    assert torch.allclose(x, (source.images.float() / 255 - 0.5) / 0.25, atol=1e-5)
    loader = source.eval_loader(batch_size=10)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [10, 10, 3]
    assert torch.allclose(torch.cat([b for b, _ in batches]), x) and torch.equal(torch.cat([y for _, y in batches]),
                                                                                torch.arange(23))


@needs_fashion
def test_augmented_fashion_batches(fashion_train: InMemorySource) -> None:
    order = torch.arange(256)

    def run(seed: int) -> torch.Tensor:
        return next(fashion_train.batches(order, 256, augment=True, generator=torch.Generator().manual_seed(seed)))[0]

    plain = next(fashion_train.batches(order, 256, augment=False, generator=None))[0]
    a, b, c = run(0), run(0), run(1)
    assert a.shape == plain.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != plain).flatten(1).any(1).float().mean() > 0.9  # nearly every image was changed


# ------------------------------------------------------------------------------------------ augment


def _images(b: int = 64, c: int = 2, h: int = 7, w: int = 9) -> torch.Tensor:
    # Values 1..255 so the zero padding is distinguishable from image content.
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_flip_only_returns_input_or_its_mirror() -> None:
    x = _images()
    out = augment_batch(x, AugmentConfig(crop_padding=0, flip=True), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    assert augment_batch(x, AugmentConfig(crop_padding=0, flip=False), None) is x


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_shift_of_the_zero_padded_image(flip: bool) -> None:
    x, pad = _images(), 3
    out = augment_batch(x, AugmentConfig(crop_padding=pad, flip=flip), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    found = set()
    for i in range(len(x)):
        shifts = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                  if torch.equal(out[i], (lambda v: v.flip(2) if f else v)(padded[i, :, dy : dy + h, dx : dx + w]))]
        assert len(shifts) == 1, f"sample {i} is not exactly one window of the padded image"
        assert shifts[0][2] is False or flip
        found.add(shifts[0])
    assert len(found) > 10  # offsets (and flips) vary per sample


def test_augment_is_deterministic_per_seed() -> None:
    x, cfg = _images(), AugmentConfig()
    run = [augment_batch(x, cfg, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])


def test_cutout_zeroes_one_square_clipped_at_borders() -> None:
    b, h, w, size = 400, 8, 10, 5
    x = torch.ones(b, 3, h, w)
    cutout_(x, size, torch.Generator().manual_seed(0))
    zero = x == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same square in every channel
    clipped = 0
    for mask in zero[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert torch.equal(mask, mask.any(1)[:, None] & mask.any(0)[None, :])  # a rectangle
        for idx, extent in ((rows, h), (cols, w)):
            assert len(idx) and torch.equal(idx, torch.arange(int(idx[0]), int(idx[-1]) + 1))  # contiguous
            # Full size unless clipped, and clipped only at an image border.
            assert len(idx) == size or (idx[0] == 0 or idx[-1] == extent - 1) and len(idx) < size
        clipped += len(rows) < size or len(cols) < size
    assert 0 < clipped < b
    y = torch.ones(2, 1, 4, 4)
    assert cutout_(y, 0, None) is y and bool((y == 1).all())


# ---------------------------------------------------------------------------------- hub, imagefolder


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_hub_local_dataset_in_memory(tmp_path: Path, layout: str) -> None:
    splits = _cifar_like(tmp_path / "cifar", layout)
    cfg = DataConfig(source="hub", name=str(tmp_path / "cifar"), cache_dir=tmp_path / "cache")
    prepare_data(cfg)
    train, test = load_data(cfg, CPU, split="train"), load_data(cfg, CPU, split="test")
    assert (train.num_samples, test.num_samples, train.num_classes) == (12, 6, 3)
    assert (train.class_names, train.in_chans, train.image_size) == (["cat", "dog", "ship"], 3, (32, 32))
    expected = torch.from_numpy(np.stack([np.asarray(im) for im in splits["test"]["img"]])).permute(0, 3, 1, 2)
    assert torch.equal(test.images, expected) and test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    train_pixels = train.images.double().div(255).transpose(0, 1).flatten(1)
    assert test.mean == pytest.approx(train_pixels.mean(1).tolist()) and test.mean == train.mean
    assert test.std == pytest.approx(train_pixels.std(1, correction=0).tolist())
    x, y = next(train.batches(torch.arange(12), 12, augment=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (12, 3, 32, 32) and y.tolist() == train.labels.tolist()


def test_hub_autodetects_cifar100_fine_label_and_streams(tmp_path: Path) -> None:
    _cifar_like(tmp_path / "c100", "parquet", names=("apple", "bee", "cup", "dog"), cifar100=True)
    cfg = DataConfig(source="hub", name=str(tmp_path / "c100"), cache_dir=tmp_path / "cache", in_memory=False,
                     image_size=16, num_workers=0)
    source = load_data(cfg, CPU, split="train")
    assert isinstance(source, StreamingSource) and source.class_names == ["apple", "bee", "cup", "dog"]
    out = list(source.batches(torch.tensor([3, 1, 0, 7, 2]), 2, augment=True, generator=torch.Generator()))
    assert [tuple(x.shape) for x, _ in out] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.cat([y for _, y in out]).tolist() == [3, 1, 0, 3, 2]  # fine_label = index % 4


def test_imagefolder_streams_train_and_test(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    modes = {"cat": "RGB", "dog": "L", "fox": "RGBA"}  # grey and RGBA files must come out as 3 channels
    for split, n in (("train", 3), ("test", 2)):
        for cls, mode in modes.items():
            (root / split / cls).mkdir(parents=True)
            for i, im in enumerate(_pil_images(n, (12, 20), seed=len(cls))):
                im.convert(mode).save(root / split / cls / f"{i}.png")
    cfg = DataConfig(source="imagefolder", root=root, cache_dir=tmp_path / "cache", in_memory=False,
                     image_size=16, num_workers=0)
    prepare_data(cfg)
    train, test = load_data(cfg, CPU, split="train"), load_data(cfg, CPU, split="test")
    assert (train.num_samples, test.num_samples, train.class_names) == (9, 6, ["cat", "dog", "fox"])
    out = list(train.batches(torch.arange(9).flip(0), 4, augment=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in out] == [4, 4, 1] and all(x.shape[1:] == (3, 16, 16) for x, _ in out)
    assert torch.cat([y for _, y in out]).tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    batches = list(test.eval_loader(batch_size=4))
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1, 1, 2, 2]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) for x, _ in batches)


# ------------------------------------------------------------------------------------------- errors


def test_missing_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in .*missing train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        prepare_data(DataConfig(root=tmp_path / "nowhere", cache_dir=tmp_path / "cache"))
    with pytest.raises(DataError, match="image folder .* does not exist"):
        prepare_data(DataConfig(source="imagefolder", root=tmp_path / "nowhere", cache_dir=tmp_path / "cache"))
    with pytest.raises(DataError, match="looks like a local path but does not exist"):
        prepare_data(DataConfig(source="hub", name=str(tmp_path / "nowhere"), cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize("truncate", ["gzip", "idx"])
def test_truncated_idx_file_is_named(tmp_path: Path, truncate: str) -> None:
    root = _tiny_fashion(tmp_path / "idx")
    path = root / "train-images-idx3-ubyte.gz"
    if truncate == "gzip":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with gzip.open(path) as f:
            data = f.read()
        with gzip.open(path, "wb") as f:
            f.write(data[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt"):
        prepare_data(DataConfig(root=root, cache_dir=tmp_path / "cache"))
    assert not any((tmp_path / "cache").glob("fashion_mnist-*/"))  # a failed build leaves no cache behind


def test_hub_column_split_and_class_errors(tmp_path: Path) -> None:
    _cifar_like(tmp_path / "cifar", "save_to_disk")
    cfg = DataConfig(source="hub", name=str(tmp_path / "cifar"), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"image_column 'image' not found \(columns: img \(Image\), label"):
        load_data(cfg.model_copy(update={"image_column": "image"}), CPU, split="train")
    with pytest.raises(DataError, match="label_column 'img' is not a ClassLabel column"):
        load_data(cfg.model_copy(update={"label_column": "img"}), CPU, split="train")
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        prepare_data(cfg.model_copy(update={"test_split": "validation"}))
    with pytest.raises(DataError, match="image_size=64 but the in-memory images are 32x32"):
        load_data(cfg.model_copy(update={"image_size": 64}), CPU, split="test")
    _cifar_like(tmp_path / "one", "save_to_disk", names=("only",))
    with pytest.raises(DataError, match="has a single class.*at least 2 classes"):
        prepare_data(cfg.model_copy(update={"name": str(tmp_path / "one")}))


def test_single_class_imagefolder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "f" / split / "cat").mkdir(parents=True)
        _pil_images(1, (8, 8), 0)[0].save(tmp_path / "f" / split / "cat" / "0.png")
    with pytest.raises(DataError, match="no ClassLabel column .*2\\+ class folders.*at least 2 classes"):
        prepare_data(DataConfig(source="imagefolder", root=tmp_path / "f", cache_dir=tmp_path / "cache"))


def test_stats_json_is_cached_for_hub(tmp_path: Path) -> None:
    _cifar_like(tmp_path / "cifar", "parquet")
    cfg = DataConfig(source="hub", name=str(tmp_path / "cifar"), cache_dir=tmp_path / "cache")
    prepare_data(cfg)
    (stats,) = (tmp_path / "cache" / "stats").glob("hub-*/stats.json")
    mtime = stats.stat().st_mtime_ns
    test = load_data(cfg, CPU, split="test")
    assert stats.stat().st_mtime_ns == mtime and json.loads(stats.read_text())["mean"] == test.mean


def test_imagefolder_in_memory_grey_and_mixed_sizes(tmp_path: Path) -> None:
    root = tmp_path / "grey"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i, im in enumerate(_pil_images(2, (10, 10), seed=len(split))):
                im.convert("L").save(root / split / cls / f"{i}.png")
    cfg = DataConfig(source="imagefolder", root=root, cache_dir=tmp_path / "cache")
    source = load_data(cfg, CPU, split="train")
    assert isinstance(source, InMemorySource) and source.images.shape == (4, 1, 10, 10)
    _pil_images(1, (12, 10), seed=0)[0].convert("L").save(root / "test" / "a" / "big.png")
    with pytest.raises(DataError, match="images differ in size.*set data.in_memory: false"):
        load_data(cfg, CPU, split="test")


def test_hub_imagenet_parquet_layout_streams_jpeg_bytes_without_loose_files(tmp_path: Path) -> None:
    """`ILSVRC/imagenet-1k`'s layout on the Hub: parquet shards of an `image` column holding the JPEG files' bytes and
    a `label` ClassLabel, splits train/validation. recipes/imagenet.yaml's data section reads it as it is (decoded
    per image by the DataLoader workers), with no conversion to loose files."""
    import io

    import pyarrow.parquet as pq

    from swap_accel.recipe import load_recipe

    names = [f"n0{i:07d}" for i in range(4)]
    root = tmp_path / "imagenet-1k"
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, shards, per_shard in (("train", 2, 6), ("validation", 1, 4)):
        for k in range(shards):
            jpegs = []
            for _ in range(per_shard):
                buffer = io.BytesIO()
                PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                jpegs.append({"bytes": buffer.getvalue(), "path": None})
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            ds = datasets.Dataset.from_dict({"image": jpegs, "label": [i % 4 for i in range(per_shard)]},
                                            features=features)
            ds.to_parquet(str(root / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"))
    stored = pq.read_table(root / "data" / "train-00000-of-00002.parquet").column("image")[0].as_py()
    assert stored["bytes"][:2] == b"\xff\xd8"  # the files' JPEG bytes, not decoded pixels
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "imagenet.yaml"
    data = load_recipe(recipe, [f"data.name={root}", f"data.cache_dir={tmp_path / 'c'}", "data.image_size=32",
                                "data.num_workers=2"]).data
    train, test = load_data(data, CPU, split="train"), load_data(data, CPU, split="test")
    assert isinstance(train, StreamingSource) and (train.num_samples, test.num_samples) == (12, 4)
    assert train.class_names == names and not list(tmp_path.rglob("*.jpg"))
    out = list(train.batches(torch.arange(12), 5, augment=True, generator=torch.Generator().manual_seed(0)))
    assert [tuple(x.shape) for x, _ in out] == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.cat([y for _, y in out]).tolist() == [i % 4 for i in range(6)] * 2
    assert torch.cat([y for _, y in test.eval_loader(batch_size=3)]).tolist() == [0, 1, 2, 3]
