"""Sample orders: which indices each process visits, in which order, in each phase.

Kept as pure functions of (seed, rank/worker, epoch) so tests and resumed runs can recompute
exactly the order a run used.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (e.g. seed, purpose, worker, epoch)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


# Purposes keep the streams of different uses independent.
PHASE1, PHASE2, BN, AUGMENT = 1, 2, 3, 4
# The global RNG (dropout, drop-path) of a phase-2 worker: its own stream, and the same whether phase 1
# ran in this process or came from a checkpoint.
WORKER_RNG = 5


def phase1_shard(n: int, *, seed: int, epoch: int, global_batch: int, rank: int, num_processes: int) -> torch.Tensor:
    """This rank's indices for one phase-1 epoch, in step order.

    All ranks draw the same permutation and step s uses its s-th block of `global_batch` samples,
    rank r taking the r-th slice of that block (data-parallel, paper section 3). The tail that does
    not fill a global batch is dropped so every rank takes the same number of equal-sized steps;
    it differs every epoch, so no sample is systematically skipped.
    """
    steps = n // global_batch
    per_process = global_batch // num_processes
    perm = _permutation(n, derive_seed(seed, PHASE1, epoch))[: steps * global_batch]
    return perm.view(steps, num_processes, per_process)[:, rank].reshape(-1)


def worker_order(n: int, *, seed: int, worker: int, epoch: int) -> torch.Tensor:
    """A worker's own random order over the *whole* training set for one phase-2 epoch (paper
    section 3: "each worker ... performs training using all the data, but sampling in different
    random order")."""
    return _permutation(n, derive_seed(seed, PHASE2, worker, epoch))


def worker_blocks(n: int, *, batch_size: int, members: int) -> list[int]:
    """How many samples each step of a worker's epoch takes, over all `members` processes of its group.

    Blocks of `batch_size`; the last one is partial. In a group, a tail that cannot give every member two samples
    joins the block before it: no member may skip a step (the group's gradient all-reduce needs all of them), and
    BatchNorm in training mode needs more than one value per channel (BatchNorm1d raises on a one-sample slice).
    One member is plain batching, the last batch as it falls.
    """
    if n < members:
        raise ValueError(f"{n} samples cannot be shared by {members} processes of one worker")
    full, tail = divmod(n, batch_size)
    blocks = [batch_size] * full
    if tail and (members == 1 or tail >= 2 * members or not blocks):
        blocks.append(tail)
    elif tail:
        blocks[-1] += tail
    return blocks


def worker_shard(order: torch.Tensor, *, batch_size: int, member: int, members: int) -> tuple[torch.Tensor, list[int]]:
    """A group member's part of its worker's epoch order: (indices in step order, samples per step).

    Step s takes the s-th block of the worker's order (`worker_blocks`) and member j the j-th of `members`
    near-equal slices of it, so the group visits every sample once per epoch. With one member this is plain
    batching.
    """
    blocks = worker_blocks(order.numel(), batch_size=batch_size, members=members)
    parts = [block.tensor_split(members)[member] for block in order.split(blocks)]
    return torch.cat(parts), [p.numel() for p in parts]


def shard_loss_weights(n: int, *, batch_size: int, member: int, members: int) -> list[float]:
    """Per step, the factor on member `member`'s mean loss that makes the group's averaged gradient the mean over
    the whole block: members x (its samples) / (the block's samples).

    The group's all-reduce averages the members' gradients with equal weight; unequal slices (a partial last
    block, or a batch that does not divide by the members) would otherwise weigh a sample of a small slice more
    than one of a large slice. Equal slices give exactly 1.0, so those steps are unchanged bit for bit.
    """
    blocks = worker_blocks(n, batch_size=batch_size, members=members)
    # torch.tensor_split gives the first (block % members) slices one sample more.
    return [members * (block // members + (member < block % members)) / block for block in blocks]


def bn_order(n: int, *, seed: int, samples: int | None) -> torch.Tensor:
    """The samples (in batch order) used to recompute BatchNorm statistics after averaging."""
    return _permutation(n, derive_seed(seed, BN))[: samples or n]


def bn_shard(order: torch.Tensor, *, batch_size: int, rank: int, num_processes: int) -> torch.Tensor:
    """Batches i ≡ rank (mod P) of `order`, concatenated. Re-splitting the result by `batch_size`
    gives exactly those batches (only the globally last batch can be partial, and it stays last),
    so the sharded pass sees the same batches as a single process would."""
    batches = order.split(batch_size)
    mine = batches[rank::num_processes]
    return torch.cat(mine) if mine else order[:0]


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
