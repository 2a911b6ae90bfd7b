"""Several workers on one device: K phase-2 workers of one process stacked (`phase2.stack_workers`) against one worker.

Workers trained in turn cost K times one worker's epoch: they run one after the other through the same loop. On a
GPU a small-batch worker leaves the device mostly idle, so K workers stacked into one vmapped step should cost much
less than K times one (target: 8 workers in at most 3x one worker's time). This times, on one device and on
synthetic uint8 images held there, one epoch of one worker (`train_phase2`, as workers in turn run each) and one
epoch of K stacked workers (`train_stacked`), in alternating blocks (medians and spread over the rounds), for the
quickstart model (ResNet-9 width 16, 1x28x28) and the CIFAR-shape ResNet-9 (width 64, 3x32x32), at the quickstart's
per-worker batch of 128. It prints images/s and the stacked time as a multiple of one worker's (`stacked_over_one`;
workers in turn are K by construction). That the stacked result equals workers in turn is tested on CPU
(tests/test_stacked.py, tests/test_topology.py), not here.

    .venv/bin/python -m benchmarks.stacked_workers            # on a GPU: benchmarks/results/stacked_workers_<gpu>.json
    .venv/bin/python -m benchmarks.stacked_workers --dry-run  # CPU, tiny, 2 workers: the plumbing only
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import alternate_samples, gpu_args, gpu_parser, loop_context, loop_harness, write_gpu_result
from swap_accel.algorithm.phase2 import train_phase2
from swap_accel.algorithm.stacked import train_stacked
from swap_accel.checkpointing.snapshots import CycleSamples
from swap_accel.data.sources import InMemorySource
from swap_accel.models import build_model
from swap_accel.parallel.distributed import make_accelerator
from swap_accel.recipe import AugmentConfig, LRConfig, Phase2Config
from swap_accel.recipe.device_defaults import resolve_mixed_precision

MODELS = {
    "quickstart": {"kwargs": {"base_width": 16}, "shape": (1, 28, 28), "batch": 128},
    "cifar": {"kwargs": {"base_width": 64}, "shape": (3, 32, 32), "batch": 128},
}
DRY = {"quickstart": {"kwargs": {"base_width": 4}, "batch": 8}, "cifar": {"kwargs": {"base_width": 4}, "batch": 8}}


def epochs(spec: dict, accelerator, workers: int, steps: int):
    """`(one, stacked)`: callables that train one epoch of `steps` steps of one worker, and of `workers` stacked
    workers, from the same starting weights each call, through swap_accel's own phase-2 loops."""
    device, batch = accelerator.device, spec["batch"]
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (steps * batch, *spec["shape"]), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (steps * batch,), generator=generator)
    channels = spec["shape"][0]
    source = InMemorySource(images, labels, mean=[0.5] * channels, std=[0.25] * channels,
                            class_names=[str(c) for c in range(10)],
                            augment=AugmentConfig(crop_padding=2, flip=True, cutout_size=0), device=device)
    recipe, ckpt = loop_harness(accelerator, f"phase2.workers={workers}", "phase2.stack_workers=true")
    torch.manual_seed(0)
    module = build_model("resnet9", in_chans=channels, num_classes=10, kwargs=spec["kwargs"]).to(device)
    if recipe.model.channels_last:  # as the quickstart recipe trains, which sets it (true) on every device
        module = module.to(memory_format=torch.channels_last)
    origin = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ctx = loop_context(accelerator, recipe, ckpt, module, source, recipe.optimizer, phase=2)
    cfg = Phase2Config(per_worker_batch_size=batch, epochs=1, lr=LRConfig(peak=0.05))
    samples = [CycleSamples(cfg.sampling, ckpt.root.parent, k) for k in range(workers)]

    def one() -> None:
        module.load_state_dict(origin)
        train_phase2(ctx, module, module, cfg, worker=0, samples=samples[0])

    def stacked() -> None:
        train_stacked(ctx, module, cfg, workers=list(range(workers)), resumes=[None] * workers, samples=samples,
                      origin=origin)

    return one, stacked


def measure(key: str, accelerator, *, workers: int, steps: int, rounds: int, dry_run: bool) -> dict:
    spec = {**MODELS[key], **(DRY[key] if dry_run else {})}
    one, stacked = epochs(spec, accelerator, workers, steps)
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else None
    one(), stacked()  # warm-up: kernel selection, allocator, vmap's first trace
    t_one, t_stacked = alternate_samples((one, stacked), rounds, sync)
    images, one_s, stacked_s = steps * spec["batch"], statistics.median(t_one), statistics.median(t_stacked)
    # Rates from the median epochs the ratio uses: with an even number of rounds (the dry run's 2) a median of
    # per-round rates is another number, far from it when one round was slowed.
    return {"model": key, "image_shape": list(spec["shape"]), "base_width": spec["kwargs"]["base_width"],
            "per_worker_batch_size": spec["batch"], "workers": workers, "steps_per_epoch": steps,
            "one_worker_seconds": one_s, "one_worker_spread": [min(t_one), max(t_one)],
            "stacked_seconds": stacked_s, "stacked_spread": [min(t_stacked), max(t_stacked)],
            "one_worker_images_per_s": images / one_s, "stacked_images_per_s": workers * images / stacked_s,
            "stacked_over_one": stacked_s / one_s}


def table(records: list[dict]) -> str:
    lines = ["| model | workers | batch per worker | one worker (s per epoch, min-max) "
             "| stacked (s per epoch, min-max) | stacked / one (in turn: K) | images/s one / stacked |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} (width {r['base_width']}, {'x'.join(map(str, r['image_shape']))}) "
                     f"| {r['workers']} | {r['per_worker_batch_size']} | {r['one_worker_seconds']:.3f} "
                     f"({r['one_worker_spread'][0]:.3f}-{r['one_worker_spread'][1]:.3f}) | {r['stacked_seconds']:.3f} "
                     f"({r['stacked_spread'][0]:.3f}-{r['stacked_spread'][1]:.3f}) | {r['stacked_over_one']:.2f} "
                     f"({r['workers']}) | {r['one_worker_images_per_s']:.0f} / {r['stacked_images_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = gpu_parser(__doc__, dry_run_help="CPU, tiny sizes, 2 workers: the plumbing only.")
    parser.add_argument("--workers", type=int, default=8, help="Workers stacked (default 8).")
    parser.add_argument("--steps", type=int, default=50, help="Optimizer steps per epoch (default 50).")
    parser.add_argument("--models", default="quickstart,cifar")
    args = gpu_args(parser, "stacked_workers")
    if args.workers < 2:
        raise SystemExit("--workers: at least 2 (one worker is the baseline)")
    workers, steps, rounds = (2, 2, 2) if args.dry_run else (args.workers, args.steps, args.rounds)
    # What `mixed_precision: auto` gives this device (bf16 on an A100/H100, fp32 on a CPU), as a recipe that leaves it
    # unset trains; fp16 is refused for stacked workers (one loss scaler per worker).
    precision = resolve_mixed_precision("auto")
    accelerator = make_accelerator(precision)
    records = [measure(key, accelerator, workers=workers, steps=steps, rounds=rounds, dry_run=args.dry_run)
               for key in args.models.split(",")]
    rendered = table(records)
    print(rendered)
    write_gpu_result("stacked_workers", args, {"rounds": rounds, "bf16": precision == "bf16", "records": records,
                                               "table": rendered})
    accelerator.end_training()

if __name__ == "__main__":
    main()
