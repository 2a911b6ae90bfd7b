"""Exact BatchNorm recalibration after averaging (paper Algorithm 1, phase 3).

Averaged weights need new BN statistics. torch's `update_bn` averages per-batch means and
*per-batch unbiased variances*, which is not the variance over the whole pass unless every batch
has the same size and mean. We accumulate, per BN layer, the count, sum and sum of squares of its
inputs (float64) over a train-mode pass, shard the batches across processes, and combine with one
flattened all-reduce: the result equals one process doing the same pass over the same batches.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.sampling import bn_order, bn_shard
from ..data.sources import DataSource
from ..parallel.distributed import all_reduce_sum


def bn_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn_(
    module: nn.Module,
    source: DataSource,
    accelerator: Accelerator,
    *,
    samples: int | None,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] | None = None,
    group=None,
) -> dict:
    """Set every BN layer's running mean/variance to the statistics of its inputs over a pass.

    The pass is shared by all processes by default. `shard=(member, members)` shares it among one worker's
    processes only (every worker gets the same recalibration as the averaged model): summed inside
    `group`, or on this process alone, with no collective, when `members` is 1."""
    layers = bn_layers(module)
    if not layers:
        return {"layers": 0, "samples": 0}
    sums = [torch.zeros(2 * m.num_features + 1, dtype=torch.float64, device=accelerator.device) for m in layers]

    def hook(index: int):
        def accumulate(bn: _BatchNorm, inputs: tuple[torch.Tensor]) -> None:
            x = inputs[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            mean, var = mean.double(), var.double()
            c = bn.num_features
            sums[index][:c] += n * mean
            sums[index][c : 2 * c] += n * (var + mean * mean)
            sums[index][-1] += n

        return accumulate

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = module.training
    module.train()
    try:
        order = bn_order(source.num_samples, seed=seed, samples=samples)
        index, count = shard or (accelerator.process_index, accelerator.num_processes)
        mine = bn_shard(order, batch_size=batch_size, rank=index, num_processes=count)
        for x, _ in source.batches(mine, batch_size, augment=False, generator=None):
            with accelerator.autocast():
                module(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)

    flat = torch.cat(sums)
    if shard is None or shard[1] > 1:
        all_reduce_sum(flat, accelerator, group)
    offset = 0
    for m in layers:
        c = m.num_features
        s1, s2, n = flat[offset : offset + c], flat[offset + c : offset + 2 * c], flat[offset + 2 * c]
        offset += 2 * c + 1
        mean = s1 / n
        # Stored variance is unbiased, as BatchNorm itself stores it.
        var = (s2 / n - mean * mean).clamp_min(0) * n / (n - 1)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(len(order.split(batch_size)))
    return {"layers": len(layers), "samples": len(order)}
