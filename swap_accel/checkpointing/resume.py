"""Never lose a run: where a re-run starts, and what it puts back (saver.Checkpointer writes).

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
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.provenance import (
    describe_provenance,
    held_out_trained_on,
    provenance,
    provenance_sets,
    same_data_set,
    same_training_images,
)
from ..parallel.precision import LossScale
from ..recipe import Recipe
from .files import (
    CheckpointError,
    load_state,
    load_weights_into,
    verify_checkpoint,
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
    # load_state_dict also restores which kernel the writer stepped with (fused, foreach), which is not training
    # state: keep the one this optimizer was built with for this device (loop.make_sgd), so a checkpoint written
    # on CUDA (fused) resumes on a CPU with the CPU's kernel, and a GradScaler meets the fused step it was set up
    # for.
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults["fused"], optimizer.defaults["foreach"]
    if loss_scale.scaler is not None:
        loss_scale.load_state_dict(load_state(path / "scaler.pt"))


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


def finished_workers(run_dir: Path) -> list[int]:
    return sorted(int(p.name[4:-4]) for p in (run_dir / ROOT).glob("p2-w*-end") if (p / "manifest.json").exists())
