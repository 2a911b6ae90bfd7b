"""Can the streaming path feed a GPU? The train transform's images/s per CPU core, and the cores one GPU would need.

On a generated ImageNet-like folder (JPEGs of ImageNet's typical sizes and quality, natural-image-like content so
they compress as photos do), one process on one core decodes and transforms each image exactly as
`data.sources.StreamingSource` does (PIL decode, RGB, timm's `create_transform(is_training=True)`: random resized
crop, flip, colour jitter, normalize) at 128, 224 and 288 px, and again from copies pre-resized to a short side of
1.14x the crop (what the published 28-epoch schedule's authors read for their low-resolution epochs). The GPU side is a
ResNet-50 bf16 training step: measured on a GPU when one is here (`--gpu`), else NVIDIA's published A100 figure
(DeepLearningExamples, PyTorch ResNet50 v1.5 README, DGX A100 80GB, 1 GPU, mixed precision: 2470 img/s at 224 px),
scaled to the other sizes by pixel count (a ResNet's FLOPs per image grow with its pixels).

    .venv/bin/python -m benchmarks.loader             # a few minutes on one core; writes benchmarks/results/loader.json
    .venv/bin/python -m benchmarks.loader --dry-run   # seconds: 8 images, one round (tests/test_gpu_speed.py)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from benchmarks.common import replace_block, save

SIZES = (128, 224, 288)
# ImageNet's training images: most are about 500x375 or 375x500 (the median is near 500x400), saved at JPEG quality
# around 90, ~110 KB each.
SHAPES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480))
QUALITY = 90
CITED_GPU = {"source": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
                       "training performance on DGX A100 (8x A100 80GB), 1 GPU, mixed precision",
             "images_per_s_224": 2470.0}
RESIZE_RATIO = 1.14  # short side / crop of the pre-resized copies (timm's eval crop_pct 0.875 inverted)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields with edges and grain: compresses like a photo (~100 KB at quality 90), unlike noise."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-30, 31, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = SHAPES[i % len(SHAPES)]
        path = root / f"class{i % 10}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(rng, width, height).save(path, quality=QUALITY)
        paths.append(path)
    return paths


def pre_resized(paths: list[Path], root: Path, size: int) -> list[Path]:
    """Copies whose short side is RESIZE_RATIO x the crop, as a low-resolution epoch would read them."""
    short = round(size * RESIZE_RATIO)
    out = []
    for path in paths:
        target = root / f"short{short}" / path.relative_to(path.parents[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            scale = short / min(image.size)
            image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                        Image.BICUBIC).save(target, quality=QUALITY)
        out.append(target)
    return out


def images_per_s(paths: list[Path], size: int, rounds: int) -> float:
    """One core: decode and transform every image, as a DataLoader worker of StreamingSource does; median round."""
    transform = create_transform(input_size=(3, size, size), is_training=True, mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                transform(image.convert("RGB"))
        times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def gpu_images_per_s(size: int, steps: int = 20, batch: int = 256) -> float:
    """A ResNet-50 bf16 training step on this GPU at `size` px (channels-last, and the fused SGD and cuDNN algorithm
    search swap_accel takes on CUDA), images/s."""
    import timm

    from swap_accel.parallel.distributed import use_cudnn_benchmark

    use_cudnn_benchmark()
    model = timm.create_model("resnet50").cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def table(rows: list[dict], gpu_basis: str) -> str:
    lines = [f"| image size | JPEG → train transform (img/s per core) | from pre-resized copies (img/s per core) | "
             f"ResNet-50 bf16 step (img/s, {gpu_basis}) | cores per GPU | cores per GPU, pre-resized |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} px | {r['full_jpeg']:.0f} | {r['pre_resized']:.0f} | {r['gpu']:.0f} | "
                     f"{r['cores_per_gpu']:.0f} | {r['cores_per_gpu_pre_resized']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="Generated JPEGs (default 200).")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds per measurement; the median counts.")
    parser.add_argument("--gpu", action="store_true", help="Measure the ResNet-50 step on this machine's GPU.")
    parser.add_argument("--dry-run", action="store_true", help="8 images, one round; no file written.")
    parser.add_argument("--out", type=Path, help="Write the JSON here instead of benchmarks/results/loader.json.")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here; leave it out to use the cited A100 figure")
    count, rounds = (8, 1) if args.dry_run else (args.images, args.rounds)
    torch.set_num_threads(1)  # one core, as one DataLoader worker
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_folder(root / "train", count)
        mean_kb = statistics.fmean(p.stat().st_size for p in paths) / 1024
        for size in SIZES:
            full_rate = images_per_s(paths, size, rounds)
            small_rate = images_per_s(pre_resized(paths, root, size), size, rounds)
            gpu = gpu_images_per_s(size) if args.gpu else CITED_GPU["images_per_s_224"] * (224 / size) ** 2
            rows.append({"size": size, "full_jpeg": full_rate, "pre_resized": small_rate, "gpu": gpu,
                         "cores_per_gpu": gpu / full_rate, "cores_per_gpu_pre_resized": gpu / small_rate})
            print(f"{size} px: {full_rate:.0f} img/s per core from full JPEGs, {small_rate:.0f} from pre-resized; "
                  f"GPU {gpu:.0f} img/s -> {gpu / full_rate:.0f} cores ({gpu / small_rate:.0f} pre-resized)",
                  flush=True)
    basis = (f"measured on {torch.cuda.get_device_name()}" if args.gpu
             else "cited A100 figure, other sizes scaled by pixels")
    payload = {"images": count, "rounds": rounds, "mean_jpeg_kb": mean_kb, "quality": QUALITY,
               "gpu_basis": basis, "cited_gpu": None if args.gpu else CITED_GPU, "rows": rows,
               "table": table(rows, basis)}
    print(payload["table"])
    if args.dry_run and not args.out:
        return
    if args.out:
        import json

        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        return
    print(f"wrote {save('loader', payload)}")
    replace_block("loader", f"Measured with `.venv/bin/python -m benchmarks.loader` ({count} generated JPEGs, mean "
                            f"{mean_kb:.0f} KB, quality {QUALITY}; median of {rounds} rounds on one core of this "
                            f"machine).\n\n{payload['table']}")


if __name__ == "__main__":
    main()
