"""Greedy soup of workers (Wortsman et al. 2022, "Model soups", the greedy recipe); phase3.py scores every
candidate average with phase 3's exact BatchNorm recomputation and an evaluation spread over all processes.

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

import torch

from ..parallel.distributed import load_flat_state_


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
