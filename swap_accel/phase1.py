"""Phase 1: synchronized large-batch training until the training accuracy reaches τ (paper section 3).

All processes train one DDP model; the global batch B1 is split across processes (optionally as
several micro-batches per process with gradient accumulation, which on CPU is faster than one huge
batch). Training accuracy is accumulated on the device over the epoch and all-reduced once at its
end, so the stop decision is the same number on every rank: all ranks leave at the same step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .data import DataSource
from .distributed import all_reduce_sum
from .recipe import OptimizerConfig, Phase1Config
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
    history: list[dict] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    pass


def train_phase1(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: DataSource,
    cfg: Phase1Config,
    opt_cfg: OptimizerConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    log,
) -> Phase1Result:
    p, rank = accelerator.num_processes, accelerator.process_index
    per_process = cfg.global_batch_size // p
    micro = cfg.micro_batch_size or per_process
    accumulation = per_process // micro
    steps_per_epoch = source.num_samples // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"phase1.global_batch_size={cfg.global_batch_size} exceeds the {source.num_samples} training samples; "
            "lower it or use more data"
        )
    lr_at = make_schedule(cfg.lr, epochs=cfg.max_epochs, steps_per_epoch=steps_per_epoch)
    augment_gen = torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, AUGMENT, 1, rank))
    result = Phase1Result()
    model.train()
    start = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        epoch_start = time.perf_counter()
        order = phase1_shard(source.num_samples, seed=seed, epoch=epoch, global_batch=cfg.global_batch_size,
                             rank=rank, num_processes=p)
        batches = source.batches(order, micro, augment=True, generator=augment_gen)
        # Sums stay on the device all epoch: no host sync per step.
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for _ in log.steps(range(steps_per_epoch), phase=1, epoch=epoch, epochs=cfg.max_epochs, total=steps_per_epoch):
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
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
        loss_sum, correct, count = all_reduce_sum(totals, accelerator).tolist()
        result.epochs = epoch + 1
        result.train_loss, result.train_acc = loss_sum / count, correct / count
        if not torch.isfinite(torch.tensor(result.train_loss)):
            raise TrainingDiverged(
                f"phase 1 loss became {result.train_loss} by step {result.steps}; lower phase1.lr.peak")
        seconds = time.perf_counter() - epoch_start
        row = {"phase": 1, "epoch": result.epochs, "step": result.steps, "lr": lr, "train_loss": result.train_loss,
               "train_acc": result.train_acc, "images_per_s": count / seconds, "seconds": seconds}
        result.history.append(row)
        log(row)
        # τ is a fraction of the last epoch's training accuracy, identical on every rank after the all-reduce.
        if cfg.stop_train_accuracy is not None and result.train_acc >= cfg.stop_train_accuracy:
            result.reached_tau = True
            break
    result.seconds = time.perf_counter() - start
    return result
