"""Pre-resized copies of the training images, for a schedule's low-resolution stages.

The published ImageNet schedule the paper accelerates (section 5.2) read its 128 px epochs from copies of the
images resized to a 160 px shorter side, and its 224 px epochs from 352 px copies. Decoding a full-size JPEG is
most of the streaming path's CPU cost: on generated ImageNet-like JPEGs one core feeds 2.4x the images per second
at 128 px from such copies (benchmarks/loader.py, docs/performance.md), so a stage that crops 128 px from a
full-size photo is CPU-bound where its copy is not. A copy keeps the rows of its split in order, so the indices
every order and subset uses (sampling.py, loading._indices) pick the same images from it.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
from PIL import Image

# Quality 90, as the generated benchmark JPEGs: the copies are read far more often than they are written.
JPEG_QUALITY = 90


def _resize_rows(batch: dict, *, column: str, shorter_side: int) -> dict:
    out = []
    for image in batch[column]:
        image = image.convert("RGB")
        scale = shorter_side / min(image.size)
        if scale < 1:  # never enlarged: a small image is kept at its own size
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        out.append({"bytes": buffer.getvalue(), "path": None})
    return {column: out}


def build_copy(rows: datasets.Dataset, column: str, shorter_side: int, out: Path, *, num_proc: int) -> None:
    """Write `rows` with every image of `column` resized to `shorter_side` px on its shorter side (JPEG bytes) to
    `out` with `save_to_disk`; every other column as it is."""
    features = rows.features.copy()
    features[column] = datasets.Image()
    copy = rows.map(_resize_rows, batched=True, batch_size=64, fn_kwargs={"column": column,
                                                                         "shorter_side": shorter_side},
                    features=features, num_proc=num_proc if num_proc > 1 else None,
                    desc=f"resizing training images to a {shorter_side} px shorter side")
    copy.save_to_disk(str(out))


def load_copy(path: Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(path))
