"""`Recipe`: the whole run, its sections and the checks across them.

Checks that need only the recipe run when it validates; `check_data` and `check_processes` run once the data's size
and the process count are known, before any process group forms, so bad input is one line and no work is lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..topology import WorkerLayout, layout_error
from .device_defaults import resolve_mixed_precision
from .sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LossScaleConfig,
    LRConfig,
    ModelConfig,
    OptimizerConfig,
    Phase1Config,
    Phase2Config,
    Phase3Config,
    RecipeError,
    Strict,
    TrackingConfig,
    _StagedPhase,
)


class Recipe(Strict):
    name: str = "swap"
    # swap: the paper's three phases. sgd: phase 1 alone for its whole budget (the small- and large-batch
    # baselines). swa: phase 1 (to τ if set, else its whole budget), then ONE data-parallel model over every
    # process takes phase 2's cyclic-LR samples, averaged as phase 3 does: Table 4's SWA rows (paper section 5.3).
    mode: Literal["swap", "sgd", "swa"] = "swap"
    seed: int = 0
    output_dir: Path | None = None
    # auto: bf16 on a CUDA device with native bf16 (compute capability 8.0+), else no (fp32); resolved when the
    # recipe loads, so recipe.yaml says what ran. fp16 scales the loss: Accelerate's scaler in phase 1, one per
    # phase-2 worker (precision.py).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", validate_default=True)
    loss_scale: LossScaleConfig = LossScaleConfig()
    model: ModelConfig = Field(default_factory=ModelConfig)
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

    @field_validator("mixed_precision", mode="after")
    @classmethod
    def _resolve_auto(cls, value: str) -> str:
        return resolve_mixed_precision(value)

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

