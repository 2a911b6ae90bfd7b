"""fp16 loss scaling: Accelerate's gradient scaler for phase 1, one of its own per phase-2 worker.

fp16 gradients underflow without loss scaling, so every optimizer gets a `torch.amp.GradScaler`: phase 1's is
Accelerate's (its `backward` scales the loss, its prepared optimizer unscales, skips a step whose gradients hold
an inf/NaN and updates the scale); a phase-2 worker trains outside Accelerate's optimizer, so it gets a scaler of
its own, built with the same `GradScalerKwargs`. A worker group's gradients are all-reduced before the scaler
looks at them, so its members skip the same steps. Each scaler's state is checkpointed (`scaler.pt`) and
restored: a resumed run skips and grows the scale at exactly the steps the uninterrupted one does.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs

from ..recipe import LossScaleConfig


def scaler_kwargs(cfg: LossScaleConfig) -> GradScalerKwargs:
    return GradScalerKwargs(init_scale=cfg.init, growth_interval=cfg.growth_interval)


def enable_fp16_on_cpu(accelerator: Accelerator) -> None:
    """Accelerate turns `mixed_precision: fp16` into plain fp32 on a CPU (no autocast, no scaler), silently.
    torch has CPU fp16 autocast and `GradScaler("cpu")`, so a CPU run does what the recipe says and runs the very
    code path a GPU run does (the tests' only way to exercise it here). Call before any `prepare`."""
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu":
        accelerator.scaler = new_scaler(accelerator)
        accelerator.native_amp = True  # what Accelerate sets on a GPU: autocast in `autocast()` and prepared models
        accelerator.print("note: mixed_precision fp16 on a CPU runs torch's CPU fp16 kernels, about 8x slower than "
                          "fp32 here (tiny recipe: 300 vs 2440 img/s); it is meant for GPUs", flush=True)


def new_scaler(accelerator: Accelerator) -> torch.amp.GradScaler | None:
    """A fresh scaler with the run's settings, or None when the run is not fp16."""
    if accelerator.mixed_precision != "fp16":
        return None
    kwargs = accelerator.scaler_handler.to_kwargs() if accelerator.scaler_handler is not None else {}
    return torch.amp.GradScaler(accelerator.device.type, **kwargs)


class LossScale:
    """One optimizer's loss scaling, counted for results.json: steps skipped (inf/NaN gradients, scale backed
    off) and scale growths. A pass-through when `scaler` is None (fp32, bf16): no extra work, bitwise unchanged.

    `accelerate_steps`: phase 1's optimizer is Accelerate's, whose `step()` already runs scaler.step and
    update; a worker's plain optimizer needs both done here. No host sync per step (gpu_check checks it): the
    optimizer is fused (`make_sgd`), so GradScaler hands it the inf check on the device instead of reading it
    on the host, and the scale is compared on the device (`_get_scale_async`, torch's non-syncing accessor)."""

    def __init__(self, scaler: torch.amp.GradScaler | None, *, accelerate_steps: bool = False) -> None:
        self.scaler, self.accelerate_steps = scaler, accelerate_steps
        self._restored = (0, 0)  # counts up to a resumed checkpoint
        self._counts: torch.Tensor | None = None  # [skipped steps, growths] since, on the scale's device

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        before = self.scaler._get_scale_async().clone()  # set by the backward's scale(loss)
        if self.accelerate_steps:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        after = self.scaler._get_scale_async()
        if self._counts is None:
            self._counts = torch.zeros(2, dtype=torch.int64, device=after.device)
        # A skipped step backs the scale off; a growth never coincides with one.
        self._counts += torch.stack([after < before, after > before]).reshape(2)

    def counts(self) -> tuple[int, int]:
        now = self._counts.tolist() if self._counts is not None else [0, 0]
        return self._restored[0] + now[0], self._restored[1] + now[1]

    def summary(self) -> dict | None:
        if self.scaler is None:
            return None
        skipped, growths = self.counts()
        return {"scale": self.scaler.get_scale(), "skipped_steps": skipped, "growths": growths}

    def state_dict(self) -> dict:
        skipped, growths = self.counts()
        return {"scaler": self.scaler.state_dict(), "skipped_steps": skipped, "growths": growths}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self._restored, self._counts = (state["skipped_steps"], state["growths"]), None
