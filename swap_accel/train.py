"""`train(recipe, run_dir)`: SWAP as the paper's Algorithm 1, three phases called in order.

Phase 1 trains one data-parallel model with a large batch until the training accuracy reaches τ;
phase 2 lets W workers refine their own copies with no communication between them (a worker is a
process, a group of processes, or one of several trained in turn on a process); phase 3
averages the workers' weights, recomputes BatchNorm statistics and evaluates. `mode: sgd` stops after phase 1
with the full epoch budget: the paper's small- and large-batch baselines through the same code. `mode: swa` is
Table 4's SWA (paper section 5.3) through the same code too: phase 2 with one worker, data-parallel over every
process, whose cyclic-LR samples phase 3 averages.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from . import __version__, figure, tracking
from .checkpoints import save_weights, weights_identity, write_json, write_text
from .counting import CollectiveCounter
from .data import load_data
from .distributed import (
    DistributedError,
    broadcast_buffers_,
    broadcast_object,
    flat_state,
    gather_values,
    make_accelerator,
    make_worker_group,
    peers_required,
)
from .evaluate import evaluate_recalibrated, evaluate_shared
from .liveness import BEAT_SECONDS, DEAD_AFTER_BEATS, Heartbeat, wait_for_all
from .models import build_model
from .monitor import Monitor
from .noise_scale import GradientNoise
from .phase1 import Phase1Result, train_phase1, warn_ghost_batchnorm
from .phase2 import make_sgd
from .phase3 import average_workers_, run_phase3
from .progress import Progress
from .recipe import Recipe, dump_recipe
from .report import averaging_summary, print_table, run_header, table_rows, training_seconds
from .resume import Checkpointer, find_start, finished_workers, load_result
from .rundir import discard_outputs
from .sampling import digest
from .snapshots import finished_sample_states, model_name
from .workers import gathered_rows, run_workers

# averaged_curve is the opt-in Figure-1 curve of the averaged model, counted apart so phase 2 itself stays at
# zero; phase2_in_group counts a worker group's own data-parallel collectives, never crossing workers.
PHASES = ("setup", "phase1", "phase2", "phase2_in_group", "averaged_curve", "phase3", "evaluation", "report")


def train(recipe: Recipe, run_dir: Path, *, fresh: bool = False) -> dict | None:
    """Run one recipe, resuming from its checkpoints in `run_dir` unless `fresh` (--overwrite); returns
    `results` on the main process (None elsewhere)."""
    started = time.perf_counter()
    accelerator = make_accelerator(recipe.mixed_precision, log_with=tracking.log_with(recipe.tracking),
                                   project_dir=str(run_dir / "tensorboard"),
                                   timeout_minutes=recipe.collective_timeout_minutes, loss_scale=recipe.loss_scale)
    counter = CollectiveCounter().install()
    rank, world = accelerator.process_index, accelerator.num_processes
    layout = recipe.worker_layout(world) if recipe.phase2_runs else None
    # Worker groups exist before phase 1, made once and identically on every rank.
    group = make_worker_group(layout, rank, counter) if layout else None
    set_seed(recipe.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        if fresh:
            discard_outputs(run_dir)
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    if fresh:
        accelerator.wait_for_everyone()  # nobody looks for checkpoints to resume before they are gone
    # Phase 3 meets every process; before it, they wait for each other on the run directory, not in a
    # collective that would hang on a dead peer (liveness.py). Started before any collective below.
    heartbeat = Heartbeat(run_dir, rank) if layout else None

    train_data = load_data(recipe.data, accelerator.device, split="train")
    recipe.check_data(train_data.num_samples)  # also in the CLI's preflight; here for train() called directly
    test_data = load_data(recipe.data, accelerator.device, split="test")
    module = build_model(recipe.model.name, in_chans=train_data.in_chans, num_classes=train_data.num_classes,
                         kwargs=recipe.model.kwargs, image_size=train_data.image_size)
    if recipe.model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if recipe.model.compile:
        module.compile()  # nn.Module.compile: DDP, phase 2, BN recalibration and evaluation all use it
    model, optimizer = accelerator.prepare(module, make_sgd(module, recipe.optimizer, recipe.phase1.lr.peak,
                                                                   fp16=recipe.mixed_precision == "fp16"))
    # Phase 1's comm hook also measures the gradient noise scale. Not with fp16: its gradients carry
    # the loss scale, which changes at skips and growths, and overflow to inf.
    noise = None if recipe.mixed_precision == "fp16" else GradientNoise.attach(model)
    if noise is None:
        counter.watch_ddp(model)
    test_loader = accelerator.prepare(test_data.eval_loader(recipe.eval.batch_size))
    # A held-out split of the training data, for choices that must not look at the test set.
    holdout_loader = None if recipe.data.holdout_samples is None else accelerator.prepare(
        load_data(recipe.data, accelerator.device, split="holdout").eval_loader(recipe.eval.batch_size))
    module = accelerator.unwrap_model(model)
    tracking.start(accelerator, recipe, run_dir)
    log = Monitor(accelerator, recipe, counter, module, train_data, test_data, test_loader, Progress(accelerator),
                  layout, group, run_dir)
    accelerator.print(
        f"swap_accel {__version__}: {recipe.mode} | {recipe.model.name} on {train_data.num_samples} train / "
        f"{test_data.num_samples} test samples | {world} process(es) on {accelerator.device} "
        f"({accelerator.distributed_type.value}, {torch.get_num_threads()} threads each)"
        f"{f' | phase 2: {layout.describe()}' if layout else ''} | run dir {run_dir}",
        flush=True,
    )
    warn_ghost_batchnorm(recipe, module, world, accelerator)
    # Re-running the same command continues from the newest good checkpoint of each part.
    ckpt = Checkpointer(run_dir, recipe, accelerator)
    # Rank 0 decides where the run resumes and tells the others: every rank starts at the same step.
    start = broadcast_object(find_start(run_dir, recipe) if accelerator.is_main_process else None, accelerator)

    # Phase 1: synchronized large-batch training to τ.
    with counter.phase("phase1"):
        if start.phase1_end is None:
            p1 = train_phase1(model, optimizer, train_data, recipe.phase1, recipe.optimizer, accelerator,
                              seed=recipe.seed, log=log, ckpt=ckpt, resume=start.phase1_step, noise=noise,
                              # The paper's SGD baselines train their whole epoch budget (Tables 5-6: "100 %");
                              # SWA stops at τ when it has one (Table 4, row 2), else it too trains the budget.
                              tau=recipe.phase1.stop_train_accuracy if recipe.phase2_runs else None)
            broadcast_buffers_(module, accelerator)
        else:  # finished before: by this run, or by the --from-phase1 run
            p1 = load_result(start.phase1_end, module, Phase1Result)
            log.phase1_steps, log.phase1_epochs = p1.steps, p1.epochs
        if accelerator.is_main_process and start.phase1_end != ckpt.root / "p1-end":
            ckpt.save_end(module, "p1-end", "phase1-end", p1.steps,
                          {"result": dataclasses.asdict(p1), "source": str(start.phase1_end or run_dir)})
    rank_record = {"rank": rank, "phase1": {"steps": p1.steps, "epochs": p1.epochs,
                                            "params": digest(flat_state(module))}}
    eval_start = time.perf_counter()
    # The last logging point may already have evaluated this very model (same weights, rank 0's BN buffers).
    p1_test_acc = p1.history[-1].get("test_acc") if p1.history else None
    if p1_test_acc is None:
        with counter.phase("evaluation"):
            p1_test_acc, _ = evaluate_shared(module, test_loader, accelerator)
    if recipe.mode == "sgd":  # the baselines also after phase 3's BN recalibration
        with counter.phase("evaluation"):
            p1_test_acc_bn = evaluate_recalibrated(module, recipe, train_data, test_data, accelerator,
                                                   loader=test_loader)
    eval_seconds = time.perf_counter() - eval_start
    tracking.log(accelerator, {"phase1/test_acc": p1_test_acc}, step=p1.steps)
    scaled = p1.loss_scale and (f", fp16 loss scale {p1.loss_scale['scale']:.0f} ({p1.loss_scale['skipped_steps']} "
                                "overflowing steps skipped)")
    accelerator.print(f"phase 1 done: {p1.epochs} epochs, {p1.steps} steps, {p1.seconds:.1f} s, "
                      f"train acc {100 * p1.train_acc:.2f}%, test acc {100 * p1_test_acc:.2f}%{scaled or ''}",
                      flush=True)
    results = {
        **run_header(recipe, accelerator, recipe.mode),
        # Table 1 times exclude the monitoring at logging points (reported as monitoring_seconds).
        "phase1": {"epochs": p1.epochs, "steps": p1.steps, "seconds": p1.seconds,
                   "monitoring_seconds": log.seconds["phase1"], "train_acc": p1.train_acc,
                   "train_loss": p1.train_loss, "reached_tau": p1.reached_tau, "test_acc": p1_test_acc,
                   "test_acc_bn": p1_test_acc_bn if recipe.mode == "sgd" else None,
                   "global_batch_size": recipe.phase1.global_batch_size, "loss_scale": p1.loss_scale,
                   "noise_scale": p1.history[-1].get("noise_scale") if p1.history else None,
                   "history": p1.history},
        "phase2": None, "phase3": None, "workers": [], "before_averaging": None, "after_averaging": None,
        "test_acc": p1_test_acc, "holdout_acc": None, "critical_path_steps": p1.steps,
    }

    if recipe.phase2_runs:
        # Phase 2: W workers refine their own copies; nothing crosses between workers.
        with counter.phase("phase2"):
            p2 = run_workers(module, recipe, layout, group, accelerator=accelerator, train_data=train_data,
                             test_data=test_data, log=log, ckpt=ckpt, counter=counter, run_dir=run_dir,
                             phase1=results["phase1"], phase1_params=rank_record["phase1"]["params"],
                             started=start.workers)
        rank_record["phase2"] = [{"worker": r.worker, "member": r.member, "steps": r.result.steps, "params": r.params,
                                  "seconds": r.result.seconds, "samples_per_epoch": r.result.samples_per_epoch,
                                  "order_digests": r.result.order_digests} for r in p2.records]

        # Phase 3: average the workers' weights, recompute BN statistics, evaluate.
        wait_start = time.perf_counter()
        lost = lambda why: DistributedError(  # noqa: E731  (only built if a peer is gone)
            f"phase 3 averages every worker but {why}; workers {finished_workers(run_dir)} of {layout.workers} "
            f"finished phase 2 ({run_dir}/checkpoints/p2-w*-end); rerun the same command to resume the others, or "
            f"average the finished ones: swap_accel average {run_dir} --recipe RECIPE --out DIR")
        heartbeat.arrive("phase3")
        try:
            wait_for_all(run_dir, world, "phase3", say=lambda m: accelerator.print(m, flush=True),
                         explain=lambda ranks: f"ranks {ranks} stopped before reaching it (no heartbeat for "
                                               f"{DEAD_AFTER_BEATS * BEAT_SECONDS:.0f} s)")
        except RuntimeError as e:
            raise lost(str(e)) from None
        log.drain()  # every worker is done: the tracker gets all rows that were still in flight
        # Phase 3's clock starts once every process is here: the wait is the workers' skew, which phase 2's time
        # (the slowest process's) already counts.
        p3_wait = time.perf_counter() - wait_start
        with counter.phase("phase3"), peers_required(lambda: str(lost("one is gone"))):
            models = [model_name(k, s) for k in range(layout.workers) for s in range(recipe.phase2.samples_per_worker)]
            p3 = run_phase3(
                module, recipe, train_data, accelerator, models=models, holdout_loader=holdout_loader,
                average=lambda: average_workers_(module, p2.local_sum, len(models), accelerator),
                states=lambda: finished_sample_states(run_dir, layout.workers, recipe.phase2.samples_per_worker,
                                                      module, accelerator.device))
        eval_start = time.perf_counter()
        with counter.phase("evaluation"):
            final_acc, counted = evaluate_shared(module, test_loader, accelerator)
        eval_seconds += time.perf_counter() - eval_start
        log.final_point(final_acc, p1.epochs + p2.records[0].result.epochs, p1.steps + p2.records[0].result.steps)
        with counter.phase("report"):
            workers, histories = gathered_rows(p2.records, accelerator)
            # Measured: the slowest process's phase 2, stragglers included.
            p2_wall = gather_values(torch.tensor([p2.seconds], dtype=torch.float64, device=accelerator.device),
                                    accelerator).max().item()
        first = p2.records[0].result
        slowest = max(w["seconds"] for w in workers)
        results.update({
            "phase2": {"epochs": first.epochs, "steps_per_worker": first.steps, "seconds": p2_wall,
                       "slowest_worker_seconds": slowest, "monitoring_seconds": log.seconds["phase2"],
                       "workers": layout.workers, "processes_per_worker": layout.processes_per_worker,
                       "workers_per_process": layout.workers_per_process,
                       "per_worker_batch_size": recipe.phase2.per_worker_batch_size,
                       "samples_per_worker": recipe.phase2.samples_per_worker, "history": first.history,
                       "workers_history": log.workers_history(histories)},
            "averaged_curve": log.curve_summary(),
            "phase3": {**p3.summary(), "wait_seconds": p3_wait},
            "workers": workers,
            **averaging_summary([w["test_acc"] for w in workers], final_acc, counted,
                                [w["test_acc_bn"] for w in workers]),
            "training_seconds": training_seconds(p1.seconds, p2_wall, slowest, p3.seconds),
            "critical_path_steps": p1.steps + first.steps,
        })

    if holdout_loader is not None:  # the final model (the average, or the baseline) on held-out images
        with counter.phase("evaluation"):
            results["holdout_acc"], _ = evaluate_shared(module, holdout_loader, accelerator)
    # Collective counts of every rank (counted, not assumed); this gather itself is in "report".
    with counter.phase("report"):
        calls = torch.tensor([[counter.calls[p], counter.bytes[p]] for p in PHASES], device=accelerator.device)
        all_calls = gather_values(calls, accelerator)
    rank_record["collectives"] = counter.summary()
    rank_record["resumed_from"] = results["resumed_from"] = start.describe()
    (run_dir / "ranks").mkdir(exist_ok=True)
    write_json(run_dir / "ranks" / f"rank{rank}.json", rank_record)
    counter.uninstall()
    results["collectives"] = {p: {"calls": int(all_calls[:, i, 0].max()), "bytes": int(all_calls[:, i, 1].max())}
                              for i, p in enumerate(PHASES)}
    results["evaluation_seconds"] = eval_seconds
    results["total_seconds"] = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if heartbeat:
        heartbeat.stop()
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    save_weights(run_dir / "model.safetensors", module, {"name": recipe.name, "test_acc": str(results["test_acc"])})
    results.update(weights_identity(run_dir / "model.safetensors"))  # results.json, written last, vouches for it
    log.progress.close()
    results["figure"] = figure.save(results, run_dir / "figure1.png").name
    write_json(run_dir / "results.json", results)
    print_table([results])
    if results["phase2"]:
        curve = results["averaged_curve"]
        accelerator.print(f"averaged-model curve ({curve['setting']}): {len(curve['points'])} point(s), "
                          f"{curve['seconds']:.1f} s extra ({100 * curve['seconds'] / results['total_seconds']:.1f}% "
                          f"of the run); Figure 1: {run_dir / results['figure']}", flush=True)
    tracking.finish(accelerator, recipe, results, table_rows(results), run_dir / results["figure"])
    accelerator.end_training()
    return results
