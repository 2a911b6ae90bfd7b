"""Phase 2: every process refines its own copy, small batch, lower LR, own order (paper section 3).

The worker trains the *unwrapped* module with a fresh optimizer: the DDP wrapper is bypassed, so no
gradient all-reduce happens and no BN buffers are broadcast (inside `no_sync` DDP's forward still
broadcasts buffers from rank 0, measured; `no_sync` alone is not enough). Each worker draws its
own permutation of the whole training set every epoch. No collective of any kind is called; the
collective counter in `distributed` proves it for every run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .data import DataSource
from .phase1 import TrainingDiverged
from .recipe import OptimizerConfig, Phase2Config
from .sampling import AUGMENT, derive_seed, digest, worker_order
from .schedules import make_schedule


@dataclass
class Phase2Result:
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    train_acc: float = 0.0
    train_loss: float = 0.0
    samples_per_epoch: list[int] = field(default_factory=list)
    order_digests: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def make_sgd(module: torch.nn.Module, opt_cfg: OptimizerConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=opt_cfg.momentum,
                           nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0, weight_decay=opt_cfg.weight_decay)


def train_phase2(
    module: torch.nn.Module,
    source: DataSource,
    cfg: Phase2Config,
    opt_cfg: OptimizerConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    worker: int,
    log,
) -> Phase2Result:
    optimizer = make_sgd(module, opt_cfg, cfg.lr.peak)
    steps_per_epoch = math.ceil(source.num_samples / cfg.per_worker_batch_size)
    lr_at = make_schedule(cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    augment_gen = torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, AUGMENT, 2, worker))
    result = Phase2Result()
    module.train()
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        order = worker_order(source.num_samples, seed=seed, worker=worker, epoch=epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        batches = source.batches(order, cfg.per_worker_batch_size, augment=True, generator=augment_gen)
        for x, y in log.steps(batches, phase=2, epoch=epoch, epochs=cfg.epochs, total=steps_per_epoch):
            lr = lr_at(result.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.autocast():
                logits = module(x)
                loss = F.cross_entropy(logits, y, label_smoothing=opt_cfg.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            totals[0] += loss.detach() * y.numel()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.numel()
        loss_sum, correct, count = totals.tolist()
        result.epochs = epoch + 1
        result.train_loss, result.train_acc = loss_sum / count, correct / count
        result.samples_per_epoch.append(int(count))
        result.order_digests.append(digest(order))
        if not math.isfinite(result.train_loss):
            raise TrainingDiverged(f"worker {worker}: phase 2 loss became {result.train_loss} by step {result.steps}; "
                               "lower phase2.lr.peak")
        seconds = time.perf_counter() - epoch_start
        row = {"phase": 2, "worker": worker, "epoch": result.epochs, "step": result.steps, "lr": lr,
               "train_loss": result.train_loss, "train_acc": result.train_acc, "images_per_s": count / seconds,
               "seconds": seconds}
        result.history.append(row)
        log(row)
    result.seconds = time.perf_counter() - start
    return result

