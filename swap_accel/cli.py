"""Command line: `train`, `validate`, `average`, `report`, `export`, `landscape`, `cosine`, `transition`, `models`
(typer).

Everything that can be checked before a process group forms is checked first (preflight.py: recipe,
process count, model name, data files, output directory), so a typo costs seconds, not a
cluster start-up. Known problems end with one line naming the problem and the fix; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from .tools.preflight import preflight, run_dir_for

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
    from .algorithm.loop import TrainingDiverged
    from .checkpointing.files import CheckpointError
    from .data.sources import DataError
    from .models import ModelError
    from .parallel.distributed import DistributedError
    from .recipe import RecipeError
    from .tools.geometry import LandscapeError
    from .tools.transition import TransitionError

    return (RecipeError, DataError, ModelError, DistributedError, TrainingDiverged, CheckpointError, FileExistsError,
            PermissionError, LandscapeError, TransitionError)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/fashion_mnist.yaml")],
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in the run directory: replace a finished run, "
                                                "ignore an unfinished run's checkpoints.")] = False,
    from_phase1: Annotated[Path | None, typer.Option(
        "--from-phase1", help="Start phase 2 from another run's phase 1 (run dir or checkpoints/p1-* dir).")] = None,
    debug: Debug = False,
) -> None:
    """Train a recipe, or resume it: re-running the same command continues from its newest good checkpoint.
    Launch with `accelerate launch --config_file accelerate_config.yaml -m swap_accel train RECIPE` (or
    --num_processes N): without a config accelerate starts one process, so phase 2 has one worker unless
    phase2.workers says more."""
    try:
        from .parallel.distributed import launched_world_size
        from .train import train as run

        extra = [f"from_phase1={from_phase1}"] if from_phase1 else []
        parsed, run_dir = preflight(recipe, [*(overrides or []), *extra], launched_world_size(), out, overwrite)
        _say_layout(parsed, launched_world_size())
        run(parsed, run_dir, fresh=overwrite)
    except _known_errors() as e:
        _fail(str(e), debug)


def _say_layout(recipe, num_processes: int) -> None:
    """Phase 2's layout notes (a single worker, workers in turn), once, before any process group forms."""
    if os.environ.get("RANK", "0") == "0":
        for note in recipe.layout_notes(num_processes):
            print(note, file=sys.stderr, flush=True)


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
    _say_layout(parsed, num_processes)
    print(dump_recipe(parsed), end="")
    print(f"# ok: valid for {num_processes} process(es); run directory {run_dir}")


@app.command()
def average(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Run directories (their finished workers) and/or worker checkpoint dirs (checkpoints/p2-w*).")],
    recipe: Annotated[Path, typer.Option(help="The workers' recipe (model, data, BN and evaluation settings).")],
    out: Annotated[Path, typer.Option(help="Output directory: model.safetensors, workers/, results.json.")],
    overrides: Overrides = None,
    selection: Annotated[str | None, typer.Option(help="uniform (every worker) or greedy (a greedy soup chosen on "
                                                        "the recipe's data.holdout_samples); default: the "
                                                        "recipe's phase3.selection.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace finished results in --out.")] = False,
    debug: Debug = False,
) -> None:
    """Average worker checkpoints, recompute BN statistics, evaluate: phase 3 for any set of workers, e.g. the
    survivors of a run that lost one (phase 2 needs no worker to wait for another), or a greedy soup of them."""
    try:
        from .data.loading import prepare_data
        from .models import check_model_name
        from .recipe import load_recipe
        from .recipe.device_defaults import AUTO, device_settings
        from .recipe.loading import apply_override
        from .tools.average import average as run
        from .tools.average import check_out, resolve_workers

        parsed = load_recipe(recipe, [*(overrides or []), *([f"phase3.selection={selection}"] if selection else [])])
        check_model_name(parsed.model.name)
        # A precision set on the command line is a choice, which phase 3 honours; `auto` is not one. The sets are
        # read as load_recipe reads them.
        given: dict = {}
        for assignment in overrides or []:
            apply_override(given, assignment)
        chosen = device_settings(given, unset=AUTO)["mixed_precision"] != AUTO
        workers = resolve_workers(checkpoints, parsed, precision_chosen=chosen)
        check_out(out, overwrite)
        prepare_data(parsed.data)
        run(parsed, workers, out)
    except _known_errors() as e:
        _fail(str(e), debug)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (several: side-by-side comparison).")],
    debug: Debug = False,
) -> None:
    """Print the Table-1 table from each run's results.json and redraw its Figure 1."""
    import json

    from .monitoring.figure import save
    from .monitoring.report import print_table

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
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (results.json, model.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Folder to write: config.json, model.safetensors, README.md.")],
    push: Annotated[str | None, typer.Option(help="Upload the folder to this Hugging Face hub repo id.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into an existing, non-empty folder.")] = False,
    debug: Debug = False,
) -> None:
    """Export the averaged model the way timm models are shared: timm.create_model('local-dir:OUT', pretrained=True)
    loads it, `--push` uploads it."""
    try:
        from .tools.export import export as run

        # A file where the folder (or one of its parents) should be: one line, not save_for_hf's NotADirectoryError.
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise FileExistsError(f"{blocker} is a file, not a folder; pass a folder to export into, e.g. "
                                  f"hub/{run_dir.resolve().name}")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another folder")
        run(run_dir, out, push)
    except _known_errors() as e:
        _fail(str(e), debug)
    print(f"exported {run_dir} to {out}: timm.create_model('local-dir:{out}', pretrained=True) loads it")


@app.command()
def landscape(
    run_dir: Annotated[Path, typer.Argument(help="A finished SWAP run directory.")],
    points: Annotated[str, typer.Option(help="Three models spanning the plane: LB (phase 1's end), W<k> (worker k), "
                                             "SWAP (the average); e.g. LB,W0,SWAP or W0,W1,W2.")] = "LB,W0,SWAP",
    grid: Annotated[int, typer.Option(min=2, help="Grid points per axis (the paper's figures: about 21).")] = 9,
    bn_samples: Annotated[int, typer.Option(min=1, help="Training images for each point's BN statistics.")] = 500,
    train_samples: Annotated[int, typer.Option(min=1, help="Training images for each point's train error.")] = 1000,
    test_samples: Annotated[int, typer.Option(min=1, help="Test images for each point's test error.")] = 1000,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/landscape).")] = None,
    debug: Debug = False,
) -> None:
    """Train and test error on the plane through three models of a run, BN recomputed at every grid point (paper
    section 4, Figures 2-3): landscape.png and landscape.json. `accelerate launch -m swap_accel landscape` spreads
    the grid over the processes."""
    try:
        from .tools.geometry import LandscapeError
        from .tools.landscape import landscape as run
        from .tools.landscape import model_path

        names = [n.strip() for n in points.split(",")]
        if len(names) != 3 or len(set(names)) != 3:
            raise LandscapeError(f"--points {points!r} must name three different models, e.g. LB,W0,SWAP")
        if not (run_dir / "recipe.yaml").is_file():
            raise LandscapeError(f"{run_dir} is not a run directory (no recipe.yaml); pass the --out of a train run")
        for name in names:
            model_path(run_dir, name)
        result = run(run_dir, names, grid=grid, bn_samples=bn_samples, train_samples=train_samples,
                     test_samples=test_samples, out=out or run_dir / "landscape")
    except _known_errors() as e:
        _fail(str(e), debug)
    if result:
        best = result["best"]
        print(f"landscape of {', '.join(names)}: {grid}x{grid} points on {result['processes']} process(es); best "
              f"test error {100 * best['test_error']:.2f}% at ({best['x']:.3g}, {best['y']:.3g}); "
              + ", ".join(f"{m['name']} {100 * m['test_error']:.2f}%" for m in result["models"])
              + f"; {out or run_dir / 'landscape'}/landscape.png")


@app.command()
def cosine(
    run_dir: Annotated[Path, typer.Argument(help="A finished SWAP run directory.")],
    worker: Annotated[int, typer.Option(min=0, help="The worker whose phase-2 trajectory is followed.")] = 0,
    samples: Annotated[int, typer.Option(min=1, help="Training images per gradient.")] = 2048,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/diagnostics).")] = None,
    debug: Debug = False,
) -> None:
    """Cosine between a worker's descent direction and the direction to the averaged model along its phase 2
    (paper section 4.2, Figure 4), from the worker's checkpoints: record more of them with
    --set checkpoint.every_steps=S --set checkpoint.keep=K when training."""
    try:
        from .tools.cosine import cosine_curve
        from .tools.geometry import LandscapeError

        if not (run_dir / "recipe.yaml").is_file():
            raise LandscapeError(f"{run_dir} is not a run directory (no recipe.yaml); pass the --out of a train run")
        folder = out or run_dir / "diagnostics"
        result = cosine_curve(run_dir, worker, samples, folder)
    except _known_errors() as e:
        _fail(str(e), debug)
    points = result["points"]
    print(f"worker {worker}: {len(points)} points from step {points[0]['step']} to {points[-1]['step']}; cosine "
          + " -> ".join(f"{p['cosine']:.3f}" for p in points) + f"; {folder}/cosine_w{worker}.png")
    if len(points) < 3:
        print("only the start and the end were kept: train with --set checkpoint.every_steps=S --set "
              "checkpoint.keep=K for a curve (cosine.py)")


@app.command()
def transition(
    recipe: Annotated[Path, typer.Argument(help="A SWAP recipe YAML, e.g. recipes/fashion_mnist.yaml")],
    candidates: Annotated[str, typer.Option(help="Training accuracies to try as τ, comma-separated.")] = \
        "0.85,0.88,0.90,0.92",
    overrides: Overrides = None,
    num_processes: Annotated[int, typer.Option(min=1, help="Processes of every launched run.")] = 2,
    config_file: Annotated[Path | None, typer.Option(help="accelerate config for the launches (default: "
                                                          "./accelerate_config.yaml if present).")] = None,
    holdout_samples: Annotated[int | None, typer.Option(min=1, help="Training images held out to choose τ on "
                                                                    "(default: the recipe's data.holdout_samples, "
                                                                    "else 5000).")] = None,
    phase2_epochs: Annotated[int | None, typer.Option(min=1, help="Phase-2 epochs of every candidate (default: "
                                                                  "the recipe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<name>-transition).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start the search over in --out.")] = False,
    debug: Debug = False,
) -> None:
    """Choose τ (paper section 6): one phase-1 run keeps its state at each candidate, a short phase 2 runs from
    each, and τ is recommended by the averaged model's held-out accuracy against parallel-equivalent time; phase 1
    also reports the gradient noise scale B_simple. Run it as a plain command: it launches the runs itself."""
    try:
        from .recipe import load_recipe
        from .tools.transition import parse_candidates, print_report
        from .tools.transition import run as search

        taus = parse_candidates(candidates)
        default_config = Path("accelerate_config.yaml")
        folder = out or Path("runs") / f"{run_dir_for(load_recipe(recipe, overrides or []), None).name}-transition"
        report = search(recipe, overrides or [], taus, folder, num_processes=num_processes,
                        config_file=config_file or (default_config if default_config.is_file() else None),
                        holdout=holdout_samples, phase2_epochs=phase2_epochs, overwrite=overwrite)
    except _known_errors() as e:
        _fail(str(e), debug)
    print_report(report)


@app.command()
def models(pattern: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*'.")] = "*") -> None:
    """List timm model names (swap_accel's resnet9 included)."""
    import timm

    import swap_accel  # noqa: F401  (registers resnet9)

    names = timm.list_models(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    if not names:  # an empty list with exit 0 reads as success; say so, as grep does with its exit status
        print(f"no timm model name matches {pattern!r}; try a wider pattern such as 'resnet*', or none to list all",
              file=sys.stderr)
        raise typer.Exit(1)
    for name in names:
        print(name)


def main() -> None:
    """The console entry point (`swap_accel ...`, `python -m swap_accel ...`, each rank of a launch)."""
    try:
        app()
    except SystemExit as done:  # typer ends every command this way
        if done.code in (None, 0):
            _exit_without_teardown()
        # A failure keeps Python's own exit: its slower teardown is what lets every rank of a launch print its
        # one-line refusal before the launcher stops the others on the first rank's exit.
        raise


def _exit_without_teardown() -> None:
    """Exit 0 as the interpreter would, without its last step. Python joins the non-daemon threads, runs the exit
    handlers (trackers, logging, multiprocessing), flushes the streams, and then frees every module and object one
    by one: over a second per process once torch and its compiler stack are loaded (measured: 0.6 s for torch
    alone, 1.2-1.6 s for what a run imports), paid by every rank of every launch for memory the OS takes back at
    once. This does the first three steps and ends the process."""
    # CPython's own first steps, in its order: threading's exit hooks (they wake idle pool threads, such as
    # inductor's compile workers, which a bare join would wait on for ever), the joins, then the exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    try:
        for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__} - {None}:
            stream.flush()
    except (OSError, ValueError):  # a closed pipe (`swap_accel models | head`): CPython's status for it
        os._exit(120)
    os._exit(0)
