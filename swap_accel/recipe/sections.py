"""The recipe's sections: one strict pydantic model per YAML section (model, data, optimizer, phase1, phase2, ...).

Every section forbids unknown keys, so a typo is an error naming the key instead of a silently ignored setting.
Checks that read one section live here; checks across sections live on `Recipe` (schema.py). The comment above a
field is its entry in docs/recipes.md (docs/gen_recipes.py reads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from .device_defaults import resolve_channels_last


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
    # Weights and activations in NHWC. auto: true on CUDA (cuDNN's tensor-core convolutions want it), false on a
    # CPU (where it measured 1.16x on 2 cores: set true there by hand); resolved when the recipe loads.
    channels_last: bool | Literal["auto"] = Field("auto", validate_default=True)
    # torch.compile the forward (in place, so state_dict keys and checkpoints are unchanged): true for torch's
    # default backend (inductor), or a backend's name (e.g. aot_eager, cudagraphs). Off by default: on CPU
    # inductor costs 30-60 s of compilation (more with a cold cache) and pays off after ~1800 steps
    # (benchmarks/threads.py).
    compile: bool | str = False

    @field_validator("channels_last", mode="before")
    @classmethod
    def _bool_or_auto(cls, value):
        # One message naming all three values, instead of pydantic's one per member of the union.
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @field_validator("channels_last", mode="after")
    @classmethod
    def _resolve_auto(cls, value: bool | str) -> bool:
        return resolve_channels_last(value)


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

