"""Command line: `train`, `validate`, `report`, `models` (typer).

Everything that can be checked before a process group forms is checked here first (recipe,
process count, model name, data files, output directory), so a typo costs seconds, not a
cluster start-up. Known problems end with one line naming the problem and the fix; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SWAP (Stochastic Weight Averaging in Parallel) training on Accelerate.")

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Typed recipe override KEY.SUB=VALUE (repeatable).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]


def _fail(message: str, debug: bool) -> None:
    if debug:
        raise
    rank = os.environ.get("RANK")
    prefix = f"error (rank {rank})" if rank not in (None, "0") else "error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(2)


def _known_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .distributed import DistributedError
    from .models import ModelError
    from .phase1 import TrainingDiverged
    from .recipe import RecipeError

    return RecipeError, DataError, ModelError, DistributedError, TrainingDiverged, FileExistsError, PermissionError


def run_dir_for(recipe, out: Path | None) -> Path:
    return Path(out or recipe.output_dir or Path("runs") / recipe.name)


def preflight(recipe_path: Path, overrides: list[str], num_processes: int, out: Path | None, overwrite: bool):
    """All checks that need no process group; returns (recipe, run_dir)."""
    from .data import prepare_data
    from .models import check_model_name
    from .recipe import load_recipe
    from .tracking import check_backend

    recipe = load_recipe(recipe_path, overrides or [])
    recipe.check_processes(num_processes)
    check_backend(recipe.tracking)
    check_model_name(recipe.model.name)
    run_dir = run_dir_for(recipe, out)
    if (run_dir / "results.json").exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a finished run; pass --overwrite or choose --out DIR")
    prepare_data(recipe.data)
    return recipe, run_dir


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/fashion_mnist.yaml")],
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in the run directory.")] = False,
    debug: Debug = False,
) -> None:
    """Train a recipe. Launch with `accelerate launch [options] -m swap_accel train RECIPE`."""
    try:
        from .distributed import launched_world_size
        from .train import train as run

        parsed, run_dir = preflight(recipe, overrides, launched_world_size(), out, overwrite)
        run(parsed, run_dir)
    except _known_errors() as e:
        _fail(str(e), debug)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML to check.")],
    overrides: Overrides = None,
    num_processes: Annotated[int, typer.Option(help="Process count the recipe will run with.")] = 2,
    debug: Debug = False,
) -> None:
    """Check a recipe (schema, process count, model name, data) without training."""
    try:
        from .recipe import dump_recipe

        parsed, run_dir = preflight(recipe, overrides, num_processes, None, overwrite=True)
    except _known_errors() as e:
        _fail(str(e), debug)
    print(dump_recipe(parsed), end="")
    print(f"# ok: valid for {num_processes} process(es); run directory {run_dir}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (several: side-by-side comparison).")],
    debug: Debug = False,
) -> None:
    """Print the Table-1 table from each run's results.json and redraw its Figure 1 (issue 3)."""
    import json

    from .figure import save
    from .report import print_table

    runs = []
    for run_dir in run_dirs:
        path = run_dir / "results.json"
        if not path.is_file():
            _fail(f"{path} not found; pass a finished run directory (it holds results.json)", debug)
        runs.append(json.loads(path.read_text()))
    print_table(runs)
    for run_dir, results in zip(run_dirs, runs, strict=True):
        print(f"Figure 1: {save(results, run_dir / 'figure1.png')}")


@app.command()
def models(pattern: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*'.")] = "*") -> None:
    """List timm model names (swap_accel's resnet9 included)."""
    import timm

    import swap_accel  # noqa: F401  (registers resnet9)

    for name in timm.list_models(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"):
        print(name)


def main() -> None:
    app()
