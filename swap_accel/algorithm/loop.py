"""The epoch loop that phase 1 and every phase-2 worker run: where it resumes, its clock, its running totals and its
checkpoint cadence. The phases keep only what is theirs (the order of the data, the step, what an epoch's end adds).

Invariants it protects:
- A resumed loop continues exactly where its checkpoint stopped: the same epoch, step within it, partial sums,
  generator and RNG states (resume.restore_loop), so a killed and rerun run ends bitwise as the uninterrupted one.
- Table 1's times leave out the monitoring at logging points: its seconds are added to the start time, and so the
  seconds a checkpoint stores, and a resume continues from, are training's only.
- Diverged weights never overwrite a good checkpoint: the finite check runs when a checkpoint is due, not per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from ..checkpointing.resume import restore_loop
from ..checkpointing.saver import Checkpointer
from ..data.sources import DataSource
from ..recipe import OptimizerConfig


def make_sgd(params: Iterable[torch.Tensor], opt_cfg: OptimizerConfig, lr: float, *, device: torch.device,
             fp16: bool = False) -> torch.optim.SGD:
    """The SGD every loop trains with (momentum, Nesterov, weight decay), for parameters that train on `device`.

    Fused on CUDA: one kernel updates every parameter where torch's default there (foreach) launches several per
    step, and a small-batch worker's step is launch-bound; torch.optim's documentation ranks fused the fastest of
    its implementations, and benchmarks/gpu_speed.py's tuned loop uses it. Fused with fp16 on any device: it
    applies the loss scaler's inf check on the device, where torch's GradScaler would otherwise read it on the host
    every step (precision.LossScale). A CPU run in fp32 or bf16 keeps torch's default, so its numbers are
    bitwise what they were (benchmarks/pinned.py)."""
    params = list(params)
    fused = fp16 or torch.device(device).type == "cuda"
    optimizer = torch.optim.SGD(params, lr=lr, momentum=opt_cfg.momentum,
                                nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0, weight_decay=opt_cfg.weight_decay,
                                fused=True if fused else None)
    if fp16 and opt_cfg.momentum > 0:
        # torch 2.14's fused SGD makes its momentum buffers with empty_like on the first step and leaves them so
        # when the scaler skips that step (inf gradients, common at fp16's first scale): garbage, then NaN (seen
        # on CPU; the same Python code feeds the CUDA kernel). Zeros from the start give the first step's
        # buf = grad exactly (dampening 0), bitwise what the unfused SGD computes.
        for param in params:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


@dataclass(frozen=True)
class LoopContext:
    """What every training loop of a run reads besides its own phase's settings: the device and process group
    (`accelerator`), the training data, the optimizer settings, the run's seed, the monitor and the checkpointer.
    Phase 1, a worker and stacked workers take one, so their signatures keep only what is theirs."""

    accelerator: Accelerator
    source: DataSource
    optimizer: OptimizerConfig
    seed: int
    log: object  # monitoring.Monitor, or any callable with its steps() (the benchmarks' quiet monitors)
    ckpt: Checkpointer


@dataclass
class LoopResult:
    """What a loop reports and checkpoints (manifest key "result"), and what a resume puts back."""

    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    train_acc: float = 0.0
    train_loss: float = 0.0
    loss_scale: dict | None = None  # fp16: the final scale, skipped steps and growths
    history: list[dict] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    pass


def require_finite(module: torch.nn.Module, where: str, ckpt: Checkpointer, totals: torch.Tensor | None = None,
                   agree=bool) -> None:
    """Never checkpoint diverged weights over good ones: one host sync, only when a checkpoint is due.

    `agree(finite)` makes the decision shared by every process that will meet at the checkpoint's barrier:
    BN statistics differ per rank, so one rank may see a NaN the others do not, and a rank that
    stopped alone would leave them waiting there."""
    # Parameters and BN running statistics: NaN statistics would poison evaluation and phase 3 just the same.
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if totals is not None:
        finite &= torch.isfinite(totals).all()
    if not agree(bool(finite)):
        kept = ckpt.last_good or "none was written yet"
        raise TrainingDiverged(f"{where}: the loss, weights or BN statistics became NaN/Inf; stopped there, the last "
                               f"good checkpoint is kept ({kept}); lower the learning rate and rerun with --overwrite")


class EpochTotals:
    """An epoch's running sums, kept on the device all epoch (no host sync per step): the loss, the correct
    predictions, the images and this process's seconds; phase 1 appends the gradient-noise sums (noise_scale.SLOTS).
    Checkpoints store `tensor` as it is."""

    LOSS, CORRECT, COUNT, SECONDS = range(4)

    def __init__(self, size: int, device, resumed: torch.Tensor | None = None):
        self.tensor = torch.zeros(size, dtype=torch.float64, device=device)
        if resumed is not None:
            self.tensor[: resumed.numel()] = resumed

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.tensor[self.LOSS] += loss.detach() * labels.numel()
        self.tensor[self.CORRECT] += (logits.argmax(1) == labels).sum()
        self.tensor[self.COUNT] += labels.numel()


class EpochLoop:
    """`for epoch in loop.epochs(): (per step) if loop.step_done(): save; (at the end) loop.end_epoch(...);
    history.append(row); loop.log(row)`.

    `resume` is a checkpoint directory of this loop (its `state_file` is this process's loop state) or None."""

    def __init__(self, result: LoopResult, ctx: LoopContext, *, epochs: int, totals_size: int,
                 generator: torch.Generator, resume: Path | None, state_file: str, what: str, lr_key: str):
        self.result, self.epochs_total, self.ckpt, self.monitor = result, epochs, ctx.ckpt, ctx.log
        device = self.device = ctx.accelerator.device
        self.totals_size, self.what, self.lr_key = totals_size, what, lr_key
        self.first_epoch, self._resumed_done, self._resumed_totals = 0, 0, None
        if resume is not None:  # continue exactly where the checkpoint stopped
            self.first_epoch, self._resumed_done, self._resumed_totals = restore_loop(
                resume, state_file, result, generator, device)
        self.resumed_totals_size = None if self._resumed_totals is None else self._resumed_totals.numel()
        self.resumed_at = (self.first_epoch, self._resumed_done)  # (epoch, steps done in it) this launch starts at
        self.done = 0         # steps of the current epoch already trained before this launch
        self.totals: EpochTotals | None = None
        self._start = self._epoch_start = 0.0

    def begin(self, *, by_clock: bool) -> None:
        """Start the checkpoint cadence and the clock (a resumed loop's clock continues from its seconds)."""
        self.ckpt.begin(self.result.steps, by_clock=by_clock)
        self._start = time.perf_counter() - self.result.seconds

    def epochs(self) -> Iterator[int]:
        for epoch in range(self.first_epoch, self.epochs_total):
            self._epoch_start = time.perf_counter()
            resuming = epoch == self.first_epoch
            self.done = self._resumed_done if resuming else 0
            self.totals = EpochTotals(self.totals_size, self.device, self._resumed_totals if resuming else None)
            yield epoch

    def stamp(self, loss_scale) -> None:
        """Bring the result's seconds and loss scale up to now (before a checkpoint stores them, and at the end)."""
        self.result.seconds, self.result.loss_scale = time.perf_counter() - self._start, loss_scale.summary()

    def step_done(self) -> bool:
        """Count an optimizer step; True when a checkpoint is due (the caller checks finiteness, then saves)."""
        self.result.steps += 1
        return self.ckpt.due(self.result.steps)

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self._epoch_start

    def end_epoch(self, epoch: int, loss_sum: float, correct: float, count: float) -> None:
        """The epoch's numbers into the result; a NaN/Inf loss stops the run, keeping the last good checkpoint."""
        result = self.result
        result.epochs = epoch + 1
        result.train_loss, result.train_acc = loss_sum / count, correct / count
        if not math.isfinite(result.train_loss):
            raise TrainingDiverged(
                f"{self.what} loss became {result.train_loss} by step {result.steps}; stopped there, the last good "
                f"checkpoint is kept ({self.ckpt.last_good or 'none was written yet'}); lower {self.lr_key} and "
                "rerun with --overwrite")

    def log(self, row: dict) -> None:
        """Run the epoch's logging point off the clock (the row is in the history already)."""
        with self.off_clock():
            self.monitor(row)

    @contextlib.contextmanager
    def off_clock(self):
        """Work that is not training (monitoring, the transition search's checkpoints) is left out of its time."""
        begun = time.perf_counter()
        yield
        self._start += time.perf_counter() - begun
