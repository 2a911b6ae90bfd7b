"""`train(recipe, run_dir)`: SWAP as the paper's Algorithm 1, three phases called in order.

Phase 1 trains one data-parallel model with a large batch until the training accuracy reaches τ;
phase 2 lets W workers refine their own copies with no communication between them (a worker is a
process, a group of processes, or one of several trained in turn on a process); phase 3
averages the workers' weights, recomputes BatchNorm statistics and evaluates. `mode: sgd` stops after phase 1
with the full epoch budget: the paper's small- and large-batch baselines through the same code. `mode: swa` is
Table 4's SWA (paper section 5.3) through the same code too: phase 2 with one worker, data-parallel over every
process, whose cyclic-LR samples phase 3 averages.

Setup and finish (where to resume, monitoring, the results files) live in `run_context.RunContext`, results.json's
sections in `results`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .algorithm.evaluate import evaluate_recalibrated, evaluate_shared
from .algorithm.phase1 import Phase1Result, train_phase1
from .algorithm.phase3 import Phase3Result, average_workers_, run_phase3
from .algorithm.workers import Phase2Outcome, run_workers
from .checkpointing.resume import finished_workers, load_result
from .checkpointing.snapshots import finished_sample_states, model_name
from .data.sampling import digest
from .monitoring import tracking
from .parallel.distributed import DistributedError, broadcast_buffers_, flat_state, peers_required
from .parallel.liveness import BEAT_SECONDS, DEAD_AFTER_BEATS, wait_for_all
from .recipe import Recipe
from .results import phase1_results, swap_results
from .run_context import RunContext


def train(recipe: Recipe, run_dir: Path, *, fresh: bool = False) -> dict | None:
    """Run one recipe, resuming from its checkpoints in `run_dir` unless `fresh` (--overwrite); returns
    `results` on the main process (None elsewhere)."""
    run = RunContext.open(recipe, run_dir, fresh=fresh)
    p1 = phase1(run)                                   # synchronized large batch until τ
    results = phase1_results(run, p1, *evaluate_phase1(run, p1))
    if recipe.phase2_runs:
        p2 = phase2(run, results["phase1"])            # W workers, no communication between them
        p3, waited = phase3(run, p2)                   # average the workers, recompute BN statistics
        with run.evaluating():
            final = evaluate_shared(run.module, run.test_loader, run.accelerator)
        results.update(swap_results(run, p1, p2, p3, waited, final))
    return run.finish(results)


def phase1(run: RunContext) -> Phase1Result:
    """Train phase 1, or reload it (finished by this run before it stopped, or by the --from-phase1 run); keep its
    end as checkpoints/p1-end."""
    recipe, module = run.recipe, run.module
    with run.counter.phase("phase1"):
        if run.start.phase1_end is None:
            p1 = train_phase1(run.loop_context, run.model, run.optimizer, recipe.phase1,
                              resume=run.start.phase1_step, noise=run.noise,
                              # The paper's SGD baselines train their whole epoch budget (Tables 5-6: "100 %");
                              # SWA stops at τ when it has one (Table 4, row 2), else it too trains the budget.
                              tau=recipe.phase1.stop_train_accuracy if recipe.phase2_runs else None)
            broadcast_buffers_(module, run.accelerator)
        else:
            p1 = load_result(run.start.phase1_end, module, Phase1Result)
            run.log.phase1_steps, run.log.phase1_epochs = p1.steps, p1.epochs
        if run.accelerator.is_main_process and run.start.phase1_end != run.ckpt.root / "p1-end":
            run.ckpt.save_end(module, "p1-end", "phase1-end", p1.steps,
                              {"result": dataclasses.asdict(p1), "source": str(run.start.phase1_end or run.run_dir)})
    run.rank_record["phase1"] = {"steps": p1.steps, "epochs": p1.epochs, "params": digest(flat_state(module))}
    return p1


def evaluate_phase1(run: RunContext, p1: Phase1Result) -> tuple[float, float | None]:
    """Phase 1's model on the test set, and for the baselines also after phase 3's BN recalibration."""
    # The last logging point may already have evaluated this very model (same weights, rank 0's BN buffers).
    test_acc = p1.history[-1].get("test_acc") if p1.history else None
    with run.evaluating():
        if test_acc is None:
            test_acc, _ = evaluate_shared(run.module, run.test_loader, run.accelerator)
        test_acc_bn = evaluate_recalibrated(run.module, run.recipe, run.train_data, run.test_data, run.accelerator,
                                            loader=run.test_loader) if run.recipe.mode == "sgd" else None
    tracking.log(run.accelerator, {"phase1/test_acc": test_acc}, step=p1.steps)
    scaled = p1.loss_scale and (f", fp16 loss scale {p1.loss_scale['scale']:.0f} ({p1.loss_scale['skipped_steps']} "
                                "overflowing steps skipped)")
    run.say(f"phase 1 done: {p1.epochs} epochs, {p1.steps} steps, {p1.seconds:.1f} s, train acc "
            f"{100 * p1.train_acc:.2f}%, test acc {100 * test_acc:.2f}%{scaled or ''}")
    return test_acc, test_acc_bn


def phase2(run: RunContext, phase1_summary: dict) -> Phase2Outcome:
    """Every worker of this process refines its own copy of phase 1's model (workers.py)."""
    with run.counter.phase("phase2"):
        p2 = run_workers(run, run.start.workers, phase1=phase1_summary,
                         phase1_params=run.rank_record["phase1"]["params"])
    run.rank_record["phase2"] = [{"worker": r.worker, "member": r.member, "steps": r.result.steps, "params": r.params,
                                  "seconds": r.result.seconds, "samples_per_epoch": r.result.samples_per_epoch,
                                  "order_digests": r.result.order_digests} for r in p2.records]
    return p2


def phase3(run: RunContext, p2: Phase2Outcome) -> tuple[Phase3Result, float]:
    """Wait for every process on the run directory, then average the workers' samples and recompute BN statistics
    (phase3.py). Returns phase 3's result and the seconds waited: the workers' skew, which phase 2's time (the
    slowest process's) already counts, so phase 3's clock starts after it."""
    recipe, layout, run_dir = run.recipe, run.layout, run.run_dir
    wait_start = time.perf_counter()
    lost = lambda why: DistributedError(  # noqa: E731  (only built if a peer is gone)
        f"phase 3 averages every worker but {why}; workers {finished_workers(run_dir)} of {layout.workers} "
        f"finished phase 2 ({run_dir}/checkpoints/p2-w*-end); rerun the same command to resume the others, or "
        f"average the finished ones: swap_accel average {run_dir} --recipe RECIPE --out DIR")
    run.heartbeat.arrive("phase3")
    try:
        wait_for_all(run_dir, run.world, "phase3", say=run.say,
                     explain=lambda ranks: f"ranks {ranks} stopped before reaching it (no heartbeat for "
                                           f"{DEAD_AFTER_BEATS * BEAT_SECONDS:.0f} s)")
    except RuntimeError as e:
        raise lost(str(e)) from None
    run.log.drain()  # every worker is done: the tracker gets all rows that were still in flight
    waited = time.perf_counter() - wait_start
    with run.counter.phase("phase3"), peers_required(lambda: str(lost("one is gone"))):
        models = [model_name(k, s) for k in range(layout.workers) for s in range(recipe.phase2.samples_per_worker)]
        p3 = run_phase3(
            run.module, recipe, run.train_data, run.accelerator, models=models, holdout_loader=run.holdout_loader,
            average=lambda: average_workers_(run.module, p2.local_sum, len(models), run.accelerator),
            states=lambda: finished_sample_states(run_dir, layout.workers, recipe.phase2.samples_per_worker,
                                                  run.module, run.accelerator.device))
    return p3, waited
