"""As fast as the GPU allows? swap_accel's phase-1 step and phase-2 worker step against a tuned plain PyTorch loop.

On one device, for the CIFAR-shape ResNet-9 (width 64, 3x32x32, 10 classes) and timm's resnet50 (3x224x224, 1000
classes), on synthetic uint8 images held on the device:
- the tuned loop: bf16 autocast, channels-last, `torch.compile`, the fused SGD, cuDNN's algorithm search
  (`cudnn.benchmark`, a process-wide switch that swap_accel sets on CUDA too), augmentation on the device (random
  crop from 4-pixel padding and flips, per sample), nothing else;
- swap_accel's `train_phase1` (one process, the global batch) and `train_phase2` (one worker, its batch), through
  its in-memory source, monitor and checkpointer, twice: with what a recipe that sets nothing gets on this device
  (`mixed_precision` and `model.channels_last` are `auto`: bf16 and channels-last on an A100/H100; `model.compile`
  is off), and with `model.compile: true` on top.
Blocks alternate (tuned, defaults, compiled, tuned, ...) for at least 5 rounds, so host noise lands on every side;
the table gives median images/s, their spread (min-max), the ratios to the tuned loop (target >= 0.97), the share of
the device's dense bf16 peak the step reaches (FLOPs of one forward and backward from `torch.utils.flop_counter`), and
what compiling costs and buys: the compiled loop's extra first-epoch seconds over the default loop's, and the
optimizer steps its faster steps take to win them back (`payback_steps`; none when it is not faster).

    .venv/bin/python -m benchmarks.gpu_speed                 # on a GPU: writes benchmarks/results/gpu_speed_<gpu>.json
    .venv/bin/python -m benchmarks.gpu_speed --dry-run       # CPU, tiny, fp32, dynamo without a compiler: plumbing
"""

from __future__ import annotations

import os
import statistics
import tempfile
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import (
    alternate_samples,
    gpu_args,
    gpu_parser,
    loop_context,
    loop_harness,
    timed,
    write_gpu_result,
)
from swap_accel.algorithm.loop import make_sgd
from swap_accel.algorithm.phase1 import train_phase1
from swap_accel.algorithm.phase2 import train_phase2
from swap_accel.checkpointing.snapshots import CycleSamples
from swap_accel.data.sources import InMemorySource
from swap_accel.models import build_model, compile_in_place
from swap_accel.parallel.distributed import make_accelerator
from swap_accel.recipe import AugmentConfig, LRConfig, OptimizerConfig, Phase1Config, Phase2Config
from swap_accel.recipe.device_defaults import resolve_channels_last, resolve_mixed_precision

# Dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (SXM parts; sparsity excluded).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MODELS = {
    "resnet9": {"name": "resnet9", "kwargs": {"base_width": 64}, "shape": (3, 32, 32), "classes": 10,
                "phase1_batch": 512, "worker_batch": 512},
    "resnet50": {"name": "resnet50", "kwargs": {}, "shape": (3, 224, 224), "classes": 1000,
                 "phase1_batch": 256, "worker_batch": 128},
}
DRY = {"resnet9": {"kwargs": {"base_width": 8}, "phase1_batch": 32, "worker_batch": 16},
       "resnet50": {"shape": (3, 32, 32), "phase1_batch": 4, "worker_batch": 2}}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def flops_per_image(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward and backward of the uncompiled model, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def tuned_loop(spec: dict, images: torch.Tensor, labels: torch.Tensor, batch: int, *, bf16: bool, compiled: bool):
    """The best plain loop for this model and data: returns `run(steps)`."""
    device = images.device
    torch.manual_seed(0)
    model = build_model(spec["name"], in_chans=spec["shape"][0], num_classes=spec["classes"],
                        kwargs=spec["kwargs"]).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    mean = torch.tensor([125.0, 123.0, 114.0], device=device).view(1, 3, 1, 1)[:, : spec["shape"][0]]
    h, w = spec["shape"][1:]
    generator = torch.Generator(device=device).manual_seed(0)

    def augment(x_u8: torch.Tensor) -> torch.Tensor:
        # Per-sample random crop from 4-pixel zero padding, as one gather, and flips as one where().
        n = x_u8.shape[0]
        padded = F.pad(x_u8, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n, 1, 1), device=device, generator=generator)
        dx = torch.randint(0, 9, (n, 1, 1), device=device, generator=generator)
        rows = (torch.arange(h, device=device).view(1, h, 1) + dy).expand(n, h, w)
        cols = (torch.arange(w, device=device).view(1, 1, w) + dx).expand(n, h, w)
        flat = padded.flatten(2).gather(2, (rows * (w + 8) + cols).flatten(1).unsqueeze(1).expand(-1, x_u8.shape[1],
                                                                                                  -1))
        x = flat.view_as(x_u8)
        flip = torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5
        return torch.where(flip, x.flip(3), x)

    def run(steps: int) -> None:
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (batch,), device=device, generator=generator)
            x = ((augment(images[idx]).float() - mean) / 64.0).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(x), labels[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run, model


def swap_steps(spec: dict, source: InMemorySource, accelerator, batch: int, phase: int, *, channels_last: bool,
               compiled: bool | str):
    """swap_accel's own phase-1 loop (one process holds the global batch) or one worker's phase-2 loop:
    returns `run(steps)`, each call one epoch of `steps` optimizer steps."""
    torch.manual_seed(0)
    module = build_model(spec["name"], in_chans=spec["shape"][0], num_classes=spec["classes"], kwargs=spec["kwargs"])
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    compile_in_place(module, compiled)
    recipe, ckpt = loop_harness(accelerator, "phase2.workers=1")
    opt_cfg = OptimizerConfig()
    if phase == 1:
        optimizer = make_sgd(module.parameters(), opt_cfg, 0.01, device=accelerator.device)
        model, optimizer = accelerator.prepare(module, optimizer)
        ctx = loop_context(accelerator, recipe, ckpt, module, source, opt_cfg, phase=1)
        cfg = Phase1Config(global_batch_size=batch, max_epochs=1, lr=LRConfig(peak=0.01))

        def run(steps: int) -> None:
            train_phase1(ctx, model, optimizer, cfg, tau=None)
    else:
        module = module.to(accelerator.device)
        # One worker on this one process, as a phase-2 worker's monitor sees it.
        ctx = loop_context(accelerator, recipe, ckpt, module, source, opt_cfg, phase=2)
        cfg = Phase2Config(per_worker_batch_size=batch, epochs=1, lr=LRConfig(peak=0.01))

        def run(steps: int) -> None:
            train_phase2(ctx, module, module, cfg, worker=0,
                         samples=CycleSamples(cfg.sampling, ckpt.root.parent, 0))
    return run


def rates(images: int, seconds: list[float]) -> dict:
    """Images/s at the median epoch (the one the ratios use) and the spread over every round."""
    per_round = [images / t for t in seconds]
    return {"images_per_s": images / statistics.median(seconds), "spread": [min(per_round), max(per_round)]}


def measure(key: str, accelerator, *, dry_run: bool, steps: int, rounds: int) -> dict:
    spec = {**MODELS[key], **(DRY[key] if dry_run else {})}
    device = accelerator.device
    on_gpu = device.type == "cuda"
    # The dry run compiles with dynamo's `eager` backend: the same capture and guards, no code generation.
    bf16, compiled = on_gpu, True if on_gpu else "eager"  # bf16: the tuned loop's; swap_accel's is its `auto`
    channels_last = resolve_channels_last("auto")
    sync = torch.cuda.synchronize if on_gpu else None
    rows = {}
    for phase, batch in ((1, spec["phase1_batch"]), (2, spec["worker_batch"])):
        n = steps * batch  # one epoch of `steps` steps for swap_accel's loops
        generator = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (n, *spec["shape"]), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, spec["classes"], (n,), generator=generator)
        source = InMemorySource(images, labels, mean=[0.5] * spec["shape"][0], std=[0.25] * spec["shape"][0],
                                class_names=[str(c) for c in range(spec["classes"])],
                                augment=AugmentConfig(crop_padding=4, flip=True, cutout_size=0), device=device)
        tuned, plain_model = tuned_loop(spec, source.images, source.labels, batch, bf16=bf16, compiled=on_gpu)
        loops = {name: partial(swap_steps(spec, source, accelerator, batch, phase, channels_last=channels_last,
                                          compiled=compile_), steps)
                 for name, compile_ in (("defaults", False), ("compiled", compiled))}
        loops["tuned"] = partial(tuned, steps)
        # Warm-up, timed: the first epoch compiles (and selects kernels, fills the allocator) before the rounds. In
        # this order: the uncompiled loop pays the device's one-time set-up, then swap_accel's compiled loop compiles
        # before the tuned loop has compiled the same model, so its compile seconds do not come from the tuned
        # loop's caches (main() also starts inductor on an empty cache directory).
        first = {name: timed(run, sync) for name, run in loops.items()}
        seconds = dict(zip(loops, alternate_samples(list(loops.values()), rounds, sync), strict=True))
        median = {name: statistics.median(t) for name, t in seconds.items()}
        # Compiling's own cost: the compiled loop's first epoch beyond its median, less the same for the uncompiled
        # loop (whose first epoch pays kernel selection and allocation too).
        compile_s = max(0.0, (first["compiled"] - median["compiled"]) - (first["defaults"] - median["defaults"]))
        saved_per_step = (median["defaults"] - median["compiled"]) / steps
        x = torch.zeros(min(batch, 8), *spec["shape"], device=device).contiguous(memory_format=torch.channels_last)
        flops = flops_per_image(plain_model, x, torch.zeros(x.shape[0], dtype=torch.int64, device=device))
        peak = peak_flops(device)
        row = {"batch": batch, "flops_per_image": flops, "compile_seconds": compile_s,
               "payback_steps": compile_s / saved_per_step if saved_per_step > 0 else None}
        for name in loops:
            row[name] = {**rates(n, seconds[name]), "first_epoch_seconds": first[name],
                         "ratio": median["tuned"] / median[name],
                         "peak_share": flops * n / median[name] / peak if peak else None}
        rows[f"phase{phase}"] = row
    return {"model": key, "image_shape": list(spec["shape"]), "bf16": bf16,
            "swap_accel_precision": accelerator.mixed_precision, "channels_last": channels_last,
            "compiled": compiled, **rows}


def table(records: list[dict]) -> str:
    lines = ["| model | loop | batch | tuned (img/s, min-max) | swap_accel defaults (img/s, ratio) "
             "| swap_accel compiled (img/s, ratio) | share of bf16 peak (tuned / defaults / compiled) "
             "| compile s (payback steps) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        for phase, label in (("phase1", "phase 1"), ("phase2", "phase-2 worker")):
            p = r[phase]
            t, d, c = p["tuned"], p["defaults"], p["compiled"]
            share = (" / ".join(f"{100 * q['peak_share']:.1f} %" for q in (t, d, c))
                     if t["peak_share"] is not None else "n/a")
            payback = f"{p['payback_steps']:.0f}" if p["payback_steps"] is not None else "never"
            lines.append(f"| {r['model']} | {label} | {p['batch']} | {t['images_per_s']:.0f} "
                         f"({t['spread'][0]:.0f}-{t['spread'][1]:.0f}) | {d['images_per_s']:.0f} ({d['ratio']:.3f}) "
                         f"| {c['images_per_s']:.0f} ({c['ratio']:.3f}) | {share} | {p['compile_seconds']:.1f} "
                         f"({payback}) |")
    return "\n".join(lines)


def main() -> None:
    parser = gpu_parser(__doc__, dry_run_help="CPU, tiny sizes, fp32: the plumbing only.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per block (default 30).")
    parser.add_argument("--models", default="resnet9,resnet50")
    args = gpu_args(parser, "gpu_speed")
    # Compile seconds as a first run on a machine pays them: inductor's on-disk cache starts empty (a user's own
    # TORCHINDUCTOR_CACHE_DIR is kept). Phase 2's compile still follows phase 1's in this process.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gpu_speed_inductor_"))
    steps, rounds = (2, 2) if args.dry_run else (args.steps, args.rounds)
    # What `mixed_precision: auto` gives this device: bf16 on an A100/H100, fp32 on a CPU (the dry run).
    accelerator = make_accelerator(resolve_mixed_precision("auto"))
    swap_accel_cudnn_benchmark = torch.backends.cudnn.benchmark  # what swap_accel chose for this device
    # The tuned loop searches cuDNN's algorithms on CUDA whatever swap_accel chose; the switch is process-wide, so
    # every loop here runs with it (swap_accel's choice is recorded, and checked by gpu_defaults).
    torch.backends.cudnn.benchmark = accelerator.device.type == "cuda"
    records = [measure(key, accelerator, dry_run=args.dry_run, steps=steps, rounds=rounds)
               for key in args.models.split(",")]
    rendered = table(records)
    print(rendered)
    write_gpu_result("gpu_speed", args, {"steps": steps, "rounds": rounds, "records": records, "table": rendered,
                                         "cudnn_benchmark": torch.backends.cudnn.benchmark,
                                         "swap_accel_cudnn_benchmark": swap_accel_cudnn_benchmark})
    accelerator.end_training()


if __name__ == "__main__":
    main()
