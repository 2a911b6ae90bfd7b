"""Recipe schema: a strict, typed description of one SWAP (or plain SGD) run.

Every section forbids unknown keys, so a typo is an error naming the key instead of a silently
ignored setting. `load_recipe` reads YAML, applies typed `--set a.b=c` overrides and validates
the result; `RecipeError` carries a one-line message naming the problem and the fix.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .topology import WorkerLayout, layout_error


class RecipeError(ValueError):
    """A recipe problem, already phrased as one line for the user."""


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf`/`nan` for a learning rate or weight decay is a one-line error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(Strict):
    """Batched on-device augmentation for in-memory data (paper section 5.1: crop, flip, cutout)."""

    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    cutout_size: int = Field(8, ge=0)


class DataConfig(Strict):
    source: Literal["fashion_mnist", "hub", "imagefolder"] = "fashion_mnist"
    # Hub data set name or a local directory `datasets.load_dataset` understands (source: hub).
    name: str | None = None
    # Fashion-MNIST IDX directory, or the image-folder root (ImageNet layout: root/split/class/x.jpg).
    root: Path | None = None
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    # Small data sets live in memory as uint8 tensors and are augmented on the device;
    # large ones stream through DataLoader workers with timm transforms.
    in_memory: bool = True
    image_size: int | None = Field(None, gt=0)
    train_subset: int | None = Field(None, gt=0)
    test_subset: int | None = Field(None, gt=0)
    # Held-out images carved from the training split and never trained on (`swap_accel transition` picks τ
    # on them, never on the test set). Here, not under `eval`, so that every loader of the training split
    # leaves them out by construction: the last N of the same seed-0 permutation train_subset takes first from.
    holdout_samples: int | None = Field(None, gt=0)
    num_workers: int = Field(4, ge=0)
    cache_dir: Path | None = None
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "hub" and not self.name:
            raise ValueError("data.name is required for source 'hub' (e.g. uoft-cs/cifar10)")
        if self.source == "imagefolder" and self.root is None:
            raise ValueError("data.root is required for source 'imagefolder'")
        return self


class ModelConfig(Strict):
    # Any timm model name; `resnet9` is ours (swap_accel.models).
    name: str = "resnet9"
    kwargs: dict[str, Any] = {}
    channels_last: bool = False
    # torch.compile the forward (in place, so state_dict keys and checkpoints are unchanged). Off by
    # default: on CPU it costs 30-60 s of compilation and pays off after ~1800 steps (benchmarks/threads.py).
    compile: bool = False


class OptimizerConfig(Strict):
    # Paper section 5.1: SGD with Nesterov momentum 0.9 and weight decay 5e-4.
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class LRConfig(Strict):
    """Linear warm-up to `peak`, then decay to zero at `schedule_epochs` (paper Fig. 1, Tables 5-6).

    `start_epoch` enters the schedule part-way: a phase 2 that continues a longer schedule where phase 1 left it
    (paper section 5.2; a schedule that also changes batch or image size is written as `stages`).
    """

    peak: float = Field(gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    schedule_epochs: float | None = Field(None, gt=0)
    start_epoch: float = Field(0.0, ge=0)
    shape: Literal["linear", "cosine", "constant"] = "linear"
    # The phase's epochs cut into this many equal cycles; phase 2 samples at the ends of the last ones
    # (samples_per_worker; paper section 5.3, Figure 6). Phase 2 only.
    cycles: PositiveInt = 1
    # How phase 2's learning rate runs through its cycles (phase 2 only; unset: swa for mode: swa, restart otherwise).
    # swa: Izmailov et al. 2018's SWA schedule: from `peak` (their α1) down to `swa_lr` (α2 > 0) over the first
    # cycle (after the warm-up, if any), then constant at swa_lr, never warmed up again; the samples are the ends of
    # the last cycles of the constant part. restart: every cycle is the whole schedule again, warm-up to `peak` and
    # decay to zero, re-warming each time (closer to snapshot ensembles than to SWA); SWAP's phase 2 as it always was.
    cycle_shape: Literal["swa", "restart"] | None = None
    # α2 of cycle_shape swa; unset: half of `peak` (Izmailov et al.'s CIFAR ResNets: α1 0.1, α2 0.05).
    swa_lr: float | None = Field(None, gt=0)


class StageConfig(Strict):
    """One piece of a phase's schedule over epochs (paper section 5.2, Figure 5: the published ImageNet schedule
    changes image size, batch size and learning rate during training).

    A stage runs from the previous stage's `until_epoch` (epoch 0 of the phase for the first) to its own, its
    learning rate going linearly from lr[0] to lr[1] (one number: constant). A key left unset keeps the previous
    stage's value; the first stage's batch is the phase's own and its image size data.image_size.
    """

    # The phase's epoch this stage ends at (exclusive); the last stage's is the phase's epoch count.
    until_epoch: PositiveInt
    # [start, end]: linear over the stage's epochs, each step at the middle of its slice; one number: constant.
    lr: tuple[float, float] | float
    global_batch_size: PositiveInt | None = None      # phase 1's stages (and the baselines')
    per_worker_batch_size: PositiveInt | None = None  # phase 2's stages
    # Streaming data only (in-memory data trains at its native size): the train transform's output size.
    image_size: PositiveInt | None = None
    # Streaming data only: RandomResizedCrop's smallest area fraction (unset: timm's 0.08).
    min_scale: float | None = Field(None, gt=0, le=1)
    # Streaming data only: read this stage's training images from copies resized to this shorter side (px), built
    # once under data.cache_dir, instead of decoding the full images (the published ImageNet schedule read 160 px
    # copies at 128 px and 352 px at 224 px). Not inherited: a stage without it reads the full images.
    read_resized: PositiveInt | None = None

    @field_validator("lr")
    @classmethod
    def _rates(cls, value):
        rates = value if isinstance(value, tuple) else (value,)
        if any(r < 0 for r in rates) or not any(r > 0 for r in rates):
            raise ValueError(f"lr={value}: learning rates are >= 0 and not all 0, e.g. [0.4, 0.04]")
        return value


class _StagedPhase(Strict):
    """A phase whose learning rate is `lr` (warm-up and decay) or, with `stages`, piecewise over its epochs."""

    # Warm-up and decay over the phase (paper Tables 5-6); or leave it out and give `stages`.
    lr: LRConfig | None = None
    # A piecewise schedule over the phase's epochs, each stage with its own rate, batch and image size (paper
    # Figure 5, recipes/imagenet.yaml); in place of `lr`.
    stages: list[StageConfig] = []

    def check_stages(self, section: str, epochs: int, batch_key: str) -> None:
        """Recipe-level, so that a problem reads as one line naming the key (not the whole section)."""
        if (self.lr is None) == (not self.stages):
            raise ValueError(f"{section}: give the learning rate as {section}.lr (peak, warm-up, decay) or as "
                             f"{section}.stages (piecewise), " + ("not both; remove one" if self.lr else "one of them"))
        other = "per_worker_batch_size" if batch_key == "global_batch_size" else "global_batch_size"
        previous = 0
        for i, stage in enumerate(self.stages):
            if getattr(stage, other) is not None:
                raise ValueError(f"{section}.stages[{i}].{other} belongs to the other phase; use {batch_key}")
            if stage.until_epoch <= previous:
                raise ValueError(f"{section}.stages[{i}].until_epoch={stage.until_epoch} does not come after "
                                 f"{previous}; list the stages in epoch order")
            previous = stage.until_epoch
        if self.stages and previous != epochs:
            raise ValueError(f"{section}.stages end at epoch {previous} but the phase trains {epochs} epochs; make "
                             f"the last stage's until_epoch {epochs}")

    def batch_sizes(self, section: str, key: str) -> list[tuple[str, int]]:
        """Every batch size the phase trains with, by recipe key: its own `key`, then each stage's that sets one."""
        own = [(f"{section}.{key}", getattr(self, key))]
        return own + [(f"{section}.stages[{i}].{key}", getattr(s, key)) for i, s in enumerate(self.stages)
                      if getattr(s, key) is not None]

    @property
    def first_lr(self) -> float:
        """The optimizer's initial rate; every step sets its own before it runs."""
        if self.lr is not None:
            return self.lr.peak
        lr = self.stages[0].lr
        return lr[0] if isinstance(lr, tuple) else lr

    def lr_key(self, section: str) -> str:
        """The recipe key a diverged run should lower."""
        return f"{section}.lr.peak" if self.lr is not None else f"{section}.stages[].lr"


class Phase1Config(_StagedPhase):
    """Synchronized large-batch phase (or the whole run in `mode: sgd`)."""

    global_batch_size: int = Field(gt=0)
    # Per-process micro-batch for gradient accumulation; defaults to the whole per-process batch.
    micro_batch_size: int | None = Field(None, gt=0)
    max_epochs: int = Field(gt=0)
    # τ: leave phase 1 once the all-reduced training accuracy of the last epoch reaches it.
    stop_train_accuracy: float | None = Field(None, gt=0, le=1)
    # Also keep phase 1's state at the end of the epoch whose training accuracy first reaches each of
    # these (checkpoints/p1-tau<τ>), to start phase 2 from several transition points of one phase-1 run.
    save_at_train_accuracy: list[float] = []

    @field_validator("save_at_train_accuracy")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"phase1.save_at_train_accuracy={values}: each must be a training accuracy in (0, 1], "
                             "e.g. [0.85, 0.9]")
        return sorted(set(values))


class Phase2Config(_StagedPhase):
    """Independent small-batch refinement of W workers, no communication between workers."""

    # W; None: one worker per process. A divisor of P makes groups of P/W processes per worker (the
    # paper's ImageNet run, 2 x 8 GPUs); a multiple of P trains W/P workers in turn on each process.
    workers: int | None = None
    # One worker's batch per step: split over its processes when a worker is a group.
    per_worker_batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    # Paper section 5.3 (Table 4, "SWAP 40 small-batch epochs"): each worker contributes the models at the ends of
    # its last S learning-rate cycles (phase2.lr.cycles), and phase 3 averages all W x S with equal weight.
    samples_per_worker: PositiveInt = 1
    # The workers each process would train in turn (workers a multiple of the processes) trained at once instead:
    # their weights, BN statistics and momentum stacked, one vmapped step for all (algorithm/stacked.py), for a GPU
    # that one small-batch worker leaves idle. Each worker keeps its own order, augmentation, samples and checkpoints;
    # the result equals training them in turn up to floating-point rounding. Not with fp16 (a loss scaler per
    # worker), model.compile, or a model that draws random numbers while training (dropout, drop-path).
    stack_workers: bool = False

    @property
    def sampling(self) -> dict[str, int]:
        """What decides which epochs end a sample (snapshots.CycleSamples), as every phase-2 checkpoint records it:
        `average` finds a dead worker's samples from its own record, whatever recipe it is given."""
        return {"epochs": self.epochs, "cycles": self.cycles, "samples_per_worker": self.samples_per_worker}

    @property
    def cycles(self) -> int:
        return self.lr.cycles if self.lr is not None else 1


class EvalConfig(Strict):
    batch_size: int = Field(1024, gt=0)
    # Samples used to recompute BatchNorm statistics after averaging (None: the whole train set).
    bn_samples: int | None = Field(None, gt=0)
    bn_batch_size: int = Field(512, gt=0)


class CheckpointConfig(Strict):
    """Periodic checkpoints in phases 1 and 2; the end of each phase is always checkpointed."""

    every_steps: int | None = Field(None, gt=0)
    every_minutes: float | None = Field(15.0, gt=0)
    # Periodic checkpoints kept per phase and worker: 2, so a damaged newest one still leaves a good one.
    keep: int = Field(2, ge=1)


class TrackingConfig(Strict):
    """Experiment tracking through Accelerate's trackers, and the evaluation points it shows."""

    backend: Literal["wandb", "tensorboard", "none"] = "none"
    project: str = "swap_accel"
    entity: str | None = None
    group: str | None = None
    # W&B run name; defaults to the recipe name.
    name: str | None = None
    tags: list[str] = []
    # W&B mode; unset: online with credentials, otherwise offline (said once).
    mode: Literal["online", "offline"] | None = None
    # Test accuracy of the phase-1 model and of every phase-2 worker every N epochs (0: at phase ends only).
    eval_every: int = Field(1, ge=0)
    # Paper Figure 1's averaged-model curve: "off"; "end" (phase 3's own result, no extra cost); or N
    # (also a scratch average + BN recalibration + evaluation every N phase-2 epochs).
    averaged_curve: Literal["off", "end"] | PositiveInt = "end"

    @field_validator("averaged_curve", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false; the user meant the setting "off".
        return "off" if value is False else value


class LossScaleConfig(Strict):
    """fp16's dynamic loss scaling (Accelerate's `GradScalerKwargs`), for phase 1 and every phase-2 worker: the
    scale starts at `init`, halves on every step whose gradients overflow (the step is skipped) and doubles after
    `growth_interval` clean steps. Ignored unless mixed_precision is fp16."""

    init: float = Field(65536.0, gt=0)
    growth_interval: PositiveInt = 2000


class Phase3Config(Strict):
    """Averaging the workers (paper Algorithm 1, phase 3)."""

    # uniform: every worker with equal weight (the paper). greedy: a greedy soup (soup.py) chosen on
    # data.holdout_samples held-out training images: a worker joins only if the average does not get worse.
    selection: Literal["uniform", "greedy"] = "uniform"
    # greedy: keep a worker whose average is at most this much (a fraction: 0.003 = 0.3 points) below the best
    # held-out accuracy so far. 0 is Wortsman et al.'s rule; on a few thousand held-out images one image moves the
    # accuracy by more than near-equal workers differ, so about one standard error keeps such workers (README).
    greedy_tolerance: float = Field(0.0, ge=0, lt=1)


class Recipe(Strict):
    name: str = "swap"
    # swap: the paper's three phases. sgd: phase 1 alone for its whole budget (the small- and large-batch
    # baselines). swa: phase 1 (to τ if set, else its whole budget), then ONE data-parallel model over every
    # process takes phase 2's cyclic-LR samples, averaged as phase 3 does: Table 4's SWA rows (paper section 5.3).
    mode: Literal["swap", "sgd", "swa"] = "swap"
    seed: int = 0
    output_dir: Path | None = None
    # fp16 scales the loss: Accelerate's scaler in phase 1, one per phase-2 worker (precision.py).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    loss_scale: LossScaleConfig = LossScaleConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    phase1: Phase1Config
    phase2: Phase2Config | None = None
    phase3: Phase3Config = Phase3Config()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    # Start phase 2 from another run's phase 1 (its run dir or one of its checkpoints/p1-* dirs), so phase-2
    # settings and transition points can be tried without repeating phase 1 (the paper grid-searched it).
    from_phase1: Path | None = None
    # Any collective that waits longer fails, on gloo and NCCL alike. Phase 2 makes none, and processes
    # meet phase 3 through the run directory, so this bounds phase 1's and phase 3's steps, not the workers' skew.
    collective_timeout_minutes: float = Field(30.0, gt=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` (in a recipe or `--set mixed_precision=no`) as false; the user meant "no".
        return "no" if value is False else value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.mode == "swap":
            if self.phase2 is None:
                raise ValueError("mode 'swap' needs a phase2 section (or set mode: sgd)")
            if self.phase1.stop_train_accuracy is None:
                raise ValueError("mode 'swap' needs phase1.stop_train_accuracy (τ in (0, 1], e.g. 0.98)")
        if self.mode == "swa":
            if self.phase2 is None:
                raise ValueError("mode 'swa' samples its models in a phase2 section (per_worker_batch_size, epochs, "
                                 "lr with cycles, samples_per_worker); add one")
            if self.phase2.workers not in (None, 1):
                raise ValueError(f"mode 'swa' trains one model (phase2.workers={self.phase2.workers}); set "
                                 "phase2.workers=1, or use mode: swap for several workers")
        if self.phase2 is not None and self.phase2.workers is not None and self.phase2.workers < 1:
            raise ValueError(f"phase2.workers={self.phase2.workers} trains no worker; leave it unset for one worker "
                             "per process, or set 1 or more")
        self.phase1.check_stages("phase1", self.phase1.max_epochs, "global_batch_size")
        if self.phase2 is not None:
            self.phase2.check_stages("phase2", self.phase2.epochs, "per_worker_batch_size")
        p1_lr = self.phase1.lr
        if p1_lr is not None and p1_lr.cycles > 1:
            raise ValueError("phase1.lr.cycles: cyclic learning rates are phase 2's (its samples); phase 1 "
                             "stops at τ; remove it, or use mode: swa for cyclic samples of one model")
        for key in ("cycle_shape", "swa_lr"):
            if p1_lr is not None and getattr(p1_lr, key) is not None:
                raise ValueError(f"phase1.lr.{key} shapes phase 2's learning-rate cycles; remove it from phase1, or "
                                 f"set phase2.lr.{key}")
        if self.phase2 is not None and self.phase2.lr is not None:
            self._resolve_cycle_shape(self.phase2.lr)
        if self.mode == "swa" and self.phase2.stages:
            raise ValueError("mode 'swa' samples a cyclic learning rate (phase2.lr with cycles), which phase2.stages "
                             "cannot give; use phase2.lr")
        if self.phase2_runs and self.phase2.samples_per_worker > self.phase2.cycles:
            samples, cycles = self.phase2.samples_per_worker, self.phase2.cycles
            raise ValueError(f"phase2.samples_per_worker={samples} takes one model at the end of each of the last "
                             f"cycles, but phase2.lr.cycles={cycles}; set phase2.lr.cycles={samples} (or more)")
        if self.phase2 is not None and self.phase2.stack_workers and (self.mixed_precision == "fp16"
                                                                      or self.model.compile):
            what = "mixed_precision: fp16 (a loss scaler per worker)" if self.mixed_precision == "fp16" else \
                "model.compile"
            raise ValueError(f"phase2.stack_workers cannot be combined with {what}; remove one of them")
        if self.phase3.selection == "greedy" and not self.data.holdout_samples:
            raise ValueError("phase3.selection=greedy chooses workers on held-out training images: set "
                             "data.holdout_samples=N (e.g. 5000), so that no worker trains on them")
        # The SGD baselines read no phase-2 setting (benchmarks reuse them while phase 2 is tuned).
        phase2_epochs = self.phase2 and self.phase2_runs and self.phase2.epochs
        for section, epochs in (("phase1", self.phase1.max_epochs), ("phase2", phase2_epochs)):
            if epochs:
                self._check_lr(section, getattr(self, section), epochs)
        return self

    def _check_lr(self, section: str, phase: _StagedPhase, epochs: int) -> None:
        if phase.stages:
            sized = [i for i, s in enumerate(phase.stages) if s.image_size or s.min_scale or s.read_resized]
            if sized and self.data.in_memory:
                raise ValueError(f"{section}.stages[{sized[0]}] sets image_size/min_scale/read_resized, but in-memory "
                                 "data trains at its native size; set data.in_memory: false, or remove them")
            return
        lr = phase.lr
        if lr.cycles > 1 and (epochs % lr.cycles or lr.schedule_epochs or lr.start_epoch):
            raise ValueError(f"{section}.lr.cycles={lr.cycles} cuts the {epochs} epochs into equal whole-epoch "
                             f"cycles: make {section} epochs a multiple of it, and leave schedule_epochs and "
                             "start_epoch unset")
        length = lr.schedule_epochs or epochs
        cycle_length = length / lr.cycles  # each cycle warms up again
        if lr.warmup_epochs > cycle_length:
            what = f"one of the {lr.cycles} cycles" if lr.cycles > 1 else "the schedule"
            raise ValueError(
                f"{section}.lr.warmup_epochs ({lr.warmup_epochs}) exceeds the length of {what} ({cycle_length:g} "
                "epochs); shorten the warm-up")
        if lr.start_epoch + epochs > length + 1e-9:
            raise ValueError(
                f"{section}: start_epoch + epochs ({lr.start_epoch + epochs}) runs past "
                f"lr.schedule_epochs ({length}); lengthen the schedule or train fewer epochs"
            )

    def _resolve_cycle_shape(self, lr: LRConfig) -> None:
        """Fill phase 2's cycle shape and α2 into the resolved recipe (recipe.yaml and results.json then say which
        schedule ran). mode: swa follows the SWA paper unless told otherwise; every other mode keeps restart, so
        SWAP's phase 2 (the quickstart's pinned results) is bitwise what it was before the choice existed."""
        if lr.cycle_shape is None:
            lr.cycle_shape = "swa" if self.mode == "swa" else "restart"
        if lr.cycle_shape == "restart" and lr.swa_lr is not None:
            raise ValueError(f"phase2.lr.swa_lr={lr.swa_lr} is the constant rate of cycle_shape swa, but "
                             "phase2.lr.cycle_shape=restart decays every cycle to zero; remove swa_lr, or set "
                             "phase2.lr.cycle_shape=swa")
        if lr.cycle_shape == "swa":
            if lr.swa_lr is None:
                lr.swa_lr = lr.peak / 2
            if lr.swa_lr > lr.peak:
                raise ValueError(f"phase2.lr.swa_lr={lr.swa_lr} exceeds phase2.lr.peak={lr.peak}: SWA decays from "
                                 "the peak α1 to α2 <= α1 (Izmailov et al. 2018); lower swa_lr or raise peak")

    @property
    def resized_sides(self) -> list[int]:
        """The shorter sides of the pre-resized copies the stages read (data.resized builds them once)."""
        phases = [self.phase1] + ([self.phase2] if self.phase2 is not None and self.phase2_runs else [])
        return sorted({s.read_resized for phase in phases for s in phase.stages if s.read_resized})

    @property
    def phase2_runs(self) -> bool:
        """SWAP's workers, or SWA's one sampled model: every mode but the SGD baselines has a phase 2 and 3."""
        return self.mode != "sgd"

    def check_data(self, train_samples: int) -> None:
        """Checks that need the training-set size; run before any process group forms."""
        sizes = self.phase1.batch_sizes("phase1", "global_batch_size")
        if self.phase2 is not None:
            sizes += self.phase2.batch_sizes("phase2", "per_worker_batch_size")
        for key, value in [*sizes, ("eval.bn_samples", self.eval.bn_samples)]:
            if value and value > train_samples:
                raise RecipeError(f"{key}={value} exceeds the {train_samples} training samples; lower it "
                                  "or use more data (data.train_subset)")

    def check_processes(self, num_processes: int) -> None:
        """Checks that need the process count; run before any process group forms."""
        for key, b1 in self.phase1.batch_sizes("phase1", "global_batch_size"):
            if b1 % num_processes:
                raise RecipeError(
                    f"{key}={b1} is not divisible by {num_processes} processes; use a multiple of {num_processes} "
                    f"(e.g. {max(num_processes, b1 // num_processes * num_processes)})"
                )
            per_process = b1 // num_processes
            micro = self.phase1.micro_batch_size
            if micro is not None and per_process % micro:
                raise RecipeError(
                    f"phase1.micro_batch_size={micro} does not divide the per-process batch {per_process} "
                    f"({key} {b1} / {num_processes} processes); pick a divisor of {per_process}"
                )
        if self.phase2_runs:
            self.worker_layout(num_processes)

    def worker_layout(self, num_processes: int) -> WorkerLayout:
        """Phase 2's layout for this process count; a RecipeError naming valid values when it cannot be made."""
        workers = 1 if self.mode == "swa" else self.phase2.workers or num_processes
        problem = layout_error(workers, num_processes)
        if problem:
            raise RecipeError(problem)
        layout = WorkerLayout(workers, num_processes)
        g = layout.processes_per_worker
        for key, b2 in self.phase2.batch_sizes("phase2", "per_worker_batch_size"):
            if b2 % g:
                raise RecipeError(f"{key}={b2} is not divisible by the {g} processes of a worker ({num_processes} "
                                  f"processes / {workers} workers); use a multiple of {g}")
        if self.phase2.stack_workers and layout.workers_per_process == 1:
            raise RecipeError(f"phase2.stack_workers stacks the workers a process trains in turn, but {workers} "
                              f"workers on {num_processes} processes train one per process; set phase2.workers to a "
                              f"multiple of {num_processes} above it, or remove stack_workers")
        if isinstance(self.tracking.averaged_curve, int) and layout.workers_per_process > 1:
            raise RecipeError(f"tracking.averaged_curve={self.tracking.averaged_curve} needs every worker at once, but "
                              f"{workers} workers on {num_processes} processes train in turn; use averaged_curve: end")
        return layout

    def layout_notes(self, num_processes: int) -> list[str]:
        """What phase 2's layout on this process count means that the recipe does not say, one line each, for the
        CLI to print before training: a SWAP run whose phase 3 would average a single model (what a bare
        `accelerate launch -m swap_accel train` gives, one process), and workers trained in turn. Any W that fits P
        runs correctly, so neither is refused: its cost, W/P times one worker's phase 2 and two weight files per
        worker, grows linearly and is the user's call, made at start-up instead of hours later."""
        if self.mode != "swap":
            return []  # SWA trains one model by design; the SGD baselines have no phase 2
        layout, notes = self.worker_layout(num_processes), []
        if layout.workers == 1:
            fix = ("launch more processes (accelerate launch --config_file accelerate_config.yaml, or --num_processes "
                   "N) or set phase2.workers=N to train N workers in turn" if self.phase2.workers is None
                   else "set phase2.workers to 2 or more")
            unset = ", phase2.workers unset" if self.phase2.workers is None else ""
            processes = f"{num_processes} process{'es' if num_processes > 1 else ''}"
            notes.append(f"note: phase 2 has a single worker ({processes}{unset}), so phase 3 "
                         f"averages one model and this is large batch then small batch, not SWAP; {fix}")
        if layout.workers_per_process > 1 and not self.phase2.stack_workers:
            k = layout.workers_per_process
            notes.append(f"note: phase2.workers={layout.workers} on {num_processes} process(es): each process trains "
                         f"{k} workers one after another, so phase 2 takes {k} times one worker's time and the run "
                         f"writes 2 weight files per worker; launch more processes or lower phase2.workers if that "
                         "is not meant")
        elif layout.workers_per_process > 1:
            notes.append(f"note: phase2.workers={layout.workers} on {num_processes} process(es): each process trains "
                         f"{layout.workers_per_process} workers at once, stacked (phase2.stack_workers)")
        return notes


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        parent = _fields_at(first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), parent, n=1)
        fix = f"did you mean '{'.'.join(map(str, first['loc'][:-1] + (close[0],)))}'?" if close else ""
        fix = fix or f"valid keys here: {', '.join(sorted(parent))}"
        return f"{source}: {loc}: {msg}; {fix}"
    if first["type"] == "missing":
        return f"{source}: {loc}: required key is missing; add it to the recipe"
    if first["type"] == "finite_number":
        msg = "must be a finite number"
    if first["type"] == "value_error" and not loc:  # a check across sections: its message names keys and fix
        return f"{source}: {msg.removeprefix('Value error, ')}"
    return f"{source}: {loc}: {msg} (got {first.get('input')!r}); fix the value in the recipe or --set"


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
        args = getattr(model, "__args__", ())
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b=c` override; the value is parsed as YAML so numbers and booleans stay typed."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set phase1.max_epochs=10")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node, model = raw, Recipe
    for i, part in enumerate(parts):
        fields = list(model.model_fields) if model is not None else []
        if model is not None and part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = (f"did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close
                    else f"valid keys: {', '.join(fields)}")
            raise RecipeError(f"--set {key}: no such recipe key '{'.'.join(parts[: i + 1])}'; {hint}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(value)
            return
        sub = model.model_fields[part].annotation if model is not None else None
        args = getattr(sub, "__args__", ())
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), sub)
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _drop_foreign_kwargs(raw: dict, written: dict, overrides: list[str]) -> str | None:
    """model.kwargs belong to the recipe's model (the quickstart's `base_width` is ResNet-9's): `--set model.name=X`
    without `--set model.kwargs...` builds X with its own defaults instead of passing them on."""
    keys = [a.split("=", 1)[0].strip() for a in overrides]
    name = (raw.get("model") or {}).get("name")
    if "model.name" in keys and name != written.get("name", "resnet9") and written.get("kwargs") \
            and not any(k.startswith("model.kwargs") for k in keys):
        raw["model"]["kwargs"] = {}
        return (f"note: model.kwargs {written['kwargs']} belong to {written.get('name', 'resnet9')}, not passed to "
                f"{name} (set them with --set model.kwargs=...)")
    return None


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), notes: list[str] | None = None) -> Recipe:
    """`notes` collects what the overrides changed beyond themselves (the CLI prints them once the recipe passed)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass a YAML file such as recipes/fashion_mnist.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections (model:, data:, phase1: ...)")
    raw.setdefault("name", path.stem)
    written = dict(raw.get("model") or {})
    for assignment in overrides:
        apply_override(raw, assignment)
    note = _drop_foreign_kwargs(raw, written, overrides)
    if note and notes is not None:
        notes.append(note)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_error(e, str(path))) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
