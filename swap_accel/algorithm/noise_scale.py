"""The gradient noise scale B_simple during phase 1, a guide to the phase-1 batch size.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A.1): B_simple = tr(Σ) / |G|²,
with G the true gradient and Σ the per-sample gradient covariance. Two unbiased estimates come free from
data-parallel training: each process's gradient over its own B_small samples (before the all-reduce) and the
all-reduced gradient over the global B_big = P · B_small. Since E|g_B|² = |G|² + tr(Σ)/B,

    |G|²   ≈ (B_big |g_big|² − B_small |g_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

Numerator and denominator are averaged over an epoch's steps (and the processes) before the ratio, as
k-diffusion's DDP gradient-noise hook and gpt-neox smooth them separately: the ratio of two noisy estimates
is biased, their averages are not. The local squared norm is taken inside DDP's comm hook, where the local
gradient exists just before the all-reduce (the hook runs in the backward pass, one bucket after another); the
averaged one after the backward from `.grad`, which then holds the all-reduced gradient (not in the all-reduce's
completion callbacks, which may run concurrently for different buckets and would race on one sum). Both accumulate
on the device (no host sync per step) into the slots of phase 1's epoch sums that the epoch's one all-reduce already
carries (phase1.py).
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

# Where the two sums live in phase 1's per-epoch `totals`: [loss, correct, count, seconds, local², global²].
SLOTS = slice(4, 6)
# What B_simple is here, carried by every estimate (results.json, transition.json) so that no number is read as more.
# Both norms are of the loss gradient DDP reduces: SGD adds weight decay (wd·θ) in its step, after both are taken,
# so |G|² is not the gradient of the regularised objective SGD descends (G + wd·θ). And with BatchNorm in training
# mode a sample's gradient depends on the rest of its (micro-)batch through the batch statistics: the B_small and
# B_big gradients are of BN-coupled batches, not sums of independent per-sample gradients, which the estimator's
# E|g_B|² = |G|² + tr(Σ)/B assumes.
SCOPE = ("loss gradient only: excludes weight decay (wd·θ, added by SGD's step); BatchNorm couples the samples of a "
         "batch through its statistics, so Σ is not an independent per-sample covariance")


def estimate(small_sq: float, big_sq: float, b_small: int, b_big: int) -> dict:
    """|G|², tr(Σ) and B_simple from mean squared gradient norms at batch sizes b_small < b_big."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    # |G|² can come out <= 0 when noise dominates an epoch's few steps: B_simple is then undefined, not huge.
    return {"grad_sq": g2, "trace_cov": trace, "b_simple": trace / g2 if g2 > 0 else None, "scope": SCOPE,
            # The measured inputs, so the estimate can be checked from what was measured.
            "small_sq": small_sq, "big_sq": big_sq, "b_small": b_small, "b_big": b_big}


class GradientNoise:
    """DDP comm hook state: the stock all-reduce (so the collective counter still sees it, counting.py), plus the
    squared norm of this process's gradient before it; `add_reduced` adds the all-reduced gradient's after the step's
    backward."""

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group
        self.sums: torch.Tensor | None = None  # a view into the current epoch's totals, set by phase 1

    @classmethod
    def attach(cls, model: torch.nn.Module) -> GradientNoise | None:
        """Register on a DDP model; None when it is not data-parallel over several processes."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or model.process_group.size() < 2:
            return None  # one process (also a one-process group, benchmarks/gpu_check.py): B_small = B_big
        noise = cls()
        model.register_comm_hook(noise, _hook)
        return noise

    def add_reduced(self, module: torch.nn.Module) -> None:
        """After a synchronised backward: the squared norm of the all-reduced gradient (what `.grad` now holds)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.sums[1] += torch.nn.utils.get_total_norm(grads, norm_type=2.0).double().square()

    def epoch_estimate(self, summed: list[float], steps: int, num_processes: int, global_batch: int) -> dict:
        """The epoch's estimate from the all-reduced sums (each rank added its local² and the same global²)."""
        local_sq, global_sq = (s / (steps * num_processes) for s in summed)
        return estimate(local_sq, global_sq, global_batch // num_processes, global_batch)


def _hook(state: GradientNoise, bucket):
    if state.sums is not None:  # before allreduce_hook divides the buffer in place
        state.sums[0] += torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float64).square()
    return allreduce_hook(state.process_group, bucket)
