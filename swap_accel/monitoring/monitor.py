"""What happens at a logging point (the end of an epoch), for both training phases.

The phase loops call `log(row)` once per epoch and `log.steps(...)` around their batches; this is
that `log`. At a logging point it evaluates test accuracy when due. Phase 1's numbers are already
all-reduced and go to the tracker at once. Phase 2 makes no collective for monitoring (a
worker never waits for another, which on NCCL would also make a dead peer hang everyone): each worker's
leader appends its row to `RUN_DIR/monitor/worker<k>.jsonl`, only when a tracker consumes it, and the
main process logs whatever rows have arrived at its own logging points and once more after phase 2.
`results.json` and Figure 1 get every worker's rows from the workers' own histories at the end. The
optional averaged-model curve of the paper's Figure 1 (`averaged_curve: N`) does average the workers in
a scratch copy every N epochs, a collective by nature, and says so. Time spent here is kept apart from
training time, so Table 1's times stay the cost of SWAP itself.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from ..algorithm.bn import recalibrate_bn_
from ..algorithm.evaluate import evaluate_local, evaluate_shared
from ..algorithm.phase3 import average_workers_
from ..checkpointing.files import write_text
from ..data.sources import DataSource
from ..parallel.counting import CollectiveCounter
from ..parallel.distributed import broadcast_buffers_, flat_state
from ..recipe import Recipe
from ..topology import WorkerLayout
from . import tracking
from .progress import Progress

_WORKER_KEYS = ("lr", "train_loss", "train_acc", "test_acc", "images_per_s")


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
    group: object = None  # this process's worker group, None when a worker is one process
    run_dir: Path | None = None
    phase1_steps: int = 0
    steps_before: int = 0  # phase-2 steps of this process's earlier workers (W > P), for rising tracker steps
    phase1_epochs: int = 0
    seconds: dict = field(default_factory=lambda: {"phase1": 0.0, "phase2": 0.0})
    curve: list[dict] = field(default_factory=list)
    curve_after: int = 0  # phase-2 epoch after which every worker trains in this launch (workers.py)
    _logged: dict = field(default_factory=dict)  # main process: worker -> bytes of its file already logged

    @property
    def live(self) -> bool:
        """Phase-2 rows are exchanged only for a tracker; results.json gets them from the workers at the end."""
        return self.recipe.tracking.backend != "none"

    def _rows_file(self, worker: int) -> Path:
        return self.run_dir / "monitor" / f"worker{worker}.jsonl"

    def restore_worker(self, worker: int, rows: list[dict]) -> None:
        """A (re)starting worker's file holds exactly the rows its checkpoint logged: a resumed run's tracker run
        shows the whole phase, without rows of epochs the interrupted run did not checkpoint."""
        if self.live and self.layout.leads(self.accelerator.process_index):
            path = self._rows_file(worker)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

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
            "phase1/test_acc": row.get("test_acc"),
            "phase1/noise_scale": (row.get("noise_scale") or {}).get("b_simple")}, step=row["step"])
        self.progress.epoch(row)

    def _phase2(self, row: dict) -> None:
        # A worker's row is its own: evaluated on this process alone (no communication), or split over its group.
        member = self.layout.member_of(self.accelerator.process_index)
        if self._due(row["epoch"]):
            with self.counter.phase("evaluation"):
                row["test_acc"] = evaluate_local(self.module, self.test_data, self.recipe.eval.batch_size,
                                                 self.accelerator, self.group, member,
                                                 self.layout.processes_per_worker)
        # The tracker's step: phase 1's steps, then the steps this process trained so far (rising across workers
        # trained in turn). Kept in the row, so checkpoints and results.json carry it.
        row["run_step"] = self.phase1_steps + self.steps_before + row["step"]
        if self.live and member == 0:
            with self._rows_file(row["worker"]).open("a") as f:
                f.write(json.dumps(row) + "\n")
        averaged = None
        every = self.recipe.tracking.averaged_curve
        # The last epoch's point is phase 3's own result (train.py): the same average, BN pass and test set.
        if (isinstance(every, int) and row["epoch"] % every == 0 and self.curve_after < row["epoch"]
                < self.recipe.phase2.epochs):
            averaged = self._averaged_point(self.phase1_epochs + row["epoch"], row["run_step"])
            tracking.log(self.accelerator, {"averaged/test_acc": averaged}, step=row["run_step"])
        self.drain()
        self.progress.epoch(row, averaged=averaged)

    def drain(self) -> None:
        """Main process: send every phase-2 row that has arrived since the last call to the tracker."""
        if not (self.live and self.accelerator.is_main_process):
            return
        for worker in range(self.layout.workers):
            path, done = self._rows_file(worker), self._logged.get(worker, 0)
            if not path.exists():
                continue
            with path.open("rb") as f:  # only what arrived since the last call, whole lines only (a row may be
                f.seek(done)            # half-written by its worker right now)
                new = f.read()
            new = new[: new.rfind(b"\n") + 1]
            self._logged[worker] = done + len(new)
            for line in new.decode().splitlines():
                row = json.loads(line)
                values = {f"worker/{worker}/{key}": row.get(key) for key in _WORKER_KEYS}
                values.update({"phase": 2, "epoch": self.phase1_epochs + row["epoch"]})
                tracking.log_series(self.accelerator, values, f"worker/{worker}", row["run_step"])

    def workers_history(self, histories: list[dict]) -> list[dict]:
        """results.json's per-worker rows (Figure 1): `histories` maps worker -> its phase-2 history rows."""
        return [{"worker": worker, "epoch": self.phase1_epochs + row["epoch"], "step": row["run_step"],
                 **{key: row.get(key) for key in _WORKER_KEYS}}
                for worker, rows in sorted(histories.items()) for row in rows]

    @torch.no_grad()
    def _averaged_point(self, epoch: int, step: int) -> float:
        """Figure 1: the test accuracy of the workers' current average (phase 3's result if phase 2 stopped now and
        each worker were one sample; with samples_per_worker > 1 phase 3 averages the cycle ends), in a scratch
        copy so the workers continue untouched (their weights, BN statistics and RNG streams)."""
        start = time.perf_counter()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with self.counter.phase("averaged_curve"), torch.random.fork_rng(devices=devices):
            scratch = copy.deepcopy(self.module)
            # Only groups or one worker per process get here (recipe check): a group's leader holds its worker.
            own = flat_state(scratch)
            average_workers_(scratch, own if self.layout.leads(self.accelerator.process_index) else own.zero_(),
                             self.layout.workers, self.accelerator)
            recalibrate_bn_(scratch, self.train_data, self.accelerator, samples=self.recipe.eval.bn_samples,
                            batch_size=self.recipe.eval.bn_batch_size, seed=self.recipe.seed)
            acc, _ = evaluate_shared(scratch, self.test_loader, self.accelerator)
        self.curve.append({"epoch": epoch, "step": step, "test_acc": acc, "seconds": time.perf_counter() - start})
        return acc

    def final_point(self, final_acc: float, epoch: int, step: int) -> None:
        """Phase 3's result closes the averaged curve ("end"): no extra work."""
        if self.recipe.tracking.averaged_curve == "off":
            return
        self.curve.append({"epoch": epoch, "step": step, "test_acc": final_acc, "seconds": 0.0, "source": "phase3"})
        tracking.log(self.accelerator, {"averaged/test_acc": final_acc}, step=step)

    def curve_summary(self) -> dict:
        return {"setting": self.recipe.tracking.averaged_curve, "points": self.curve,
                "seconds": sum(p["seconds"] for p in self.curve)}
