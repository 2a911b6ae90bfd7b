"""Phase 3 (paper Algorithm 1, last step): average the models phase 2 produced and recompute BatchNorm statistics.

One implementation for `train` (each process holds the running sum of the workers it leads; one all-reduce) and
`swap_accel average` (checkpoints summed in memory), so averaging a finished run afterwards gives what train's
phase 3 gave: the same sum, the same division, the same BN recomputation (same samples, same seed).
- uniform (default): every model (the W workers, or their W x S cyclic samples, paper section 5.3) with weight
  1 / (W x S), then BN statistics recomputed exactly over a pass of training data.
- greedy: soup.py's greedy soup on held-out data, every candidate average BN-recomputed as above.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from ..parallel.distributed import all_reduce_sum, load_flat_state_
from .bn import recalibrate_bn_
from .evaluate import evaluate_shared
from .soup import greedy_soup


@dataclass
class Phase3Result:
    selection: dict       # which models were averaged: {"method", "kept", "models", ...}
    bn: dict              # the BN recomputation's summary (of the final model)
    averaged_values: int  # floating-point values per model that were averaged (parameters and BN buffers)
    seconds: float

    def summary(self) -> dict:
        return {"seconds": self.seconds, "averaged_values": self.averaged_values,
                "averaged_models": len(self.selection["models"]), "bn": self.bn, "selection": self.selection}


@torch.no_grad()
def average_workers_(module: torch.nn.Module, local_sum: torch.Tensor, workers: int, accelerator: Accelerator) -> int:
    """Set every floating-point parameter and buffer of `module` to the mean of the W workers' (paper Algorithm 1,
    phase 3), or of their W x S cyclic samples (`workers` is then the number of models, W x S).

    `local_sum` is the sum of the workers this process leads (`flat_state` of each; zeros on a group's
    other members, so every worker counts once, each with equal weight). One flattened all-reduce
    instead of one per tensor: a constant number of collectives whatever the architecture. With
    one worker per process this is exactly the old (a + b) / 2. Returns the number of averaged values.
    """
    load_flat_state_(module, all_reduce_sum(local_sum, accelerator).div_(workers))
    return local_sum.numel()


@torch.no_grad()
def run_phase3(module: torch.nn.Module, recipe, train_data, accelerator: Accelerator, *, models: list[str],
               average: Callable[[], int], states: Callable[[], list[torch.Tensor]], holdout_loader) -> Phase3Result:
    """Leave `module` holding the averaged model with recomputed BN statistics.

    `models` names the W x S models; `average()` sets `module` to their uniform mean and returns the number of
    averaged values; `states()` gives each model's `flat_state` (read only for the greedy soup, which needs every
    model, not only the sum); `holdout_loader` is the held-out split the soup is chosen on."""
    start = time.perf_counter()

    def recalibrate() -> dict:
        return recalibrate_bn_(module, train_data, accelerator, samples=recipe.eval.bn_samples,
                               batch_size=recipe.eval.bn_batch_size, seed=recipe.seed)

    if recipe.phase3.selection == "greedy":  # a model joins only if it does not hurt held-out accuracy
        flats, bn = states(), {}

        def score() -> float:  # every candidate gets phase 3's BN recomputation, then a sharded evaluation
            bn.update(recalibrate())
            return evaluate_shared(module, holdout_loader, accelerator)[0]

        selection = greedy_soup(module, flats, score, recipe.phase3.greedy_tolerance)
        averaged = flats[0].numel()
    else:
        averaged = average()
        bn = recalibrate()
        selection = {"method": "uniform", "kept": list(range(len(models)))}
    selection["models"] = models
    return Phase3Result(selection, bn, averaged, time.perf_counter() - start)
