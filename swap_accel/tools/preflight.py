"""The checks `train` (and `transition`, for its phase-1 run) make before any process group forms: recipe, process
count, tracker, model name, run directory, data files and the model's input shape. A typo then costs seconds, not a
cluster start-up, and a bad recipe never reaches a half-formed group. Its own module so that the command line and
the commands that launch training both use it without importing each other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run_dir_for(recipe, out: Path | None) -> Path:
    if out or recipe.output_dir:
        return Path(out or recipe.output_dir)  # an explicit directory anywhere is the user's choice
    # The default runs/<name> must stay inside runs/: no separators, no "..", no hidden or home names.
    if not recipe.name or any(c in recipe.name for c in "/\\") or recipe.name[0] in ".~":
        from ..recipe import RecipeError

        raise RecipeError(f"name {recipe.name!r} is not a plain name and would put the run directory outside "
                          "runs/; use letters, digits, '-', '_' or '.' (not first), or pass --out DIR")
    return Path("runs") / recipe.name


def preflight(recipe_path: Path, overrides: list[str], num_processes: int, out: Path | None, overwrite: bool):
    """All checks that need no process group; returns (recipe, run_dir)."""
    import torch

    from ..checkpointing.rundir import check_run_dir
    from ..data.loading import load_data, prepare_data
    from ..models import check_compile_backend, check_model_input, check_model_name
    from ..monitoring.tracking import check_backend
    from ..recipe import RecipeError, load_recipe

    notes: list[str] = []
    recipe = load_recipe(recipe_path, overrides or [], notes)
    recipe.check_processes(num_processes)
    check_backend(recipe.tracking)
    t = recipe.tracking
    if t.backend == "wandb" and t.mode == "online" and not (t.entity or os.environ.get("WANDB_ENTITY")):
        raise RecipeError("tracking.entity is missing for W&B online mode; set tracking.entity (your W&B user or "
                          "team) or WANDB_ENTITY, or use tracking.mode: offline")
    check_model_name(recipe.model.name)
    check_compile_backend(recipe.model.compile)
    run_dir = run_dir_for(recipe, out)
    check_run_dir(recipe, run_dir, num_processes, overwrite)
    prepare_data(recipe.data, resized=recipe.resized_sides)
    recipe.check_data(load_data(recipe.data, torch.device("cpu"), split="train").num_samples)
    test = load_data(recipe.data, torch.device("cpu"), split="test")
    check_model_input(recipe.model.name, recipe.model.kwargs, in_chans=test.in_chans, num_classes=test.num_classes,
                      image_size=test.image_size)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(note, file=sys.stderr, flush=True)
    return recipe, run_dir
