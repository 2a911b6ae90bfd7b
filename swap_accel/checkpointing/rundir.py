"""The run directory before and after a run: checked before any process group forms, and
cleared by `--overwrite`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ..recipe import Recipe
from ..recipe.device_defaults import device_settings
from .files import CheckpointError
from .resume import ROOT, phase1_source

# Keys that do not change what is computed: a re-run may change them and still resume.
_NOT_COMPUTED = ("checkpoint", "output_dir", "tracking", "collective_timeout_minutes")

# Everything `train` writes into a run directory; results.json first, so a crash while discarding never leaves an
# old "finished" marker beside new checkpoints. W&B's own offline runs (wandb/) are kept: they may not be synced yet.
OUTPUTS = ("results.json", "model.safetensors", "figure1.png", "recipe.yaml", "workers", "ranks", ROOT, "monitor",
           "heartbeat", "tensorboard")


def discard_outputs(run_dir: Path) -> None:
    """`--overwrite`: start over (the main process, before anyone reads checkpoints). All old outputs go, not only
    the checkpoints: an interrupted overwrite is then an unfinished run of the new recipe, which the
    same command resumes, instead of a "finished" old run whose advice (--overwrite) deletes the new checkpoints."""
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _first_difference(old, new, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if old == new else f"{where}: {old!r} -> {new!r}"


def recipe_difference(recipe: Recipe, stored: dict) -> str | None:
    """The first computed setting in which a stored (resolved) recipe differs from `recipe`; None: the same run."""
    old = {k: v for k, v in stored.items() if k not in _NOT_COMPUTED}
    try:  # validating the stored recipe fills keys added since with their defaults
        old = {k: v for k, v in Recipe.model_validate(old).model_dump(mode="json").items() if k not in _NOT_COMPUTED}
    except ValueError:
        pass  # a recipe of an older schema: compared as written, so it differs where it must
    new = {k: v for k, v in recipe.model_dump(mode="json").items() if k not in _NOT_COMPUTED}
    return _first_difference(old, new)


def check_writable(run_dir: Path) -> None:
    """Create nothing, but prove a file can be created where the run directory is (or will be)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise CheckpointError(f"output directory {run_dir} is not writable ({e}); fix its permissions or choose "
                              "--out DIR") from None


def check_run_dir(recipe: Recipe, run_dir: Path, num_processes: int, overwrite: bool) -> None:
    """Pre-process-group checks of the output directory: writable, not a finished run (unless --overwrite),
    and an unfinished one is resumed only by the same recipe and process count."""
    check_writable(run_dir)
    if recipe.from_phase1 is not None:
        phase1_source(recipe.from_phase1, recipe)
    if overwrite:
        return
    if (run_dir / "results.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished run; pass --overwrite or choose --out DIR")
    if (run_dir / "recipe.yaml").exists():
        stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        diff = recipe_difference(recipe, stored)
        if diff:
            # The same recipe resolved for another kind of device (or written before `auto` existed): say the sets
            # that pin what it trained with.
            stored_values = device_settings(stored)
            here = device_settings(recipe.model_dump(mode="json"))
            if diff.split(":", 1)[0] in stored_values:
                sets = " ".join(f"--set {key}={str(value).lower()}" for key, value in stored_values.items()
                                if value is not None and value != here[key])
                raise CheckpointError(f"{run_dir} holds an unfinished run of this recipe with other device defaults "
                                      f"({diff}; `auto` resolves per device); pass {sets} to resume it, --overwrite "
                                      "to start over, or choose --out DIR")
            raise CheckpointError(f"{run_dir} holds an unfinished run of another recipe ({diff}); rerun the same "
                                  "recipe to resume it, pass --overwrite to start over, or choose --out DIR")
    for manifest in sorted((run_dir / ROOT).glob("*/manifest.json"))[:1]:
        n = json.loads(manifest.read_text())["num_processes"]
        if n != num_processes:
            raise CheckpointError(f"{run_dir} was checkpointed by {n} processes but this launch has {num_processes}; "
                                  f"relaunch with {n} to resume, or pass --overwrite to start over")
