"""Test accuracy: of the shared model, sharded across processes, and of one worker's own model.

The shared (phase-1 or averaged) model is evaluated in shards with Accelerate's prepared loader and
`gather_for_metrics`, which drops the padding of the last uneven shard, so exactly len(test set)
samples count. A phase-2 worker's model exists on one process only, so it is evaluated there over
the whole test set with no communication ("each worker's own model before averaging"); a worker
that is a group of processes splits the test set among its members and sums inside its group.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn

from ..data.sources import DataSource
from ..parallel.distributed import all_reduce_sum
from .bn import recalibrate_bn_


@torch.no_grad()
def evaluate_shared(module: nn.Module, loader, accelerator: Accelerator) -> tuple[float, int]:
    """(accuracy, samples counted) of a model that is identical on every process."""
    module.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    counted = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for x, y in loader:
        with accelerator.autocast():
            preds = module(x).argmax(1)
        # One gather per batch of the per-sample hits (not of predictions and labels, two gathers).
        hits = accelerator.gather_for_metrics((preds == y).to(torch.uint8))
        correct += hits.sum()
        counted += hits.numel()
    module.train()
    return correct.item() / max(counted.item(), 1), int(counted.item())


@torch.no_grad()
def evaluate_local(module: nn.Module, source: DataSource, batch_size: int, accelerator: Accelerator,
                   group=None, member: int = 0, members: int = 1, order: torch.Tensor | None = None) -> float:
    """Accuracy of one worker's model over the whole test set (or the samples `order`): on this process alone
    (no collectives), or split over the `members` processes of its worker `group`, one sum inside the group."""
    module.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    order = torch.arange(source.num_samples) if order is None else order
    for x, y in source.batches(order.tensor_split(members)[member], batch_size, augment=False, generator=None):
        with accelerator.autocast():
            correct += (module(x).argmax(1) == y).sum()
    module.train()
    if group is not None:
        all_reduce_sum(correct, accelerator, group)
    return correct.item() / len(order)


@torch.no_grad()
def evaluate_recalibrated(module: nn.Module, recipe, train_data: DataSource, test_data: DataSource, accelerator,
                          *, loader=None, group=None, member: int = 0, members: int = 1) -> float:
    """Test accuracy after the very BN recalibration phase 3 gives the averaged model (same samples, no
    augmentation), in a scratch copy: a worker or a baseline keeps its own statistics, and "after - before"
    then measures averaging alone. With `loader` the model is shared by all processes (a baseline);
    otherwise it is one worker's, on its process or its group, with no collective between workers."""
    scratch = copy.deepcopy(module)
    shard = None if loader is not None else (member, members)
    recalibrate_bn_(scratch, train_data, accelerator, samples=recipe.eval.bn_samples,
                    batch_size=recipe.eval.bn_batch_size, seed=recipe.seed, shard=shard, group=group)
    if loader is not None:
        return evaluate_shared(scratch, loader, accelerator)[0]
    return evaluate_local(scratch, test_data, recipe.eval.batch_size, accelerator, group, member, members)
