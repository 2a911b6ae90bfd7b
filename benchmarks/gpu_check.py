"""GPU readiness: the quickstart through all three phases on one CUDA device, in fp32, bf16 and fp16.

For each precision, one process (P = 1, on a real NCCL process group of one) trains the quickstart recipe with
W = 4 workers in turn, and this script checks, measures and prints:
  - host syncs inside training steps: `torch.cuda.set_sync_debug_mode("warn")` is on while each phase-1 and
    phase-2 step runs (batch fetch included; epoch ends, evaluation and checkpoints are outside); any
    synchronizing call fails the check;
  - collectives given a CPU tensor on an NCCL group (every `torch.distributed` collective is inspected);
  - phase-1 step time against a hand-written loop of the same model, batch, micro-batches, optimizer, precision
    and data pipeline (target ratio <= 1.03), medians over epochs after the first (measured with the guards on,
    which cost swap_accel's loop a few microseconds per step that the hand-written one does not pay);
  - peak GPU memory.
Then it times phase 1's step at the CIFAR-10 recipe's shape (ResNet-9 full width, 3x32x32 synthetic batches
of the quickstart's phase-1 batch) and prints images/s. Exit status 1 if any check fails.

    .venv/bin/python -m benchmarks.gpu_check            # CUDA machine, under 8 minutes on one H100
    .venv/bin/python -m benchmarks.gpu_check --dry-run  # CPU, tiny: checks the plumbing (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fashion_mnist.yaml"
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
RATIO_TARGET = 1.03


def overrides(precision: str, dry_run: bool) -> list[str]:
    sets = [f"mixed_precision={PRECISIONS[precision]}", "phase2.workers=4", "tracking.backend=none",
            "checkpoint.every_minutes=1000", "tracking.eval_every=0"]
    if dry_run:  # seconds on a CPU; fp16 on a CPU is slow (README): 2 workers in turn are enough to exercise turns
        sets += ["phase2.workers=2", "data.train_subset=256", "data.test_subset=256", "phase1.global_batch_size=64",
                 "phase1.micro_batch_size=64", "phase1.max_epochs=2", "phase1.lr.warmup_epochs=1",
                 "phase2.per_worker_batch_size=64", "phase2.epochs=1", "eval.bn_samples=128", "eval.batch_size=256",
                 "model.kwargs={base_width: 8}"]
    return sets


# ------------------------------------------------------------------ checks installed in the training process

class CollectiveGuard:
    """Wraps every `torch.distributed` collective; a CPU tensor handed to a group whose backend is in `strict`
    is a violation (NCCL takes device tensors only; a CPU one is an error or a hidden copy)."""

    def __init__(self, strict: set[str]) -> None:
        import torch.distributed as dist

        from swap_accel.parallel.counting import _COUNTED, _group_position, group_argument

        self._group_argument = group_argument

        self.dist, self.strict, self.inspected, self.violations, self.self_test = dist, strict, 0, [], None
        for name in _COUNTED:
            if hasattr(dist, name):
                fn = getattr(dist, name)
                setattr(dist, name, self._wrap(name, fn, _group_position(name, fn)))

    def check(self, name: str, group, values: list) -> None:
        self.inspected += 1
        backend = self.dist.get_backend(group) if self.dist.is_initialized() else None
        if backend in self.strict and any(t.device.type == "cpu" for t in _tensors(values)):
            self.violations.append(f"{name} on a {backend} group got a CPU tensor")

    def probe(self) -> bool:
        """Does `check` flag a CPU tensor on the live group when its backend counts as strict? (Checked, not
        sent: NCCL must never get one.) Run at the first collective, while the group exists."""
        strict, self.strict, before = self.strict, {self.dist.get_backend()}, len(self.violations)
        self.check("self-test", None, [torch.ones(1)])
        flagged = len(self.violations) > before
        del self.violations[before:]
        self.strict, self.inspected = strict, self.inspected - 1
        return flagged

    def _wrap(self, name, fn, position):
        def guarded(*args, **kwargs):
            if self.self_test is None and self.dist.is_initialized():
                self.self_test = self.probe()
            self.check(name, self._group_argument(position, args, kwargs), list(args) + list(kwargs.values()))
            return fn(*args, **kwargs)

        return guarded


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found += _tensors(v)
    return found


class StepSyncGuard:
    """Sync debug mode "warn" inside every training step of both phases, off between them. Hooks the loops'
    one per-step entry point (`Monitor.steps`, which yields each batch), so batch fetch and step are covered."""

    def __init__(self, cuda: bool) -> None:
        from swap_accel.monitoring.monitor import Monitor

        self.cuda, self.steps, self.syncs = cuda, 0, []
        original, guard = Monitor.steps, self

        def steps(monitor, iterable, **where):
            iterator = iter(original(monitor, iterable, **where))
            while True:
                with guard.window():
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                    guard.steps += 1
                    yield item  # the loop body runs here, still inside the window

        Monitor.steps = steps

    def self_test(self) -> bool:
        """The guard must see a sync that really happens (a device-to-host read) inside its window."""
        if not self.cuda:
            return True
        with self.window():
            torch.ones(1, device="cuda").sum().item()
        seen, self.syncs = len(self.syncs), []
        return seen == 1

    @contextlib.contextmanager
    def window(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
                # Only a sync's own warning: turning the mode on also warns once that it is a prototype ("does not
                # yet detect all synchronizing operations"), which the first H200 run counted as a sync (torch 2.11).
                self.syncs += [str(w.message).splitlines()[0] for w in caught
                               if "synchronizing CUDA operation" in str(w.message)]


def run_precision(precision: str, out: Path, dry_run: bool) -> dict:
    """One precision in this (fresh) process: guards, swap_accel's train(), the hand-written loop."""
    from swap_accel.recipe import load_recipe
    from swap_accel.train import train

    cuda = torch.cuda.is_available() and not dry_run
    recipe = load_recipe(RECIPE, overrides(precision, dry_run))
    collectives, syncs = CollectiveGuard({"nccl"}), StepSyncGuard(cuda)
    sync_self_test = syncs.self_test()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    results = train(recipe, out / precision, fresh=True)  # ends by destroying the process group
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows = results["phase1"]["history"]
    steps_per_epoch = rows[0]["step"]
    swap_step = statistics.median(r["seconds"] for r in rows[1:] or rows) / steps_per_epoch
    hand_step = hand_written_step(recipe, 1 if dry_run else steps_per_epoch, cuda, repeats=1 if dry_run else 3)
    return {"precision": precision, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "test_acc": results["test_acc"], "phase1_steps": results["phase1"]["steps"],
            "workers": results["phase2"]["workers"], "steps_checked": syncs.steps, "host_syncs": syncs.syncs[:5],
            "host_sync_count": len(syncs.syncs), "collectives_inspected": collectives.inspected,
            "cpu_tensor_on_nccl": collectives.violations[:5],
            "guard_self_test": collectives.self_test and sync_self_test,
            "swap_step_ms": 1000 * swap_step, "hand_step_ms": 1000 * hand_step, "ratio": swap_step / hand_step,
            "peak_memory_gib": peak, "loss_scale": results["phase1"]["loss_scale"]}


def hand_written_step(recipe, steps: int, cuda: bool, repeats: int) -> float:
    """The same model, batch, micro-batches, SGD, autocast and in-memory data pipeline as swap_accel's phase 1,
    written as a plain loop: the baseline for the overhead ratio. Seconds per step, median of `repeats`."""
    from swap_accel.algorithm.loop import make_sgd
    from swap_accel.data.loading import load_data
    from swap_accel.data.sampling import phase1_shard
    from swap_accel.models import build_model
    from swap_accel.parallel.distributed import use_cudnn_benchmark

    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # the cuDNN algorithm search swap_accel's accelerator turns on, whichever side runs first
        use_cudnn_benchmark()
    data = load_data(recipe.data, device, split="train")
    model = build_model(recipe.model.name, in_chans=data.in_chans, num_classes=data.num_classes,
                        kwargs=recipe.model.kwargs, image_size=data.image_size).to(device)
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fp16, opt = recipe.mixed_precision == "fp16", recipe.optimizer
    sgd = make_sgd(model.parameters(), opt, 0.01, device=device, fp16=fp16)  # swap_accel's own optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.mixed_precision]
    batch, micro = recipe.phase1.global_batch_size, recipe.phase1.micro_batch_size or recipe.phase1.global_batch_size
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for epoch in range(repeats + 1):  # the first pass warms up (cuDNN autotuning, allocator)
        order = phase1_shard(data.num_samples, seed=0, epoch=epoch, global_batch=batch, rank=0, num_processes=1)
        batches = data.batches(order[: steps * batch], micro, augment=True, generator=generator)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            for _ in range(batch // micro):
                x, y = next(batches)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss / (batch // micro)).backward()
            scaler.step(sgd)
            scaler.update()
            sgd.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times[1:])


def cifar_shape_images_per_s(dry_run: bool) -> dict:
    """Phase 1's step (swap_accel's own loop) at the CIFAR-10 recipe's shape on synthetic 3x32x32 batches."""
    from swap_accel.algorithm.loop import LoopContext, make_sgd
    from swap_accel.algorithm.phase1 import train_phase1
    from swap_accel.checkpointing.saver import Checkpointer
    from swap_accel.data.sources import InMemorySource
    from swap_accel.models import build_model
    from swap_accel.parallel.distributed import make_accelerator
    from swap_accel.recipe import load_recipe

    width = 8 if dry_run else 64
    recipe = load_recipe(RECIPE, overrides("fp32", dry_run) + [f"model.kwargs={{base_width: {width}}}"])
    accelerator = make_accelerator("no")
    n = recipe.phase1.global_batch_size * (2 if dry_run else 20)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    source = InMemorySource(images, torch.randint(0, 10, (n,)), mean=[0.5] * 3, std=[0.25] * 3,
                            class_names=[str(i) for i in range(10)], augment=recipe.data.augment,
                            device=accelerator.device)
    module = build_model("resnet9", in_chans=3, num_classes=10, kwargs=recipe.model.kwargs)
    if recipe.model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = make_sgd(module.parameters(), recipe.optimizer, 0.1, device=accelerator.device)
    model, optimizer = accelerator.prepare(module, optimizer)

    class _Quiet:  # phase 1's logging point, without evaluation
        def steps(self, iterable, **_):
            return iterable

        def __call__(self, row):
            pass

    cfg = recipe.phase1.model_copy(update={"max_epochs": 2, "stop_train_accuracy": None})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp), recipe, accelerator)
        ctx = LoopContext(accelerator, source, recipe.optimizer, 0, _Quiet(), ckpt)
        result = train_phase1(ctx, model, optimizer, cfg, tau=None)
    last = result.history[-1]  # the second epoch: after warm-up
    return {"base_width": recipe.model.kwargs["base_width"], "batch": recipe.phase1.global_batch_size,
            "images_per_s": last["images_per_s"]}


# ------------------------------------------------------------------ orchestration

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args: list[str]) -> dict:
    """A fresh process per measurement (Accelerate's state is per process), as rank 0 of a one-process group:
    NCCL on a GPU, gloo in the dry run, so the collectives really run."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"gpu_check {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    # Syncs inside C++ entered with the GIL released (DDP's reducer, Work.wait) reach stderr, not Python's
    # warnings; the debug mode is on only inside step windows, so every such line is a step's.
    record["stderr_syncs"] = done.stderr.count("synchronizing CUDA operation")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the plumbing only")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # inside a child process: one measurement, its JSON on the last stdout line
        record = cifar_shape_images_per_s(args.dry_run) if args.child == "cifar" else \
            run_precision(args.child, args.out, args.dry_run)
        print(json.dumps(record))
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device; on a CPU run `python -m benchmarks.gpu_check --dry-run`")
    started = time.perf_counter()
    flags = ["--out", str(args.out)] + (["--dry-run"] if args.dry_run else [])
    records = [child(["--child", p, *flags]) for p in args.precisions.split(",")]
    cifar = child(["--child", "cifar", *flags])
    failed = report(records, cifar, args.dry_run)
    verdict = "FAILED: " + ", ".join(failed) if failed else "all checks passed"
    print(f"gpu_check: {time.perf_counter() - started:.0f} s, {verdict}")
    (args.out / "gpu_check.json").write_text(json.dumps({"records": records, "cifar_shape": cifar}, indent=1))
    sys.exit(1 if failed else 0)


def report(records: list[dict], cifar: dict, dry_run: bool) -> list[str]:
    print(f"device: {records[0]['device']}; P = 1, W = {records[0]['workers']} workers in turn; quickstart recipe")
    print("| precision | test acc | phase-1 step (ms) | hand-written (ms) | ratio | steps checked | host syncs "
          "| collectives (CPU tensor on NCCL) | peak memory (GiB) | fp16 loss scale |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = []
    for r in records:
        scale = r["loss_scale"] and f"{r['loss_scale']['scale']:.0f} ({r['loss_scale']['skipped_steps']} skipped)"
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        print(f"| {r['precision']} | {100 * r['test_acc']:.2f} % | {r['swap_step_ms']:.2f} | {r['hand_step_ms']:.2f} "
              f"| {r['ratio']:.3f} | {r['steps_checked']} | {r['host_sync_count']} | {r['collectives_inspected']} "
              f"({len(r['cpu_tensor_on_nccl'])}) | {peak} | {scale or '-'} |")
        if r["host_sync_count"] or r["stderr_syncs"]:
            first = r["host_syncs"][0] if r["host_syncs"] else "reported on stderr by C++"
            failed.append(f"{r['precision']}: host sync in a step ({first}; {r['stderr_syncs']} on stderr)")
        if r["cpu_tensor_on_nccl"]:
            failed.append(f"{r['precision']}: {r['cpu_tensor_on_nccl'][0]}")
        if not r["guard_self_test"] or not r["steps_checked"] or not r["collectives_inspected"]:
            failed.append(f"{r['precision']}: a guard saw nothing (plumbing broken)")
        if not dry_run and r["ratio"] > RATIO_TARGET:
            failed.append(f"{r['precision']}: step time {r['ratio']:.3f}x the hand-written loop "
                          f"(target <= {RATIO_TARGET})")
    print(f"CIFAR-10 shape (ResNet-9 base width {cifar['base_width']}, 3x32x32 synthetic, batch {cifar['batch']}, "
          f"fp32): phase 1 {cifar['images_per_s']:.0f} images/s")
    if dry_run:
        print("dry run: CPU and tiny sizes; the timings and ratio are not the GPU's and are not judged")
    return failed


if __name__ == "__main__":
    main()
