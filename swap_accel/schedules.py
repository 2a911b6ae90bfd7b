"""Learning-rate schedules as pure functions of the step (paper Fig. 1, Tables 5-6).

Phase 1 warms up linearly to its peak and decays toward zero over `max_epochs`; stopping early at
τ leaves the decay unfinished, as in the paper. Phase 2 starts at its own (lower) peak and decays
to zero over its epochs. `start_epoch` enters a schedule part-way (ImageNet, paper section 5.2). `cycles`
repeats the whole schedule in equal cycles: SWA's cyclic learning rate (issue 11, paper Figure 6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .recipe import LRConfig


def lr_at_epoch(epoch: float, *, peak: float, warmup_epochs: float, total_epochs: float, shape: str) -> float:
    """Learning rate at a (fractional) epoch of a warm-up-then-decay schedule of `total_epochs`."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    decay_epochs = total_epochs - warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / decay_epochs) if decay_epochs > 0 else 1.0
    if shape == "constant":  # SWA-style (Izmailov et al. 2018): workers keep exploring, the average denoises
        return peak
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

    def lr_at(step: int) -> float:
        epoch = cfg.start_epoch + (step + 0.5) / steps_per_epoch
        if cfg.cycles > 1:  # each cycle restarts the schedule (one cycle: the epoch as it is, bit for bit)
            epoch -= cycle_epochs * math.floor(epoch / cycle_epochs)
        return lr_at_epoch(epoch, peak=cfg.peak, warmup_epochs=cfg.warmup_epochs, total_epochs=cycle_epochs,
                           shape=cfg.shape)

    return lr_at
