"""What happens at a logging point (the end of an epoch), for both training phases (issue 3).

The phase loops call `log(row)` once per epoch and `log.steps(...)` around their batches; this is
that `log`. At a logging point it evaluates test accuracy when due, and in phase 2 gathers every
process's worker numbers to the main process (one small all-gather, counted as `phase2_logging`, so phase 2
between logging points still makes zero collectives) and optionally evaluates the averaged model
of the paper's Figure 1 in a scratch copy. With W > P workers trained in turn (issue 9), the processes'
k-th workers log together, and tracker steps keep rising across them (they add the steps this process
trained before). Time spent here is kept apart from training time, so Table 1's times stay the cost
of SWAP itself, and the averaged curve reports its own cost.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from . import tracking
from .bn import recalibrate_bn_
from .data import DataSource
from .distributed import CollectiveCounter, average_workers_, broadcast_buffers_, flat_parameters, gather_values
from .evaluate import evaluate_local, evaluate_shared
from .progress import Progress
from .recipe import Recipe
from .topology import WorkerLayout

_WORKER_KEYS = ("train_loss", "train_acc", "test_acc", "images_per_s")


@dataclass
class Monitor:
    accelerator: Accelerator
    recipe: Recipe
    counter: CollectiveCounter
    module: torch.nn.Module
    train_data: DataSource
    test_data: DataSource
    test_loader: object
    progress: Progress
    layout: WorkerLayout | None = None
    group: object = None  # this process's worker group (issue 9), None when a worker is one process
    phase1_steps: int = 0
    steps_before: int = 0  # phase-2 steps of this process's earlier workers (W > P), for rising tracker steps
    phase1_epochs: int = 0
    seconds: dict = field(default_factory=lambda: {"phase1": 0.0, "phase2": 0.0})
    worker_history: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)

    def end_worker(self, steps: int) -> None:
        self.steps_before += steps

    def steps(self, iterable, **where):
        return self.progress.steps(iterable, **where)

    def _due(self, epoch: int) -> bool:
        every = self.recipe.tracking.eval_every
        return every > 0 and epoch % every == 0

    def __call__(self, row: dict) -> None:
        """Logging point at the end of an epoch. Adds `test_acc` to `row` (the loop's history) when evaluated."""
        start = time.perf_counter()
        self._phase1(row) if row["phase"] == 1 else self._phase2(row)
        self.seconds[f"phase{row['phase']}"] += time.perf_counter() - start

    def _phase1(self, row: dict) -> None:
        if self._due(row["epoch"]):
            with self.counter.phase("evaluation"):
                # The shared model is evaluated in shards: every rank needs rank 0's BN statistics first.
                broadcast_buffers_(self.module, self.accelerator)
                row["test_acc"], _ = evaluate_shared(self.module, self.test_loader, self.accelerator)
        self.phase1_steps, self.phase1_epochs = row["step"], row["epoch"]
        tracking.log(self.accelerator, {
            "phase": 1, "epoch": row["epoch"], "phase1/lr": row["lr"], "phase1/train_loss": row["train_loss"],
            "phase1/train_acc": row["train_acc"], "phase1/images_per_s": row["images_per_s"],
            "phase1/test_acc": row.get("test_acc")}, step=row["step"])
        self.progress.epoch(row)

    def _phase2(self, row: dict) -> None:
        # A row replayed after a resume (train.py) carries the accuracy measured when it was first logged; the
        # resumed weights are from a later step, so evaluating them would misreport that epoch.
        rank = self.accelerator.process_index
        member = self.layout.member_of(rank)
        if self._due(row["epoch"]) and "test_acc" not in row:
            # The worker's own model: on this process alone (no communication), or split over its group.
            with self.counter.phase("evaluation"):
                row["test_acc"] = evaluate_local(self.module, self.test_data, self.recipe.eval.batch_size,
                                                 self.accelerator, self.group, member,
                                                 self.layout.processes_per_worker)
        mine = torch.tensor([row["worker"], member] + [row.get(k, math.nan) for k in _WORKER_KEYS],
                            dtype=torch.float64, device=self.accelerator.device)
        with self.counter.phase("phase2_logging"):
            gathered = gather_values(mine, self.accelerator).tolist()
        # One row per worker (a group's members hold the same numbers). None (not NaN) marks "not evaluated at
        # this point": results.json stays standard JSON.
        workers = sorted(({"worker": int(w[0]), **{k: None if math.isnan(v) else v
                                                   for k, v in zip(_WORKER_KEYS, w[2:], strict=True)}}
                          for w in gathered if w[1] == 0), key=lambda w: w["worker"])
        epoch, step = self.phase1_epochs + row["epoch"], self.phase1_steps + self.steps_before + row["step"]
        every = self.recipe.tracking.averaged_curve
        averaged = None
        # The last epoch's point is phase 3's own result (train.py): the same average, BN pass and test set.
        if isinstance(every, int) and row["epoch"] % every == 0 and row["epoch"] < self.recipe.phase2.epochs:
            averaged = self._averaged_point(epoch, step)
        values = {"phase": 2, "epoch": epoch, "phase2/lr": row["lr"],
                  "phase2/train_loss": sum(w["train_loss"] for w in workers) / len(workers),
                  "phase2/train_acc": sum(w["train_acc"] for w in workers) / len(workers),
                  "phase2/images_per_s": sum(w["images_per_s"] for w in workers), "averaged/test_acc": averaged}
        for w in workers:
            values.update({f"worker/{w['worker']}/{key}": w[key] for key in ("train_loss", "train_acc", "test_acc")})
        tracking.log(self.accelerator, values, step=step)
        self.worker_history.append({"epoch": epoch, "step": step, "lr": row["lr"], "workers": workers})
        self.progress.epoch(row, workers=workers, averaged=averaged)

    @torch.no_grad()
    def _averaged_point(self, epoch: int, step: int) -> float:
        """Figure 1: the test accuracy phase 3 would give if phase 2 stopped now, computed in a scratch
        copy so the workers continue untouched (their weights, BN statistics and RNG streams)."""
        start = time.perf_counter()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with self.counter.phase("averaged_curve"), torch.random.fork_rng(devices=devices):
            scratch = copy.deepcopy(self.module)
            # Only groups or one worker per process get here (recipe check): a group's leader holds its worker.
            own = flat_parameters(scratch)
            average_workers_(scratch, own if self.layout.leads(self.accelerator.process_index) else own.zero_(),
                             self.layout.workers, self.accelerator)
            recalibrate_bn_(scratch, self.train_data, self.accelerator, samples=self.recipe.eval.bn_samples,
                            batch_size=self.recipe.eval.bn_batch_size, seed=self.recipe.seed)
            acc, _ = evaluate_shared(scratch, self.test_loader, self.accelerator)
        self.curve.append({"epoch": epoch, "step": step, "test_acc": acc, "seconds": time.perf_counter() - start})
        return acc

    def final_point(self, final_acc: float) -> None:
        """Phase 3's result closes the averaged curve ("end"): no extra work."""
        if self.recipe.tracking.averaged_curve == "off":
            return
        last = self.worker_history[-1]
        self.curve.append({"epoch": last["epoch"], "step": last["step"], "test_acc": final_acc, "seconds": 0.0,
                           "source": "phase3"})
        tracking.log(self.accelerator, {"averaged/test_acc": final_acc}, step=last["step"])

    def curve_summary(self) -> dict:
        return {"setting": self.recipe.tracking.averaged_curve, "points": self.curve,
                "seconds": sum(p["seconds"] for p in self.curve)}
