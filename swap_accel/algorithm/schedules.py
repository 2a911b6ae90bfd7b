"""Learning-rate schedules as pure functions of the step (paper Fig. 1, Tables 5-6).

Phase 1 warms up linearly to its peak and decays toward zero over `max_epochs`; stopping early at
τ leaves the decay unfinished, as in the paper. Phase 2 starts at its own (lower) peak and decays
to zero over its epochs. `start_epoch` enters a schedule part-way (ImageNet, paper section 5.2). `cycles` cuts
phase 2 into equal cycles whose ends are its samples (paper section 5.3, Figure 6), run as `cycle_shape` says: `swa`,
Izmailov et al. 2018's decay from α1 (`peak`) to a constant α2 (`swa_lr`) > 0 over the first cycle, never warmed up
again; or `restart`, every cycle the whole schedule again (re-warming, closer to snapshot ensembles).

A phase with `stages` follows a piecewise schedule instead (paper section 5.2, Figure 5): per stage, its own batch,
training image size and crop scale, and a learning rate linear over the stage's epochs. `EpochSchedule` answers
both kinds per epoch and step, so the phases need not know which one a recipe gave.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..recipe import LRConfig, StageConfig


def lr_at_epoch(epoch: float, *, peak: float, warmup_epochs: float, total_epochs: float, shape: str,
                end: float = 0.0) -> float:
    """Learning rate at a (fractional) epoch of a warm-up-then-decay schedule of `total_epochs`, decaying from `peak`
    to `end` (SWA's α2; 0: to zero)."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    decay_epochs = total_epochs - warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / decay_epochs) if decay_epochs > 0 else 1.0
    if shape == "constant":  # SWA-style (Izmailov et al. 2018): workers keep exploring, the average denoises
        return peak
    if end:  # SWA's decay to α2 > 0, the same shape between the two (end = 0 keeps the expressions below bitwise)
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
        return end + (peak - end) * fraction
    if shape == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def make_schedule(cfg: LRConfig, *, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """`lr_at(step)` for a phase of `epochs` epochs of `steps_per_epoch` optimizer steps.

    Step s is evaluated at the middle of its slice of the schedule, epoch start + (s + 0.5) / steps,
    so neither the first warm-up step nor the last decay step is wasted at lr 0.
    """
    total = cfg.schedule_epochs or epochs
    cycle_epochs = total / cfg.cycles  # the recipe checks that cycles cut the epochs into whole-epoch cycles
    if cfg.cycle_shape == "swa":
        if cfg.swa_lr is None:
            raise ValueError("cycle_shape swa needs swa_lr (α2); a recipe fills it in, a bare LRConfig must set it")
        return _swa_schedule(cfg, cycle_epochs, steps_per_epoch)

    def lr_at(step: int) -> float:
        epoch = cfg.start_epoch + (step + 0.5) / steps_per_epoch
        if cfg.cycles > 1:  # each cycle restarts the schedule (one cycle: the epoch as it is, bit for bit)
            epoch -= cycle_epochs * math.floor(epoch / cycle_epochs)
        return lr_at_epoch(epoch, peak=cfg.peak, warmup_epochs=cfg.warmup_epochs, total_epochs=cycle_epochs,
                           shape=cfg.shape)

    return lr_at


def _swa_schedule(cfg: LRConfig, decay_epochs: float, steps_per_epoch: int) -> Callable[[int], float]:
    """Izmailov et al. 2018 (their CIFAR experiments' schedule; our cycles space the samples): warm-up (if any) and
    decay from α1 = peak to α2 = swa_lr over the first cycle, then α2 to the end. No cycle warms up again and the LR
    never reaches zero, so the samples at the cycle ends are iterates of one constant-LR SGD run, not re-converged
    snapshots."""

    def lr_at(step: int) -> float:
        epoch = cfg.start_epoch + (step + 0.5) / steps_per_epoch
        if epoch >= decay_epochs:
            return cfg.swa_lr
        return lr_at_epoch(epoch, peak=cfg.peak, warmup_epochs=cfg.warmup_epochs, total_epochs=decay_epochs,
                           shape=cfg.shape, end=cfg.swa_lr)

    return lr_at


def describe(cfg: LRConfig, epochs: int) -> str:
    """One line naming the schedule a phase of `epochs` epochs runs (benchmarks/table4.py's schedule column)."""
    def count(n: float) -> str:
        return f"{n:g} epoch{'' if n == 1 else 's'}"

    cycle = epochs // cfg.cycles
    warmup = f"warm-up {count(cfg.warmup_epochs)}, " if cfg.warmup_epochs else ""
    warmup += "" if cfg.shape == "linear" else f"{cfg.shape} "
    if cfg.cycle_shape == "swa":
        return (f"swa: {warmup}{cfg.peak:g} → {cfg.swa_lr:g} over {count(cycle)}, then {cfg.swa_lr:g}"
                + (f" ({cfg.cycles} cycles of {count(cycle)})" if cfg.cycles > 1 else ""))
    if cfg.cycles == 1:
        return f"{warmup}{cfg.peak:g} → 0 over {count(epochs)}"
    return f"restart: {cfg.cycles} cycles of {count(cycle)}, each {warmup}{cfg.peak:g} → 0"


@dataclass(frozen=True)
class Stage:
    """What the epochs [start_epoch, end_epoch) of a phase train with (None: the source's own size and scale)."""

    start_epoch: int
    end_epoch: int
    batch_size: int  # global in phase 1, per worker in phase 2
    lr: tuple[float, float] | None = None  # linear from lr[0] to lr[1] over the stage; None: the phase's `lr`
    image_size: int | None = None
    min_scale: float | None = None
    read_resized: int | None = None  # not inherited (recipe.StageConfig)


def resolve_stages(stages: list[StageConfig], *, batch_size: int, batch_key: str, epochs: int) -> list[Stage]:
    """The recipe's stages with every inherited value filled in (the first stage inherits the phase's batch); no
    stages: one stage over the whole phase."""
    if not stages:
        return [Stage(0, epochs, batch_size)]
    resolved, start, image_size, min_scale = [], 0, None, None
    for cfg in stages:
        batch_size = getattr(cfg, batch_key) or batch_size
        image_size, min_scale = cfg.image_size or image_size, cfg.min_scale or min_scale
        lr = cfg.lr if isinstance(cfg.lr, tuple) else (cfg.lr, cfg.lr)
        resolved.append(Stage(start, cfg.until_epoch, batch_size, lr, image_size, min_scale, cfg.read_resized))
        start = cfg.until_epoch
    return resolved


class EpochSchedule:
    """A phase's batch, image size and crop scale per epoch, and learning rate per step.

    `steps_for(batch_size)` is the number of optimizer steps an epoch takes at that batch (the phase's own rule).
    Without stages the rate is `make_schedule`'s function of the step count, as it was before stages existed (the
    pinned results depend on it bit for bit); with stages it is a function of the fractional epoch, each step at
    the middle of its slice (as make_schedule), since steps per epoch change with the batch.
    """

    def __init__(self, stages: list[StageConfig], lr: LRConfig | None, *, epochs: int, batch_size: int,
                 batch_key: str, steps_for: Callable[[int], int]):
        self.stages = resolve_stages(stages, batch_size=batch_size, batch_key=batch_key, epochs=epochs)
        self.steps_for, self.staged = steps_for, bool(stages)
        self._by_step = None if stages else make_schedule(lr, epochs=epochs, steps_per_epoch=steps_for(batch_size))

    def stage(self, epoch: int) -> Stage:
        return next((s for s in self.stages if epoch < s.end_epoch), self.stages[-1])

    def steps(self, epoch: int) -> int:
        return self.steps_for(self.stage(epoch).batch_size)

    def lr(self, step: int, epoch: int, step_in_epoch: int) -> float:
        """The rate of optimizer step `step` of the phase, step `step_in_epoch` of epoch `epoch`."""
        if self._by_step is not None:
            return self._by_step(step)
        stage = self.stage(epoch)
        progress = (epoch - stage.start_epoch + (step_in_epoch + 0.5) / self.steps(epoch)) / (
            stage.end_epoch - stage.start_epoch)
        return stage.lr[0] + (stage.lr[1] - stage.lr[0]) * progress

    def describe(self, epoch: int, image_size: tuple[int, int]) -> dict:
        """The epoch's staged settings for its history row, with the training images' size (nothing for an
        unstaged phase)."""
        return {"batch_size": self.stage(epoch).batch_size, "image_size": image_size[0]} if self.staged else {}
