"""The paper's Table 1 for one or several runs, from their `results.json`, and the parts of results.json
that `train` and `average` share."""

from __future__ import annotations

import platform
import statistics

from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from . import __version__
from .recipe import Recipe


def run_header(recipe: Recipe, accelerator: Accelerator, mode: str) -> dict:
    """What ran, where, with which resolved recipe: the first keys of every results.json."""
    return {"name": recipe.name, "mode": mode, "version": __version__, "num_processes": accelerator.num_processes,
            "model": recipe.model.name, "device": str(accelerator.device), "platform": platform.platform(),
            "recipe": recipe.model_dump(mode="json")}


def averaging_summary(worker_accs: list[float], final_acc: float, counted: int) -> dict:
    """Table 1's SWAP rows: the workers before averaging (mean, std) and the averaged model after."""
    return {"before_averaging": {"mean": statistics.fmean(worker_accs),
                                 "std": statistics.stdev(worker_accs) if len(worker_accs) > 1 else 0.0},
            "after_averaging": {"test_acc": final_acc, "samples": counted}, "test_acc": final_acc}


COLUMNS = ("method", "test acc (%)", "train time (s)", "parallel-equivalent (s)", "critical-path steps")


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """COLUMNS for one run. Train time is what this launch measured; parallel-equivalent is phase 1 + the slowest
    single worker + phase 3, what W devices would take when several workers ran in turn here (issue 9)."""
    steps = str(results["critical_path_steps"])
    p1 = results["phase1"]
    if results["mode"] == "sgd":
        label, seconds = f"SGD (batch {results['phase1']['global_batch_size']})", f"{p1['seconds']:.1f}"
        return [(label, f"{100 * results['test_acc']:.2f}", seconds, seconds, steps)]
    p2, p3 = results["phase2"], results["phase3"]["seconds"]
    before = results["before_averaging"]
    measured, parallel = p1["seconds"] + p2["seconds"], p1["seconds"] + p2.get("slowest_worker_seconds", p2["seconds"])
    return [
        ("SWAP (before averaging)", f"{100 * before['mean']:.2f} ± {100 * before['std']:.2f}", f"{measured:.1f}",
         f"{parallel:.1f}", steps),
        ("SWAP (after averaging)", f"{100 * results['after_averaging']['test_acc']:.2f}", f"{measured + p3:.1f}",
         f"{parallel + p3:.1f}", steps),
    ]


def print_table(runs: list[dict], console: Console | None = None) -> None:
    table = Table(title="Test accuracy and training time (paper Table 1 layout)")
    for column in ("run", *COLUMNS):
        table.add_column(column, no_wrap=True)
    for results in runs:
        for row in table_rows(results):
            table.add_row(results.get("name", ""), *row)
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # logs and CI: no wrapping at the 80-column default
    console.print(table)
