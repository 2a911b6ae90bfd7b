"""Phase 2: one worker refines its own copy, small batch, lower LR, own order (paper section 3).

A worker is one process, or a group of processes. A one-process worker trains the *unwrapped*
module with a fresh optimizer: the phase-1 DDP wrapper is bypassed, so no gradient all-reduce happens
and no BN buffers are broadcast (inside `no_sync` DDP's forward still broadcasts buffers from rank 0,
measured; `no_sync` alone is not enough). A group trains data-parallel on its own process group: its
gradients are all-reduced inside the group only. Each worker draws its own permutation of the whole
training set every epoch (a group shards it among its members). Nothing crosses between workers; the
collective counter in `distributed` proves it for every run (`phase2` = 0, `phase2_in_group` apart).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpointing.resume import restore_optimizer
from ..checkpointing.snapshots import CycleSamples
from ..data.sampling import (
    AUGMENT,
    WORKER_RNG,
    derive_seed,
    digest,
    shard_loss_weights,
    worker_blocks,
    worker_order,
    worker_shard,
)
from ..parallel.distributed import all_reduce_sum, all_true, broadcast_buffers_
from ..parallel.precision import LossScale, new_scaler
from ..recipe import Phase2Config
from ..topology import Seat
from .loop import EpochLoop, LoopContext, LoopResult, make_sgd, require_finite
from .schedules import EpochSchedule


@dataclass
class Phase2Result(LoopResult):
    samples_per_epoch: list[int] = field(default_factory=list)
    order_digests: list[str] = field(default_factory=list)


def _member_seed(seed: int, purpose: int, *keys: int, member: int) -> int:
    # A group's member 0 uses the one-process worker's stream, so W = P runs stay bitwise what they were.
    return derive_seed(seed, purpose, *keys) if member == 0 else derive_seed(seed, purpose, *keys, member)


def train_phase2(
    ctx: LoopContext,
    model: torch.nn.Module,
    module: torch.nn.Module,
    cfg: Phase2Config,
    *,
    worker: int,
    samples: CycleSamples,
    resume: Path | None = None,
    seat: Seat = Seat(),
) -> Phase2Result:
    """Train worker `worker` from the weights in `module`. `model` is `module` itself, or its data-parallel
    wrapper on the worker's process group, in which this process has its `seat`. `samples` takes the models at the
    ends of the sampled LR cycles into its running sum (paper section 5.3). `resume` is the worker's checkpoint to
    continue from."""
    accelerator, source, seed = ctx.accelerator, ctx.source, ctx.seed
    opt_cfg, log, ckpt = ctx.optimizer, ctx.log, ctx.ckpt
    group, member, members = seat.group, seat.member, seat.members
    # fp16: a scaler per worker, as every optimizer needs its own; None otherwise.
    loss_scale = LossScale(new_scaler(accelerator))
    optimizer = make_sgd(module.parameters(), opt_cfg, cfg.first_lr, device=accelerator.device,
                         fp16=loss_scale.scaler is not None)
    n = source.num_samples
    schedule = EpochSchedule(cfg.stages, cfg.lr, epochs=cfg.epochs, batch_size=cfg.per_worker_batch_size,
                             batch_key="per_worker_batch_size",
                             steps_for=lambda batch: len(worker_blocks(n, batch_size=batch, members=members)))
    augment_gen = torch.Generator(device=accelerator.device).manual_seed(
        _member_seed(seed, AUGMENT, 2, worker, member=member))
    torch.manual_seed(_member_seed(seed, WORKER_RNG, worker, member=member))
    random.seed(_member_seed(seed, WORKER_RNG, worker, member=member))  # timm's streaming transforms use it
    result = Phase2Result()
    if resume is not None:
        restore_optimizer(resume, module, optimizer, loss_scale)
    loop = EpochLoop(result, ctx, epochs=cfg.epochs, totals_size=4, generator=augment_gen, resume=resume,
                     state_file=f"member{member}.pt", what=f"worker {worker}: phase 2", lr_key=cfg.lr_key("phase2"))
    if resume is not None:
        samples.restore(loop.first_epoch, module, accelerator.device)  # the cycles finished before the stop
    # A one-process worker checkpoints by its own clock; a group's members must pick the same step (phase 1's way).
    loop.begin(by_clock=members == 1)
    model.train()
    for epoch in loop.epochs():
        done, totals, stage = loop.done, loop.totals, schedule.stage(epoch)
        first_step, steps_per_epoch = result.steps - done, schedule.steps(epoch)
        order = worker_order(n, seed=seed, worker=worker, epoch=epoch)
        shard, sizes = worker_shard(order, batch_size=stage.batch_size, member=member, members=members)
        # Every sample of a worker's step weighs the same, whichever member's slice it is in (unequal slices at an
        # epoch's tail): each member's mean loss is scaled by its share before the group averages the gradients.
        loss_weights = shard_loss_weights(n, batch_size=stage.batch_size, member=member, members=members)
        data = source.for_stage(stage.image_size, stage.min_scale, stage.read_resized)
        batches = data.batches(
            shard[sum(sizes[:done]):], sizes[done:], augment=True, generator=augment_gen, epoch=epoch)
        for x, y in log.steps(batches, phase=2, epoch=epoch, epochs=cfg.epochs, total=steps_per_epoch):
            lr = schedule.lr(result.steps, epoch, result.steps - first_step)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            weight = loss_weights[result.steps - first_step]
            with accelerator.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=opt_cfg.label_smoothing)
            loss_scale.backward(loss if weight == 1.0 else loss * weight)
            loss_scale.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            due = loop.step_done()
            totals.add(loss, logits, y)
            if due:
                loop.stamp(loss_scale)
                require_finite(module, f"worker {worker}: phase 2 step {result.steps}", ckpt, totals.tensor,
                               agree=(lambda finite: all_true(finite, accelerator, group)) if group else bool)
                ckpt.save_phase2(module, optimizer, loss_scale, result, worker=worker, epoch=epoch,
                                 step_in_epoch=result.steps - first_step, totals=totals.tensor,
                                 generator=augment_gen, seat=seat)
        totals.tensor[totals.SECONDS] = loop.epoch_seconds()
        if group is not None:  # the worker's epoch numbers, over all its members' shards
            all_reduce_sum(totals.tensor, accelerator, group)
            ckpt.calibrate(totals.tensor[totals.SECONDS].item() / members / max(1, steps_per_epoch - done))
        loss_sum, correct, count, _ = totals.tensor.tolist()
        loop.end_epoch(epoch, loss_sum, correct, count)
        result.samples_per_epoch.append(int(count))
        result.order_digests.append(digest(order))
        if group is not None:
            # Members' BN running statistics saw different shards; from here on (evaluation, the saved worker)
            # the worker's statistics are its leader's. Training-mode forwards never read them, so a resume,
            # which restores the leader's, trains bit for bit as the uninterrupted run.
            broadcast_buffers_(module, accelerator, group)
        samples.take(module, epoch, ckpt, result.steps)
        seconds = loop.epoch_seconds()
        row = {"phase": 2, "worker": worker, "epoch": result.epochs, "step": result.steps,
               "lr": schedule.lr(result.steps - 1, epoch, steps_per_epoch - 1),
               **schedule.describe(epoch, data.image_size),
               "train_loss": result.train_loss, "train_acc": result.train_acc,
               "images_per_s": count / seconds, "seconds": seconds}
        result.history.append(row)
        loop.log(row)
    loop.stamp(loss_scale)
    return result
