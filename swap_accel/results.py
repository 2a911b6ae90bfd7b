"""results.json's sections, assembled in one place: phase 1's (every mode), then the workers' and the average's
(SWAP and SWA). `run_context.RunContext.finish` adds the counts and times of the whole run and writes the file."""

from __future__ import annotations

import torch

from .algorithm.phase1 import Phase1Result
from .algorithm.phase3 import Phase3Result
from .algorithm.workers import Phase2Outcome, gathered_rows
from .monitoring.report import averaging_summary, run_header, training_seconds
from .parallel.distributed import gather_values
from .run_context import RunContext


def phase1_results(run: RunContext, p1: Phase1Result, test_acc: float, test_acc_bn: float | None) -> dict:
    """Every key of results.json after phase 1; a baseline's are final (its test_acc is phase 1's)."""
    recipe = run.recipe
    return {
        **run_header(recipe, run.accelerator, recipe.mode),
        # Table 1 times exclude the monitoring at logging points (reported as monitoring_seconds).
        "phase1": {"epochs": p1.epochs, "steps": p1.steps, "seconds": p1.seconds,
                   "monitoring_seconds": run.log.seconds["phase1"], "train_acc": p1.train_acc,
                   "train_loss": p1.train_loss, "reached_tau": p1.reached_tau, "test_acc": test_acc,
                   "test_acc_bn": test_acc_bn, "global_batch_size": recipe.phase1.global_batch_size,
                   "loss_scale": p1.loss_scale,
                   "noise_scale": p1.history[-1].get("noise_scale") if p1.history else None,
                   "history": p1.history},
        "phase2": None, "phase3": None, "workers": [], "before_averaging": None, "after_averaging": None,
        "test_acc": test_acc, "holdout_acc": None, "critical_path_steps": p1.steps,
    }


def swap_results(run: RunContext, p1: Phase1Result, p2: Phase2Outcome, p3: Phase3Result, waited: float,
                 final: tuple[float, int]) -> dict:
    """The workers' numbers, gathered once from every process, and the averaged model's (`final`: its test accuracy
    and the samples counted): the keys phase 2 and 3 add to results.json."""
    recipe, layout, log = run.recipe, run.layout, run.log
    final_acc, counted = final
    first = p2.records[0].result
    log.final_point(final_acc, p1.epochs + first.epochs, p1.steps + first.steps)
    with run.counter.phase("report"):
        workers, histories = gathered_rows(p2.records, run.accelerator)
        # Measured: the slowest process's phase 2, stragglers included.
        p2_wall = gather_values(torch.tensor([p2.seconds], dtype=torch.float64, device=run.accelerator.device),
                                run.accelerator).max().item()
    slowest = max(w["seconds"] for w in workers)
    return {
        "phase2": {"epochs": first.epochs, "steps_per_worker": first.steps, "seconds": p2_wall,
                   "slowest_worker_seconds": slowest, "monitoring_seconds": log.seconds["phase2"],
                   "workers": layout.workers, "processes_per_worker": layout.processes_per_worker,
                   "workers_per_process": layout.workers_per_process,
                   "per_worker_batch_size": recipe.phase2.per_worker_batch_size,
                   "samples_per_worker": recipe.phase2.samples_per_worker, "history": first.history,
                   "workers_history": log.workers_history(histories)},
        "averaged_curve": log.curve_summary(),
        "phase3": {**p3.summary(), "wait_seconds": waited},
        "workers": workers,
        **averaging_summary([w["test_acc"] for w in workers], final_acc, counted,
                            [w["test_acc_bn"] for w in workers]),
        "training_seconds": training_seconds(p1.seconds, p2_wall, slowest, p3.seconds),
        "critical_path_steps": p1.steps + first.steps,
    }
