"""Never lose a run: which checkpoints to write when, and where a re-run starts.

Layout under RUN_DIR/checkpoints/ (periodic names sort by step):
  p1-step00000040/     phase 1 every N steps/minutes: model.safetensors, optimizer.pt and with fp16 scaler.pt
                       (identical on every rank after the gradient all-reduce, so rank 0's), rank<r>.pt (each rank's
                       augmentation generator, global RNG and partial epoch sums)
  p1-end/              phase 1 finished: the weights phase 2 starts from (`--from-phase1` reads these)
  p2-w<k>-step.../     worker k in phase 2 (k is the worker, not the rank): model.safetensors and
                       optimizer.pt from its group's leader, member<j>.pt from each of its processes
  p2-w<k>-end/         worker k finished phase 2: its weights, test accuracy and phase summaries
  p2-w<k>-sample<s>/   worker k's model at the end of its s-th sampled LR cycle (the last is p2-w<k>-end)
Re-running the same command resumes each part from its newest good checkpoint. Sample orders are pure
functions of (seed, rank/worker, epoch) (sampling.py) and every other source of randomness is saved, so a
resumed run computes bit for bit what the uninterrupted one would have (tests/test_resume.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.sources import (
    describe_provenance,
    held_out_trained_on,
    provenance,
    provenance_sets,
    same_data_set,
    same_training_images,
)
from ..parallel.distributed import barrier
from ..parallel.precision import LossScale
from ..recipe import Recipe
from .files import (
    MANIFEST,
    CheckpointError,
    commit_checkpoint,
    load_state,
    load_weights_into,
    save_weights,
    verify_checkpoint,
    write_state,
)

ROOT = "checkpoints"


def step_dirs(root: Path, prefix: str) -> list[Path]:
    """Committed periodic checkpoints named `prefix<step>`, newest first (staging dirs start with '.')."""
    return sorted((p for p in root.glob(f"{prefix}*") if p.is_dir()), reverse=True)


def newest_good(candidates: list[Path], warn) -> Path | None:
    """The first candidate that verifies; a torn or damaged one is reported and skipped."""
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warn(f"{e}; falling back to the previous good checkpoint")
    return None


def phase1_source(path: Path, recipe: Recipe | None = None) -> Path:
    """The verified phase-1 checkpoint `--from-phase1` names: a run directory (its p1-end) or any p1-* directory
    of one, so phase 2 can also start from an earlier transition point (the paper grid-searched it)."""
    path = Path(path)
    if (path / ROOT).is_dir():
        if not (path / ROOT / "p1-end").exists():
            raise CheckpointError(f"--from-phase1 {path}: its phase 1 has not finished (no {ROOT}/p1-end); pass a "
                                  f"finished run or one of its {ROOT}/p1-step* directories")
        path = path / ROOT / "p1-end"
    elif not path.exists():
        raise CheckpointError(f"--from-phase1 {path}: no such run directory or checkpoint; pass a run directory "
                              "whose phase 1 finished")
    manifest = verify_checkpoint(path)
    if manifest.get("kind") not in ("phase1", "phase1-end"):
        raise CheckpointError(f"--from-phase1 {path} is a {manifest.get('kind')} checkpoint, not a phase-1 one; pass "
                              f"a run directory or a {ROOT}/p1-* directory")
    check_model(manifest, path, recipe)
    if recipe is not None:
        # Phase 2 continues phase 1 on the same images (paper Algorithm 1), and phase 3's held-out images must be
        # ones phase 1 never trained on: the recipe's training images must be the checkpoint's.
        check_data(manifest, path, recipe, prefix="--from-phase1 ", trained_by="phase 1",
                   consequence="phase 2 would train on other images than phase 1",
                   missing_fix="train phase 1 again with this version (train RECIPE without --from-phase1)",
                   mismatch_fix=lambda theirs, ours: (
                       f"train phase 1 with this recipe's data (train RECIPE {provenance_sets(ours)}, without "
                       f"--from-phase1) or give this recipe that phase 1's ({provenance_sets(theirs)})"))
    return path


def check_model(manifest: dict, path: Path, recipe: Recipe | None) -> None:
    wanted = {"name": recipe.model.name, "kwargs": recipe.model.kwargs} if recipe else manifest["model"]
    if manifest["model"] != wanted:
        raise CheckpointError(f"{path} is a checkpoint of another model ({manifest['model']}, the recipe has "
                              f"{wanted}); use a checkpoint of this model or fix model.name/model.kwargs")


def check_data(manifest: dict, path: Path, recipe: Recipe, *, prefix: str = "", trained_by: str, consequence: str,
               missing_fix: str, mismatch_fix: Callable[[dict, dict], str]) -> None:
    """Refuse to reuse checkpoint `path` under `recipe` unless it was trained on exactly the images the recipe trains
    on (data.provenance), in one line naming both. `trained_by` and `consequence` word what training on other images
    would do; `mismatch_fix(theirs, ours)` the way out."""
    theirs, ours = manifest.get("data"), provenance(recipe.data)
    if not isinstance(theirs, dict) or "train_indices" not in theirs:
        raise CheckpointError(f"{prefix}{path} records no data provenance (written by an older swap_accel), so which "
                              f"images {trained_by} trained on is unknown and held-out images may be among them; "
                              f"{missing_fix}")
    if same_training_images(theirs, ours):
        return
    if same_data_set(theirs, ours):
        held = held_out_trained_on(theirs, ours)
        problem = consequence + (f", and {held} of this recipe's {ours['holdout_samples']} held-out images are ones "
                                 f"{trained_by} trained on" if held else "")
        fix = mismatch_fix(theirs, ours)
    else:
        problem = f"{trained_by} trained on another data set or split"
        fix = "use a checkpoint trained on this recipe's data, or set data.source/name/train_split to its"
    raise CheckpointError(f"{prefix}{path} was trained on {describe_provenance(theirs)}, but this recipe trains on "
                          f"{describe_provenance(ours)}: {problem}; {fix}")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Start:
    """Where phase 1 starts: verified checkpoint directories, None for "from scratch"."""

    phase1_end: Path | None = None  # phase 1 is done (this run's, or the --from-phase1 source)
    phase1_step: Path | None = None  # else resume phase 1 here
    workers: dict[int, WorkerStart] = dataclasses.field(default_factory=dict)  # this process's, as found

    def describe(self) -> dict:
        return {"phase1_end": self.phase1_end and str(self.phase1_end),
                "phase1_step": self.phase1_step and str(self.phase1_step),
                "workers": {str(k): w.describe() for k, w in self.workers.items()}}


@dataclasses.dataclass
class WorkerStart:
    """Where one phase-2 worker starts (per worker, not per rank)."""

    end: Path | None = None  # this worker finished phase 2
    step: Path | None = None  # else resume its phase 2 here

    def describe(self) -> dict[str, str | None]:
        return {k: v and str(v) for k, v in dataclasses.asdict(self).items()}

    def position(self, epochs: int) -> tuple[int, list[dict]]:
        """(epoch at which this worker (re)starts phase 2, its logged epoch rows so far)."""
        path = self.end or self.step
        if path is None:
            return 0, []
        manifest = json.loads((path / "manifest.json").read_text())
        return (epochs if self.end else manifest["epoch"]), manifest["result"]["history"]


def find_start(run_dir: Path, recipe: Recipe) -> Start:
    """Where phase 1 starts. The main process decides and broadcasts it (train.py): a rank whose view of
    the shared directory lags must not pick another step and leave the collectives unmatched."""
    root = run_dir / ROOT
    start = Start(phase1_end=newest_good([root / "p1-end"] if (root / "p1-end").exists() else [], _warn))
    if start.phase1_end is None and recipe.from_phase1 is not None:
        start.phase1_end = phase1_source(recipe.from_phase1, recipe)
    if start.phase1_end is None:
        start.phase1_step = newest_good(step_dirs(root, "p1-step"), _warn)
    return start


def find_worker_start(run_dir: Path, worker: int, leader: bool) -> WorkerStart:
    """The newest good checkpoint of `worker`. A group's members read the same committed files (the leader
    commits only after every member's state is on disk), so they all resume at the same step."""
    root, warn = run_dir / ROOT, _warn if leader else (lambda msg: None)
    own_end = root / f"p2-w{worker}-end"
    start = WorkerStart(end=newest_good([own_end] if own_end.exists() else [], warn))
    if start.end is None:
        start.step = newest_good(step_dirs(root, f"p2-w{worker}-step"), warn)
    return start


def load_result(path: Path, module, result_type):
    """Weights and phase summary of an end-of-phase checkpoint: the phase is not run again."""
    load_weights_into(module, path)
    return result_type(**json.loads((path / "manifest.json").read_text())["result"])


def restore_optimizer(path: Path, module, optimizer, loss_scale: LossScale) -> None:
    """Weights, optimizer and fp16 loss scaler as checkpoint `path` holds them."""
    load_weights_into(module, path)
    optimizer.load_state_dict(load_state(path / "optimizer.pt"))
    if loss_scale.scaler is not None:
        loss_scale.load_state_dict(load_state(path / "scaler.pt"))


def loop_state(totals: torch.Tensor, generator: torch.Generator) -> dict:
    """Per-rank state of a training loop at a step boundary, beyond the weights: the partial epoch sums (phase
    1's τ decision at epoch end must see the same sums after a mid-epoch resume), the augmentation generator
    and the global RNG (dropout, drop-path)."""
    state = {"totals": totals.cpu(), "generator": generator.get_state(), "rng": torch.get_rng_state(),
             "py_rng": random.getstate()}  # streaming sources' timm transforms draw from Python's RNG
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_loop(path: Path, state_file: str, result, generator: torch.Generator,
                 device) -> tuple[int, int, torch.Tensor]:
    """Put a loop back where checkpoint `path` left it: `result` fields, and generator and RNG from this
    process's `state_file` in it. Returns (epoch, steps already done in it, partial epoch sums)."""
    state = load_state(path / state_file)
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in manifest["result"].items():
        setattr(result, key, value)
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if "py_rng" in state:
        version, internal, gauss = state["py_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    return manifest["epoch"], manifest["step_in_epoch"], state["totals"].to(device)


class Checkpointer:
    """Writes this rank's checkpoints. `due(step)` is an integer compare (phase 2 adds a clock read): no cost
    and no host sync when nothing is due."""

    def __init__(self, run_dir: Path, recipe: Recipe, accelerator) -> None:
        self.root, self.cfg, self.accelerator = run_dir / ROOT, recipe.checkpoint, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        # Every manifest says which images its weights were trained on (data.provenance), so a run that reuses it
        # (--from-phase1, average, transition) can refuse other data, and how the worker takes its samples
        # (snapshots.CycleSamples), so `average` finds a dead worker's samples without its run's recipe.
        self.meta = {"num_processes": self.world, "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs},
                     "data": provenance(recipe.data), "sampling": recipe.phase2 and recipe.phase2.sampling}
        self.last_good: Path | None = None
        # Checkpoints committed by an earlier launch of this run. Listed here, before this launch trains a step, so
        # that every process agrees which ones it may reach again (`_save_once`) however its view of the shared
        # directory lags.
        self._committed_before = frozenset(p.parent.name for p in self.root.glob(f"*/{MANIFEST}"))
        self._time_steps = sys.maxsize
        self.begin(0, by_clock=False)

    def begin(self, step: int, *, by_clock: bool) -> None:
        """Count intervals from `step`. Phase-2 workers read their own clocks (they need not agree); phase-1
        ranks must all pick the same step, so phase 1 turns minutes into steps with `calibrate` instead."""
        self._every = self.cfg.every_steps or sys.maxsize
        self._by_clock = by_clock and self.cfg.every_minutes is not None
        if by_clock:  # phase 2 keeps time by its own clock, not by phase 1's (longer) calibrated steps
            self._time_steps = sys.maxsize
        self._mark(step)

    def _mark(self, step: int) -> None:
        self._last, self._clock = step, time.monotonic()
        self._next = step + min(self._every, self._time_steps)

    def calibrate(self, seconds_per_step: float) -> None:
        """Phase 1, at epoch ends, with the step time averaged over ranks by the epoch's all-reduce."""
        if self.cfg.every_minutes is not None:
            self._time_steps = max(1, int(60 * self.cfg.every_minutes / max(seconds_per_step, 1e-9)))
            self._next = self._last + min(self._every, self._time_steps)

    def due(self, step: int) -> bool:
        return step >= self._next or (self._by_clock and time.monotonic() - self._clock >= 60 * self.cfg.every_minutes)

    def _commit(self, staging: Path, name: str, files: list[str], kind: str, step: int, info: dict) -> Path:
        final = self.root / name
        commit_checkpoint(staging, final, files, {"kind": kind, **self.meta, "step": step, **info})
        return final

    def _prune(self, prefix: str) -> None:
        # Renamed out of sight first: a kill during the deletion leaves no half-deleted checkpoint in view.
        for old in step_dirs(self.root, prefix)[self.cfg.keep :]:
            old.rename(old.with_name(f".{old.name}.deleting"))
        for doomed in self.root.glob(f".{prefix}*.deleting"):
            shutil.rmtree(doomed, ignore_errors=True)

    def _staging(self, name: str) -> Path:
        staging = self.root / f".{name}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _save_optimizer(self, staging: Path, module, optimizer, loss_scale: LossScale) -> list[str]:
        """The weights, the optimizer and, with fp16, its loss scaler: the state every rank shares."""
        save_weights(staging / "model.safetensors", module)
        write_state(staging / "optimizer.pt", optimizer.state_dict())
        if loss_scale.scaler is None:
            return ["model.safetensors", "optimizer.pt"]
        write_state(staging / "scaler.pt", loss_scale.state_dict())
        return ["model.safetensors", "optimizer.pt", "scaler.pt"]

    def save_phase1(self, module, optimizer, loss_scale: LossScale, result, *, epoch: int, step_in_epoch: int,
                    totals, generator) -> None:
        name = f"p1-step{result.steps:08d}"
        staging = self._staging(name)
        write_state(staging / f"rank{self.rank}.pt", loop_state(totals, generator))
        if self.rank == 0:
            shared = self._save_optimizer(staging, module, optimizer, loss_scale)
        # Every rank's file is on disk before rank 0 checksums them; the run dir is shared, as on any cluster.
        self.accelerator.wait_for_everyone()
        if self.rank == 0:
            files = shared + [f"rank{r}.pt" for r in range(self.world)]
            self._commit(staging, name, files, "phase1", result.steps,
                         {"epoch": epoch, "step_in_epoch": step_in_epoch, "result": dataclasses.asdict(result)})
            self._prune("p1-step")
        self.last_good = self.root / name
        self._mark(result.steps)

    def save_phase2(self, module, optimizer, loss_scale: LossScale, result, *, worker: int, epoch: int,
                    step_in_epoch: int, totals, generator, group=None, member: int = 0, members: int = 1) -> None:
        """One worker's checkpoint, as phase 1's but inside its group: the weights and optimizer (identical on
        every member after the in-group all-reduce) from the leader, each member's loop state from itself."""
        name = f"p2-w{worker}-step{result.steps:08d}"
        staging = self._staging(name)
        write_state(staging / f"member{member}.pt", loop_state(totals, generator))
        if member == 0:
            shared = self._save_optimizer(staging, module, optimizer, loss_scale)
        if members > 1:
            barrier(self.accelerator, group)
        if member == 0:
            files = shared + [f"member{j}.pt" for j in range(members)]
            self._commit(staging, name, files, "phase2", result.steps,
                         {"worker": worker, "members": members, "epoch": epoch, "step_in_epoch": step_in_epoch,
                          "result": dataclasses.asdict(result)})
            self._prune(f"p2-w{worker}-step")
        self.last_good = self.root / name
        self._mark(result.steps)

    def save_transition_point(self, module, result, tau: float) -> None:
        """`p1-tau<τ>`: phase 1 as a run with this τ would end it, kept once and by rank 0, as p1-end is;
        `--from-phase1` takes it. Every rank calls it at the end of the epoch that first reaches τ."""
        self._save_once(module, f"p1-tau{tau:g}", "phase1-end", result.steps,
                        {"tau": tau, "result": {**dataclasses.asdict(result), "reached_tau": True}},
                        writer=self.rank == 0)

    def save_sample(self, module, name: str, step: int, info: dict, *, writer: bool) -> None:
        """`p2-w<k>-sample<s>` (snapshots.py): a worker's model at the end of a sampled cycle. Every member of the
        worker's group calls it; its leader (`writer`) writes."""
        self._save_once(module, name, "phase2-sample", step, info, writer=writer)

    def _save_once(self, module, name: str, kind: str, step: int, info: dict, *, writer: bool) -> None:
        """A weights-only checkpoint that a resumed run may reach again. The copy an earlier launch committed is the
        one `--from-phase1`, `average` and the greedy soup read, so the run continues from that copy (every process
        holding the model loads it) rather than from its recomputation: equal bit for bit on CPU, not on GPUs, whose
        kernels need not be deterministic. Not `save_end`: no fallback for the run, so `last_good` stays."""
        path = self.root / name
        if name in self._committed_before:
            verify_checkpoint(path)
            load_weights_into(module, path)
        elif writer:
            self._save_weights_only(module, name, kind, step, info)

    def save_end(self, module, name: str, kind: str, step: int, info: dict) -> Path:
        """End of phase 1 (rank 0, the weights every rank holds after the buffer broadcast) or of one worker."""
        self.last_good = self._save_weights_only(module, name, kind, step, info)
        return self.last_good

    def _save_weights_only(self, module, name: str, kind: str, step: int, info: dict) -> Path:
        staging = self._staging(name)
        save_weights(staging / "model.safetensors", module)
        return self._commit(staging, name, ["model.safetensors"], kind, step, info)


def finished_workers(run_dir: Path) -> list[int]:
    return sorted(int(p.name[4:-4]) for p in (run_dir / ROOT).glob("p2-w*-end") if (p / "manifest.json").exists())
