"""On-disk caches of the data sets: one directory per key, built once across concurrent processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor

from swap_accel.recipe import DataConfig


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("SWAP_ACCEL_CACHE") or Path.home() / ".cache" / "swap_accel")


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
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


def cache_key(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def channel_stats(images: Tensor) -> dict[str, list[float]]:
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
