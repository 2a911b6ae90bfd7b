"""The paper's Table 1 for one or several runs, from their `results.json`, and the parts of results.json
that `train` and `average` share."""

from __future__ import annotations

import platform
import statistics

from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..recipe import Recipe


def run_header(recipe: Recipe, accelerator: Accelerator, mode: str) -> dict:
    """What ran, where, with which resolved recipe: the first keys of every results.json."""
    return {"name": recipe.name, "mode": mode, "version": __version__, "num_processes": accelerator.num_processes,
            "model": recipe.model.name, "device": str(accelerator.device), "platform": platform.platform(),
            "recipe": recipe.model_dump(mode="json")}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def averaging_summary(worker_accs: list[float], final_acc: float, counted: int,
                      worker_accs_bn: list[float] | None = None) -> dict:
    """Table 1's SWAP rows: the workers before averaging (mean, std), also after the same BN recalibration as the
    averaged model (the gain of averaging alone is after - before_bn), and the averaged model after."""
    summary = {"before_averaging": _mean_std(worker_accs),
               "after_averaging": {"test_acc": final_acc, "samples": counted}, "test_acc": final_acc}
    if worker_accs_bn:
        summary["before_averaging_bn"] = _mean_std(worker_accs_bn)
        summary["averaging_gain"] = {"vs_workers": final_acc - summary["before_averaging"]["mean"],
                                     "vs_recalibrated_workers": final_acc - summary["before_averaging_bn"]["mean"]}
    return summary


# What results.json's `training_seconds` mean, written next to them.
TIME_DEFINITIONS = {
    "measured": "equal hardware: phase 1 + phase 2 (its slowest process, workers in turn included) + phase 3, "
                "as this launch ran them on its P processes",
    "parallel_equivalent": "phase 1 and phase 3 as measured on the P processes, phase 2 as its slowest worker alone: "
                           "what W workers would take on W devices (or W groups of processes_per_worker) at once",
}


def training_seconds(phase1: float, phase2_measured: float, slowest_worker: float, phase3: float) -> dict:
    """results.json's two clocks. Phase 3 starts once every process has arrived (train.py), so neither counts the
    workers' skew twice: it is in phase 2's slowest process already."""
    return {"measured": phase1 + phase2_measured + phase3, "parallel_equivalent": phase1 + slowest_worker + phase3,
            "definitions": TIME_DEFINITIONS}


COLUMNS = ("method", "test acc (%)", "measured time (s)", "parallel-equivalent (s)", "critical-path steps")


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """COLUMNS for one run: the time this launch measured on its own processes first (equal hardware), then the
    parallel-equivalent time (TIME_DEFINITIONS)."""
    steps = str(results["critical_path_steps"])
    p1 = results["phase1"]
    if results["mode"] == "sgd":
        label, seconds = f"SGD (batch {results['phase1']['global_batch_size']})", f"{p1['seconds']:.1f}"
        rows = [(label, f"{100 * results['test_acc']:.2f}", seconds, seconds, steps)]
        if p1.get("test_acc_bn") is not None:
            rows.append((f"{label}, BN recomputed", f"{100 * p1['test_acc_bn']:.2f}", seconds, seconds, steps))
        return rows
    p2, p3 = results["phase2"], results["phase3"]["seconds"]
    measured, parallel = p1["seconds"] + p2["seconds"], p1["seconds"] + p2.get("slowest_worker_seconds", p2["seconds"])

    def before(key: str, label: str) -> tuple:
        acc = results[key]
        return (label, f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}", f"{measured:.1f}", f"{parallel:.1f}", steps)

    method = "SWA" if results["mode"] == "swa" else "SWAP"  # Table 4's SWA rows, same columns
    rows = [before("before_averaging", f"{method} (before averaging)")]
    if results.get("before_averaging_bn"):
        rows.append(before("before_averaging_bn", f"{method} (before averaging, BN recomputed)"))
    return rows + [(f"{method} (after averaging)", f"{100 * results['after_averaging']['test_acc']:.2f}",
                    f"{measured + p3:.1f}", f"{parallel + p3:.1f}", steps)]


def print_table(runs: list[dict], console: Console | None = None) -> None:
    table = Table(title="Test accuracy and training time (paper Table 1 layout)")
    for column in ("run", *COLUMNS):
        table.add_column(column, no_wrap=True)
    for results in runs:
        for row in table_rows(results):
            table.add_row(results.get("name", ""), *row)
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: no wrapping at the 80-column default
    console.print(table)
