"""Phase 1: synchronized large-batch training until the training accuracy reaches τ (paper section 3).

All processes train one DDP model; the global batch B1 is split across processes (optionally as
several micro-batches per process with gradient accumulation, which on CPU is faster than one huge
batch). Training accuracy is accumulated on the device over the epoch and all-reduced once at its
end, so the stop decision is the same number on every rank: all ranks leave at the same step.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .bn import bn_layers
from .data import DataSource
from .distributed import all_reduce_sum, all_true
from .noise_scale import SLOTS, GradientNoise
from .precision import LossScale
from .recipe import OptimizerConfig, Phase1Config
from .resume import Checkpointer, restore_loop, restore_optimizer
from .sampling import AUGMENT, derive_seed, phase1_shard
from .schedules import make_schedule


@dataclass
class Phase1Result:
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    train_acc: float = 0.0
    train_loss: float = 0.0
    reached_tau: bool = False
    loss_scale: dict | None = None  # fp16: the final scale, skipped steps and growths
    history: list[dict] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    pass


def require_finite(module: torch.nn.Module, where: str, ckpt: Checkpointer, totals: torch.Tensor | None = None,
                   agree=bool) -> None:
    """Never checkpoint diverged weights over good ones: one host sync, only when a checkpoint is due.

    `agree(finite)` makes the decision shared by every process that will meet at the checkpoint's barrier:
    BN statistics differ per rank, so one rank may see a NaN the others do not, and a rank that
    stopped alone would leave them waiting there."""
    # Parameters and BN running statistics: NaN statistics would poison evaluation and phase 3 just the same.
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if totals is not None:
        finite &= torch.isfinite(totals).all()
    if not agree(bool(finite)):
        kept = ckpt.last_good or "none was written yet"
        raise TrainingDiverged(f"{where}: the loss, weights or BN statistics became NaN/Inf; stopped there, the last "
                               f"good checkpoint is kept ({kept}); lower the learning rate and rerun with --overwrite")


def warn_ghost_batchnorm(recipe, module: torch.nn.Module, num_processes: int, accelerator: Accelerator) -> None:
    """Micro-batches are not only a speed knob. BatchNorm normalises over each micro-batch, so a
    "large-batch" phase 1 with micro-batches of 128 gets small-batch BN noise (ghost BatchNorm)."""
    per_process = recipe.phase1.global_batch_size // num_processes
    micro = recipe.phase1.micro_batch_size
    if micro and micro < per_process and bn_layers(module):
        accelerator.print(f"note: phase1.micro_batch_size={micro} < the per-process batch {per_process}: BatchNorm "
                          f"normalises over {micro} samples (ghost BatchNorm), not {per_process}; unset it for "
                          "large-batch BatchNorm statistics (a baseline meant to be large-batch should)", flush=True)


def log_off_clock(log, row: dict) -> float:
    """Run the epoch-end logging point; return its seconds, which the loops add to their start time: Table 1
    times leave out the monitoring at logging points, and so do the seconds a checkpoint stores and a resume
    continues."""
    logged = time.perf_counter()
    log(row)
    return time.perf_counter() - logged


def train_phase1(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: DataSource,
    cfg: Phase1Config,
    opt_cfg: OptimizerConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    tau: float | None,
    log,
    ckpt: Checkpointer,
    resume: Path | None = None,
    noise: GradientNoise | None = None,
) -> Phase1Result:
    p, rank = accelerator.num_processes, accelerator.process_index
    per_process = cfg.global_batch_size // p
    micro = cfg.micro_batch_size or per_process
    accumulation = per_process // micro
    steps_per_epoch = source.num_samples // cfg.global_batch_size  # >= 1: Recipe.check_data
    lr_at = make_schedule(cfg.lr, epochs=cfg.max_epochs, steps_per_epoch=steps_per_epoch)
    augment_gen = torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, AUGMENT, 1, rank))
    random.seed(derive_seed(seed, AUGMENT, 1, rank))  # timm's streaming transforms draw from Python's RNG
    # fp16: Accelerate's scaler, which its backward and its prepared optimizer's step already apply.
    loss_scale = LossScale(accelerator.scaler, accelerate_steps=True)
    result = Phase1Result()
    first_epoch, resumed_done, resumed_totals = 0, 0, None
    if resume is not None:  # continue exactly where the checkpoint stopped
        restore_optimizer(resume, accelerator.unwrap_model(model), optimizer, loss_scale)
        first_epoch, resumed_done, resumed_totals = restore_loop(
            resume, f"rank{rank}.pt", result, augment_gen, accelerator.device)
    ckpt.begin(result.steps, by_clock=False)
    model.train()
    start = time.perf_counter() - result.seconds
    for epoch in range(first_epoch, cfg.max_epochs):
        epoch_start = time.perf_counter()
        done = resumed_done if epoch == first_epoch else 0
        order = phase1_shard(source.num_samples, seed=seed, epoch=epoch, global_batch=cfg.global_batch_size,
                             rank=rank, num_processes=p)
        batches = source.batches(order[done * per_process :], micro, augment=True, generator=augment_gen)
        # Sums stay on the device all epoch: no host sync per step. [3] is this rank's epoch time, for `calibrate`;
        # [4:6] the gradient-noise sums (noise_scale.py), filled by DDP's comm hook through a view.
        totals = torch.zeros(6, dtype=torch.float64, device=accelerator.device)
        noise_steps = steps_per_epoch
        if epoch == first_epoch and resumed_totals is not None:
            totals[: resumed_totals.numel()] = resumed_totals
            if resumed_totals.numel() < totals.numel():  # a checkpoint from before the noise sums: this run's steps
                noise_steps = steps_per_epoch - done
        if noise is not None:
            noise.sums = totals[SLOTS]
        for i in log.steps(range(done, steps_per_epoch), phase=1, epoch=epoch, epochs=cfg.max_epochs,
                           total=steps_per_epoch):
            lr = lr_at(result.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for k in range(accumulation):
                x, y = next(batches)
                # Only the last micro-batch all-reduces gradients; the others accumulate locally.
                sync = contextlib.nullcontext() if k == accumulation - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=opt_cfg.label_smoothing)
                    accelerator.backward(loss / accumulation)
                totals[0] += loss.detach() * y.numel()
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += y.numel()
            if noise is not None:
                noise.add_reduced(model)
            loss_scale.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            if ckpt.due(result.steps):
                result.seconds, result.loss_scale = time.perf_counter() - start, loss_scale.summary()
                require_finite(model, f"phase 1 step {result.steps}", ckpt,
                               agree=lambda finite: all_true(finite, accelerator))
                ckpt.save_phase1(accelerator.unwrap_model(model), optimizer, loss_scale, result, epoch=epoch,
                                 step_in_epoch=i + 1, totals=totals, generator=augment_gen)
        totals[3] = time.perf_counter() - epoch_start
        loss_sum, correct, count, rank_seconds, *noise_sums = all_reduce_sum(totals, accelerator).tolist()
        # The same mean step time on every rank, so "every N minutes" picks the same step everywhere.
        ckpt.calibrate(rank_seconds / p / max(1, steps_per_epoch - done))
        result.epochs = epoch + 1
        result.train_loss, result.train_acc = loss_sum / count, correct / count
        if not torch.isfinite(torch.tensor(result.train_loss)):
            raise TrainingDiverged(
                f"phase 1 loss became {result.train_loss} by step {result.steps}; stopped there, the last good "
                f"checkpoint is kept ({ckpt.last_good or 'none was written yet'}); lower phase1.lr.peak and rerun "
                "with --overwrite")
        seconds = time.perf_counter() - epoch_start
        lr = lr_at(result.steps - 1)
        row = {"phase": 1, "epoch": result.epochs, "step": result.steps, "lr": lr, "train_loss": result.train_loss,
               "train_acc": result.train_acc, "images_per_s": count / seconds, "seconds": seconds}
        if noise is not None:  # B_simple as a guide to the phase-1 batch size
            row["noise_scale"] = noise.epoch_estimate(noise_sums, noise_steps, p, cfg.global_batch_size)
        result.history.append(row)
        # The transition search (`swap_accel transition`): the weights phase 2 would start from, had τ been each
        # candidate crossed.
        # Off the clock like monitoring: writing them is the search's cost, not phase 1's for a higher τ.
        # Only at the epoch that first reaches each candidate (the history holds the epochs before, resumed ones too).
        reached = [c for c in cfg.save_at_train_accuracy
                   if result.train_acc >= c and all(h["train_acc"] < c for h in result.history[:-1])]
        if reached:
            result.seconds, result.loss_scale = time.perf_counter() - start, loss_scale.summary()
            saving = time.perf_counter()
            for candidate in reached:
                ckpt.save_transition_point(accelerator.unwrap_model(model), result, candidate)
            start += time.perf_counter() - saving
        start += log_off_clock(log, row)
        # τ is a fraction of the last epoch's training accuracy, identical on every rank after the all-reduce.
        if tau is not None and result.train_acc >= tau:
            result.reached_tau = True
            break
    result.seconds, result.loss_scale = time.perf_counter() - start, loss_scale.summary()
    return result
