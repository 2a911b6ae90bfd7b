"""Phase 1: synchronized large-batch training until the training accuracy reaches τ (paper section 3).

All processes train one DDP model; the global batch B1 is split across processes (optionally as
several micro-batches per process with gradient accumulation, which on CPU is faster than one huge
batch). Training accuracy is accumulated on the device over the epoch and all-reduced once at its
end, so the stop decision is the same number on every rank: all ranks leave at the same step.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..checkpointing.resume import restore_optimizer
from ..data.sampling import AUGMENT, derive_seed, phase1_shard
from ..parallel.distributed import all_reduce_sum, all_true
from ..parallel.precision import LossScale
from ..recipe import Phase1Config
from .bn import bn_layers
from .loop import EpochLoop, LoopContext, LoopResult, require_finite
from .noise_scale import SLOTS, GradientNoise
from .schedules import EpochSchedule


@dataclass
class Phase1Result(LoopResult):
    reached_tau: bool = False


def warn_ghost_batchnorm(recipe, module: torch.nn.Module, num_processes: int, accelerator: Accelerator) -> None:
    """Micro-batches are not only a speed knob. BatchNorm normalises over each micro-batch, so a
    "large-batch" phase 1 with micro-batches of 128 gets small-batch BN noise (ghost BatchNorm)."""
    per_process = recipe.phase1.global_batch_size // num_processes
    micro = recipe.phase1.micro_batch_size
    if micro and micro < per_process and bn_layers(module):
        accelerator.print(f"note: phase1.micro_batch_size={micro} < the per-process batch {per_process}: BatchNorm "
                          f"normalises over {micro} samples (ghost BatchNorm), not {per_process}; unset it for "
                          "large-batch BatchNorm statistics (a baseline meant to be large-batch should)", flush=True)


def train_phase1(
    ctx: LoopContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Phase1Config,
    *,
    tau: float | None,
    resume: Path | None = None,
    noise: GradientNoise | None = None,
) -> Phase1Result:
    """Train phase 1 on every process: `model` is the data-parallel model, `optimizer` its optimizer; stop at the
    end of the first epoch whose training accuracy reaches `tau` (None: the whole budget). `resume` is a phase-1
    checkpoint to continue from; `noise` measures the gradient noise scale for the transition search."""
    accelerator, source, seed, log, ckpt = ctx.accelerator, ctx.source, ctx.seed, ctx.log, ctx.ckpt
    p, rank = accelerator.num_processes, accelerator.process_index
    # Batch, image size and learning rate per epoch (one stage, or the recipe's stages); the tail that does not fill
    # a global batch is dropped, so an epoch has n // B steps, >= 1 (Recipe.check_data).
    schedule = EpochSchedule(cfg.stages, cfg.lr, epochs=cfg.max_epochs, batch_size=cfg.global_batch_size,
                             batch_key="global_batch_size", steps_for=lambda batch: source.num_samples // batch)
    augment_gen = torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, AUGMENT, 1, rank))
    random.seed(derive_seed(seed, AUGMENT, 1, rank))  # timm's streaming transforms draw from Python's RNG
    # fp16: Accelerate's scaler, which its backward and its prepared optimizer's step already apply.
    loss_scale = LossScale(accelerator.scaler, accelerate_steps=True)
    result = Phase1Result()
    if resume is not None:
        restore_optimizer(resume, accelerator.unwrap_model(model), optimizer, loss_scale)
    # Totals: the epoch's sums, then the gradient-noise sums, which DDP's comm hook fills through a view.
    loop = EpochLoop(result, ctx, epochs=cfg.max_epochs, totals_size=6, generator=augment_gen, resume=resume,
                     state_file=f"rank{rank}.pt", what="phase 1", lr_key=cfg.lr_key("phase1"))
    # Every rank must checkpoint at the same step: by steps (minutes turned into steps by `calibrate`), not clocks.
    loop.begin(by_clock=False)
    model.train()
    for epoch in loop.epochs():
        done, totals, stage = loop.done, loop.totals, schedule.stage(epoch)
        global_batch, steps_per_epoch = stage.batch_size, schedule.steps(epoch)
        per_process = global_batch // p
        micro = cfg.micro_batch_size or per_process
        accumulation = per_process // micro
        order = phase1_shard(source.num_samples, seed=seed, epoch=epoch, global_batch=global_batch, rank=rank,
                             num_processes=p)
        data = source.for_stage(stage.image_size, stage.min_scale, stage.read_resized)
        batches = data.batches(
            order[done * per_process :], micro, augment=True, generator=augment_gen, epoch=epoch)
        # A checkpoint from before the noise sums resumes its epoch with them from this launch's steps only.
        resumed_old = epoch == loop.first_epoch and (loop.resumed_totals_size or 6) < 6
        noise_steps = steps_per_epoch - done if resumed_old else steps_per_epoch
        if noise is not None:
            noise.sums = totals.tensor[SLOTS]
        for i in log.steps(range(done, steps_per_epoch), phase=1, epoch=epoch, epochs=cfg.max_epochs,
                           total=steps_per_epoch):
            lr = schedule.lr(result.steps, epoch, i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for k in range(accumulation):
                x, y = next(batches)
                # Only the last micro-batch all-reduces gradients; the others accumulate locally.
                sync = contextlib.nullcontext() if k == accumulation - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=ctx.optimizer.label_smoothing)
                    accelerator.backward(loss / accumulation)
                totals.add(loss, logits, y)
            if noise is not None:
                noise.add_reduced(model)
            loss_scale.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if loop.step_done():  # a checkpoint is due
                loop.stamp(loss_scale)
                require_finite(model, f"phase 1 step {result.steps}", ckpt,
                               agree=lambda finite: all_true(finite, accelerator))
                ckpt.save_phase1(accelerator.unwrap_model(model), optimizer, loss_scale, result, epoch=epoch,
                                 step_in_epoch=i + 1, totals=totals.tensor, generator=augment_gen)
        totals.tensor[totals.SECONDS] = loop.epoch_seconds()
        loss_sum, correct, count, rank_seconds, *noise_sums = all_reduce_sum(totals.tensor, accelerator).tolist()
        # The same mean step time on every rank, so "every N minutes" picks the same step everywhere.
        ckpt.calibrate(rank_seconds / p / max(1, steps_per_epoch - done))
        loop.end_epoch(epoch, loss_sum, correct, count)
        seconds = loop.epoch_seconds()
        row = {"phase": 1, "epoch": result.epochs, "step": result.steps,
               "lr": schedule.lr(result.steps - 1, epoch, steps_per_epoch - 1),
               **schedule.describe(epoch, data.image_size),
               "train_loss": result.train_loss, "train_acc": result.train_acc, "images_per_s": count / seconds,
               "seconds": seconds}
        if noise is not None:  # B_simple as a guide to the phase-1 batch size
            row["noise_scale"] = noise.epoch_estimate(noise_sums, noise_steps, p, global_batch)
        result.history.append(row)
        # The transition search (`swap_accel transition`): the weights phase 2 would start from, had τ been each
        # candidate crossed, with this epoch's row. Off the clock like monitoring: writing them is the search's
        # cost, not phase 1's for a higher τ. Only at the epoch that first reaches each candidate.
        reached = [c for c in cfg.save_at_train_accuracy
                   if result.train_acc >= c and all(h["train_acc"] < c for h in result.history[:-1])]
        if reached:
            loop.stamp(loss_scale)
            with loop.off_clock():
                for candidate in reached:
                    ckpt.save_transition_point(accelerator.unwrap_model(model), result, candidate)
        loop.log(row)
        # τ is a fraction of the last epoch's training accuracy, identical on every rank after the all-reduce.
        if tau is not None and result.train_acc >= tau:
            result.reached_tau = True
            break
    loop.stamp(loss_scale)
    return result
