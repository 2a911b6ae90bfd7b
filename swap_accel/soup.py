"""Greedy soup of workers (Wortsman et al. 2022, "Model soups", the greedy recipe), with phase 3's exact
BatchNorm recomputation for every candidate average and its evaluation spread over all processes.

Phase 3 averages every worker with equal weight, so one worker that went wrong (a diverging learning rate, a bad
node) drags the average down. Greedy selection orders the models (the W workers, or their W x S cyclic samples:
snapshots.py) by their own held-out accuracy and adds each, best first, only if the average with it does at least as
well on the held-out split (`data.holdout_samples`: images of the training split no worker trained on; never the
test set). The kept models are then averaged with equal weight. Every process computes the same sequence: the
weights are read from the workers' checkpoints (or are already in memory, for `swap_accel average`), BN statistics
are recomputed over all processes and the held-out accuracy is one sharded evaluation, so all ranks take each
decision from the same all-reduced number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .bn import recalibrate_bn_
from .distributed import load_flat_state_
from .evaluate import evaluate_shared
from .snapshots import load_flat, sample_dirs


@torch.no_grad()
def greedy_soup(module: torch.nn.Module, flats: list[torch.Tensor], score: Callable[[], float],
                tolerance: float = 0.0) -> dict:
    """Leave `module` holding the greedy soup of the models' `flat_state` vectors, BN recomputed by `score`.

    `score()` recomputes BN statistics of `module` as phase 3 does and returns its held-out accuracy. Returns which
    models were kept (indices into `flats`), each one's own held-out accuracy, and the held-out curve of the
    candidate averages in the order they were tried."""
    individual = []
    for flat in flats:
        load_flat_state_(module, flat)
        individual.append(score())
    order = sorted(range(len(flats)), key=lambda k: (-individual[k], k))
    kept, total, best = [order[0]], flats[order[0]].clone(), individual[order[0]]
    curve = [{"model": order[0], "holdout_acc": best, "kept": True}]
    for k in order[1:]:
        load_flat_state_(module, (total + flats[k]).div_(len(kept) + 1))
        acc = score()
        # Wortsman et al. (tolerance 0): keep an ingredient that does not hurt the held-out accuracy. The best so
        # far only rises, so a tolerance cannot let small losses add up.
        keep = acc >= best - tolerance
        curve.append({"model": k, "holdout_acc": acc, "kept": keep})
        if keep:
            kept.append(k)
            total.add_(flats[k])
            best = max(best, acc)
    load_flat_state_(module, total.div_(len(kept)))
    final = score()  # the soup's own BN statistics (the last candidate tried may have been rejected)
    return {"method": "greedy", "tolerance": tolerance, "kept": sorted(kept), "individual_holdout_acc": individual,
            "curve": curve, "holdout_acc": final}


def greedy_phase3(module: torch.nn.Module, states: list[torch.Tensor], recipe, train_data, holdout_loader,
                  accelerator) -> tuple[dict, dict]:
    """Phase 3 as a greedy soup (train.py and `swap_accel average`): every candidate gets phase 3's BN recomputation
    (same samples, same seed) and a held-out evaluation in shards. Returns (selection, the soup's BN summary)."""
    bn = {}

    def score() -> float:
        bn.update(recalibrate_bn_(module, train_data, accelerator, samples=recipe.eval.bn_samples,
                                  batch_size=recipe.eval.bn_batch_size, seed=recipe.seed))
        return evaluate_shared(module, holdout_loader, accelerator)[0]

    return greedy_soup(module, states, score, recipe.phase3.greedy_tolerance), bn


def finished_sample_states(run_dir: Path, workers: int, samples: int, module: torch.nn.Module,
                           device) -> list[torch.Tensor]:
    """The `flat_state` of every worker's every sample (W x S, worker-major; the last of a worker's is its
    p2-w<k>-end), read by every process from the checkpoints (the run directory is shared, as phase 1's checkpoints
    already require): each rank holds only the running sum of its own workers."""
    return [load_flat(path, module, device) for k in range(workers) for path in sample_dirs(run_dir, k, samples)]
