"""Several phase-2 workers of one process stepped at once: the engine for training workers side by side on one device.

Workers never exchange anything in phase 2 (paper section 3), so K workers' steps are K independent functions of
K weight sets and K batches. Trained in turn on one device (W > P), each small-batch step leaves a GPU mostly idle
and K workers cost K times one. Here the K workers' parameters, BatchNorm statistics and momentum are stacked along
a leading dimension and one `torch.func.vmap` of `functional_call` computes all K losses, so the device runs one
K-times-larger step. The sum of the K losses has worker k's gradient in slice k of every stacked parameter (no term
couples two workers), and SGD with momentum, Nesterov and weight decay is elementwise, so one optimizer over the
stacked tensors is K independent optimizers: the result equals training the workers in turn up to floating-point
rounding (tests/test_stacked.py checks it in float64).

A model that draws random numbers while training (dropout, drop-path) is refused: vmap's draws are not the ones
the same worker would draw trained alone.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..checkpointing.resume import restore_optimizer
from ..checkpointing.snapshots import CycleSamples
from ..data.sampling import AUGMENT, derive_seed, digest, worker_blocks, worker_order, worker_shard
from ..parallel.precision import LossScale
from ..recipe import OptimizerConfig, Phase2Config
from .loop import EpochLoop, LoopContext, make_sgd, require_finite
from .phase2 import Phase2Result
from .schedules import EpochSchedule


class StackedWorkers:
    """K workers of one architecture, each from its own starting state (a `state_dict` of `module`)."""

    def __init__(self, module: torch.nn.Module, states: list[dict[str, torch.Tensor]], opt_cfg: OptimizerConfig,
                 lr: float):
        names = [n for n, _ in module.named_parameters()]
        buffer_names = [n for n, _ in module.named_buffers()]
        self.workers = len(states)
        self.params = {n: torch.stack([s[n].detach() for s in states]).requires_grad_() for n in names}
        self.buffers = {n: torch.stack([s[n].detach() for s in states]) for n in buffer_names}
        # The architecture without storage: functional_call reads every tensor from the stacks.
        self._template = copy.deepcopy(module).to("meta").train()
        self.label_smoothing = opt_cfg.label_smoothing
        device = next(iter(self.params.values())).device
        self.optimizer = make_sgd(self.params.values(), opt_cfg, lr, device=device)  # the one a worker alone gets

    def _loss(self, params, buffers, x, y):
        logits = functional_call(self._template, (params, buffers), (x,))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float, autocast=contextlib.nullcontext
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every worker: `images` [K, B, C, H, W] and `labels` [K, B], worker k's batch at k.
        `autocast`: the forward's precision context (the accelerator's, as a worker trained alone gets it).
        Returns each worker's loss [K] and logits [K, B, classes], detached."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            with autocast():
                losses, logits = vmap(self._loss, randomness="error")(self.params, self.buffers, images, labels)
        except RuntimeError as e:
            if "randomness" not in str(e):
                raise
            raise ValueError("the model draws random numbers while training (dropout, drop-path), which stacked "
                             "workers cannot reproduce per worker; train its workers in turn") from None
        losses.sum().backward()  # slice k of each gradient is worker k's own: no term couples two workers
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach(), logits.detach()

    def state_dict(self, worker: int) -> dict[str, torch.Tensor]:
        """Worker `worker`'s weights and BatchNorm statistics, as its own module's `state_dict`."""
        return {n: t[worker].detach().clone() for n, t in (*self.params.items(), *self.buffers.items())}

    def momentum(self, worker: int) -> dict[str, torch.Tensor | None]:
        """Worker `worker`'s momentum buffers by parameter name (None before its first step)."""
        state = self.optimizer.state
        return {n: (state[p]["momentum_buffer"][worker].clone() if p in state and state[p].get("momentum_buffer")
                    is not None else None) for n, p in self.params.items()}

    def set_state(self, worker: int, state: dict[str, torch.Tensor]) -> None:
        """Put worker `worker`'s weights and statistics (e.g. a sample's committed copy) into the stacks."""
        with torch.no_grad():
            for n, t in (*self.params.items(), *self.buffers.items()):
                t[worker].copy_(state[n])

    def set_momentum(self, worker: int, buffers: dict[str, torch.Tensor | None]) -> None:
        """Worker `worker`'s momentum buffers (a resumed checkpoint's); the others' are kept (zeros if new)."""
        for n, p in self.params.items():
            if buffers.get(n) is None:
                continue
            state = self.optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            state["momentum_buffer"][worker].copy_(buffers[n])


def train_stacked(ctx: LoopContext, module: torch.nn.Module, cfg: Phase2Config, *, workers: list[int],
                  resumes: list[Path | None], samples: list[CycleSamples], origin: dict[str, torch.Tensor]
                  ) -> list[tuple[Phase2Result, dict[str, torch.Tensor]]]:
    """Phase 2 of one-process `workers` at once, each as train_phase2 would train it alone: its own order,
    augmentation, BatchNorm statistics, momentum, samples, history rows and checkpoints (p2-w<k>-step*, the same
    files, so `average` and a resume in turn read them). `resumes[k]`: worker k's checkpoint, all at one step, or
    None for all. `module` is the architecture, and holds a worker's weights whenever monitoring or a checkpoint
    reads them. Returns each worker's result and final state. The workers share one clock: each is credited 1/K
    of it."""
    accelerator, source, seed = ctx.accelerator, ctx.source, ctx.seed
    opt_cfg, log, ckpt = ctx.optimizer, ctx.log, ctx.ckpt
    device, n = accelerator.device, source.num_samples
    schedule = EpochSchedule(cfg.stages, cfg.lr, epochs=cfg.epochs, batch_size=cfg.per_worker_batch_size,
                             batch_key="per_worker_batch_size",
                             steps_for=lambda batch: len(worker_blocks(n, batch_size=batch, members=1)))
    none = LossScale(None)
    results, generators, loops, starts, momenta = [], [], [], [], []
    for worker, resume, taken in zip(workers, resumes, samples, strict=True):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, AUGMENT, 2, worker))
        result = Phase2Result()
        module.load_state_dict(origin)
        momentum = {}
        if resume is not None:
            optimizer = make_sgd(module.parameters(), opt_cfg, cfg.first_lr, device=device)
            restore_optimizer(resume, module, optimizer, none)
            momentum = {name: optimizer.state[p].get("momentum_buffer") for name, p in module.named_parameters()}
        loop = EpochLoop(result, ctx, epochs=cfg.epochs, totals_size=4, generator=generator, resume=resume,
                         state_file="member0.pt", what=f"worker {worker}: phase 2", lr_key=cfg.lr_key("phase2"))
        if resume is not None:
            taken.restore(loop.first_epoch, module, device)
        results.append(result), generators.append(generator), loops.append(loop), momenta.append(momentum)
        starts.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    if len({loop.resumed_at for loop in loops}) != 1:
        raise ValueError("stacked workers must resume from checkpoints at one step")
    stacked = StackedWorkers(module, starts, opt_cfg, cfg.first_lr)
    for k, momentum in enumerate(momenta):
        stacked.set_momentum(k, momentum)

    def hold(k: int) -> None:  # worker k's weights into `module`, for whatever reads them there
        module.load_state_dict(stacked.state_dict(k))

    def save(k: int, epoch: int, step_in_epoch: int, lr: float) -> None:
        hold(k)
        optimizer = make_sgd(module.parameters(), opt_cfg, lr, device=device)
        for name, p in module.named_parameters():
            buffer = stacked.momentum(k)[name]
            if buffer is not None:
                optimizer.state[p]["momentum_buffer"] = buffer
        loops[k].stamp(none)
        require_finite(module, f"worker {workers[k]}: phase 2 step {results[k].steps}", ckpt, loops[k].totals.tensor)
        ckpt.save_phase2(module, optimizer, none, results[k], worker=workers[k], epoch=epoch,
                         step_in_epoch=step_in_epoch, totals=loops[k].totals.tensor, generator=generators[k])

    for loop in loops:
        loop.begin(by_clock=True)
    lead = loops[0]
    for epoch, *_ in zip(*(loop.epochs() for loop in loops), strict=True):
        done, stage, steps_per_epoch = lead.done, schedule.stage(epoch), schedule.steps(epoch)
        first_step = results[0].steps - done
        data = source.for_stage(stage.image_size, stage.min_scale, stage.read_resized)
        orders = [worker_order(n, seed=seed, worker=worker, epoch=epoch) for worker in workers]
        streams = []
        for order, generator in zip(orders, generators, strict=True):
            shard, sizes = worker_shard(order, batch_size=stage.batch_size, member=0, members=1)
            streams.append(data.batches(shard[sum(sizes[:done]):], sizes[done:], augment=True, generator=generator,
                                        epoch=epoch))
        for batch in log.steps(zip(*streams, strict=True), phase=2, epoch=epoch, epochs=cfg.epochs,
                               total=steps_per_epoch):
            images, labels = torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])
            lr = schedule.lr(results[0].steps, epoch, results[0].steps - first_step)
            losses, logits = stacked.step(images, labels, lr, accelerator.autocast)
            due = [loop.step_done() for loop in loops][0]  # one step count, one cadence for all
            for k, loop in enumerate(loops):
                loop.totals.add(losses[k], logits[k], labels[k])
            if due:
                for k in range(len(workers)):
                    save(k, epoch, results[k].steps - first_step, lr)
        seconds = lead.epoch_seconds()
        for k, (worker, loop, result) in enumerate(zip(workers, loops, results, strict=True)):
            loop.totals.tensor[loop.totals.SECONDS] = seconds
            loss_sum, correct, count, _ = loop.totals.tensor.tolist()
            loop.end_epoch(epoch, loss_sum, correct, count)
            result.samples_per_epoch.append(int(count))
            result.order_digests.append(digest(orders[k]))
            hold(k)
            samples[k].take(module, epoch, ckpt, result.steps)
            stacked.set_state(k, module.state_dict())  # a sample's committed copy, if an earlier launch wrote it
            row = {"phase": 2, "worker": worker, "epoch": result.epochs, "step": result.steps,
                   "lr": schedule.lr(result.steps - 1, epoch, steps_per_epoch - 1),
                   **schedule.describe(epoch, data.image_size), "train_loss": result.train_loss,
                   "train_acc": result.train_acc, "images_per_s": count / seconds, "seconds": seconds}
            result.history.append(row)
            loop.log(row)
    out = []
    for k, (loop, result) in enumerate(zip(loops, results, strict=True)):
        loop.stamp(none)
        result.seconds /= len(workers)
        out.append((result, stacked.state_dict(k)))
    return out
