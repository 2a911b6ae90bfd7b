"""Table 1 within a time budget: which of a regime's missing (row, seed) runs fit the minutes given on this device.

Every finished run is committed as benchmarks/results/<regime result>/<device>/<tag>-s<seed>.json (its results.json,
the device's name and the phase-1 weights it started from), so each session on a lent GPU adds seeds instead of
repeating them, and a table never mixes devices' times.

Order: seed 0 of every row before seed 1 of any (a table with every row beats three seeds of one); within a seed the
regime's order, sources before the rows that start from their phase 1. A row that starts from another row's phase 1
needs that phase 1 on this machine (its run directory's checkpoints/p1-end); where it is gone (a fresh GPU machine),
the source row is run again first, and the source's committed dependents of the old phase 1 become stale.

Estimates: the mean time of the same row already committed from this device, else the images the row trains per
process divided by this device's images/s at that per-process batch (`calibrate`, a few optimizer steps of the
recipe's model), times MARGIN. A run starts only while its estimate fits what is left of the budget: a run that the
caller's time limit cuts off is lost with its machine.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import RESULTS
from benchmarks.regimes import Row
from swap_accel.recipe import Recipe

# Evaluation, BN recomputation, checkpoints and the launch on top of the calibrated optimizer steps.
MARGIN = 1.3


@dataclass(frozen=True)
class Unit:
    row: Row
    seed: int
    seconds: float  # estimated, MARGIN included
    basis: str      # where the estimate comes from


def device_name(device: str) -> str:
    """The name a committed run is filed under: the GPU's model, or "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Store:
    """The committed runs of one regime on one device: one JSON per finished (row, seed)."""

    def __init__(self, result: str, device: str, root: Path = RESULTS):
        self.device = device
        self.dir = root / result / slug(device)

    def path(self, tag: str, seed: int) -> Path:
        return self.dir / f"{tag}-s{seed}.json"

    def save(self, tag: str, seed: int, results: dict, phase1_params: str | None) -> dict:
        """Commit a finished run (atomically: a benchmark killed mid-write leaves the older record); returns it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {**results, "device_name": self.device, "phase1_params": phase1_params}
        tmp = self.path(tag, seed).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(self.path(tag, seed))
        return record

    def load(self, rows: tuple[Row, ...], seeds: int, wanted) -> dict[tuple[str, int], dict]:
        """The committed runs still valid: run under the recipe the row would run now (`wanted(row, seed)`, compared
        by the caller's notion of effective settings) and, for a row started from another's phase 1, from the
        phase 1 that row's committed run has now."""
        found: dict[tuple[str, int], dict] = {}
        for row in rows:  # sources come first, so a dependent can be checked against its source's record
            for seed in range(seeds):
                path = self.path(row.tag, seed)
                if not path.exists():
                    continue
                record = json.loads(path.read_text())
                if not wanted(row, seed, record):
                    continue
                if row.phase1_from:
                    source = found.get((row.phase1_from, seed))
                    if source is None or source["phase1_params"] != record["phase1_params"]:
                        continue
                found[row.tag, seed] = record
        return found


def per_process_images(recipe: Recipe, train_samples: int, processes: int, phase1_epochs: float | None,
                       trains_phase1: bool) -> dict[int, float]:
    """Images each process trains, by its per-process batch size. Phase 1 splits the global batch over the
    processes; phase 2's W workers share the processes (in turn when W > P, as groups of P/W when W < P), so each
    process trains W/P of the workers' images at per_worker_batch_size x W/P ... or a P/W share of one worker's."""
    out: dict[int, float] = {}
    if trains_phase1:
        epochs = phase1_epochs if recipe.phase2_runs and phase1_epochs else recipe.phase1.max_epochs
        b = recipe.phase1.global_batch_size // processes
        out[b] = out.get(b, 0.0) + epochs * train_samples / processes
    if recipe.phase2_runs:
        p2 = recipe.phase2
        b = p2.per_worker_batch_size // max(1, processes // p2.workers)
        out[b] = out.get(b, 0.0) + p2.workers * p2.epochs * train_samples / processes
    return out


def calibration_batch(batch_size: int, device: str) -> int:
    """The batch `calibrate` times for a run at `batch_size`: on a CPU the rate per image barely depends on the
    batch, so a small one stands in for every batch (one calibration serves them all) and keeps it to seconds, even
    for a bf16 recipe, which a CPU runs slowly."""
    return min(batch_size, 8) if device == "cpu" else batch_size


def calibrate(recipe: Recipe, batch_size: int, device: str, *, in_chans: int, num_classes: int,
              image_size: tuple[int, int], steps: int = 10) -> float:
    """Images/s of one process's optimizer steps of the recipe's model at `batch_size` on `device` (random data; the
    recipe's bf16 autocast and memory format). Pass `calibration_batch(b, device)` for a run at batch b."""
    from swap_accel.models import build_model

    if device == "cpu":
        steps = min(steps, 2)
    torch.manual_seed(0)
    model = build_model(recipe.model.name, in_chans=in_chans, num_classes=num_classes, kwargs=recipe.model.kwargs,
                        image_size=image_size).to(device)
    memory_format = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch_size, in_chans, *image_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dtype = torch.bfloat16 if recipe.mixed_precision == "bf16" else None

    def step():
        with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernel selection, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def plan(rows: tuple[Row, ...], seeds: int, committed: dict[tuple[str, int], dict], budget_s: float,
         estimate, has_local_phase1) -> tuple[list[Unit], list[Unit]]:
    """(the units to run in order, the missing units that do not fit). `estimate(row, seed) -> (seconds, basis)`;
    `has_local_phase1(row, seed)`: this machine still has the run directory a dependent row would start from."""
    todo, left_out, spent = [], [], 0.0
    planned: set[tuple[str, int]] = set()
    by_tag = {r.tag: r for r in rows}
    for seed in range(seeds):
        for row in rows:
            if (row.tag, seed) in committed or (row.tag, seed) in planned:
                continue
            needed = [row]
            if row.phase1_from and (row.phase1_from, seed) not in planned and not has_local_phase1(row, seed):
                # Its phase 1 is gone: run the source again first, and with it every row of this seed that starts
                # from the source's phase 1, since the new phase 1 makes their committed runs stale.
                needed = [by_tag[row.phase1_from], *(r for r in rows if r.phase1_from == row.phase1_from)]
            units = [Unit(r, seed, *estimate(r, seed)) for r in needed]
            cost = sum(u.seconds for u in units)
            if spent + cost <= budget_s:
                todo.extend(units)
                planned.update((u.row.tag, seed) for u in units)
                spent += cost
            else:
                left_out.append(next(u for u in units if u.row == row))  # the missing run, not its family
    return todo, left_out


def committed_seconds(committed: dict[tuple[str, int], dict], tag: str) -> float | None:
    """The mean launch-to-results time of a row's committed runs on this device."""
    times = [r["total_seconds"] for (t, _), r in committed.items() if t == tag]
    return statistics.fmean(times) if times else None


def describe(todo: list[Unit], left_out: list[Unit], budget_s: float) -> str:
    lines = [f"plan for {budget_s / 60:.0f} min:"]
    lines += [f"  run  {u.row.tag}-s{u.seed}: ~{u.seconds / 60:.1f} min ({u.basis})" for u in todo]
    lines += [f"  skip {u.row.tag}-s{u.seed}: ~{u.seconds / 60:.1f} min does not fit ({u.basis})" for u in left_out]
    lines.append(f"  planned ~{sum(u.seconds for u in todo) / 60:.1f} min")
    return "\n".join(lines)
