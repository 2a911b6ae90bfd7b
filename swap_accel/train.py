"""`train(recipe, run_dir)`: SWAP as the paper's Algorithm 1, three phases called in order.

Phase 1 trains one data-parallel model with a large batch until the training accuracy reaches τ;
phase 2 lets every process refine its own copy with no communication; phase 3 averages the
workers' weights, recomputes BatchNorm statistics and evaluates. `mode: sgd` stops after phase 1
with the full epoch budget: the paper's small- and large-batch baselines through the same code.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from . import __version__, figure, tracking
from .bn import recalibrate_bn_
from .checkpoints import save_weights, sha256_file, write_json, write_text
from .data import load_data
from .distributed import (
    CollectiveCounter,
    average_parameters_,
    broadcast_buffers_,
    gather_values,
    make_accelerator,
    peers_optional,
    peers_required,
)
from .evaluate import evaluate_local, evaluate_shared
from .models import build_model
from .monitor import Monitor
from .phase1 import Phase1Result, train_phase1
from .phase2 import Phase2Result, make_sgd, train_phase2
from .progress import Progress
from .recipe import Recipe, dump_recipe
from .report import averaging_summary, print_table, run_header, table_rows
from .resume import Checkpointer, discard_checkpoints, find_start, finished_workers, load_result, phase2_position
from .sampling import digest

# phase2_logging and averaged_curve are issue 3's monitoring, counted apart so phase 2 itself stays at zero.
PHASES = ("setup", "phase1", "phase2", "phase2_logging", "averaged_curve", "phase3", "evaluation", "report")


def _params_digest(module: torch.nn.Module) -> str:
    return digest(torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()]))


def train(recipe: Recipe, run_dir: Path, *, fresh: bool = False) -> dict | None:
    """Run one recipe, resuming from its checkpoints in `run_dir` unless `fresh` (--overwrite); returns
    `results` on the main process (None elsewhere)."""
    started = time.perf_counter()
    accelerator = make_accelerator(recipe.mixed_precision, log_with=tracking.log_with(recipe.tracking),
                                   project_dir=str(run_dir / "tensorboard"))
    counter = CollectiveCounter().install()
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(recipe.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        if fresh:
            discard_checkpoints(run_dir)
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    if fresh:
        accelerator.wait_for_everyone()  # nobody looks for checkpoints to resume before they are gone

    train_data = load_data(recipe.data, accelerator.device, split="train")
    test_data = load_data(recipe.data, accelerator.device, split="test")
    module = build_model(recipe.model.name, in_chans=train_data.in_chans, num_classes=train_data.num_classes,
                         kwargs=recipe.model.kwargs)
    if recipe.model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if recipe.model.compile:
        module.compile()  # nn.Module.compile: DDP, phase 2, BN recalibration and evaluation all use it
    model, optimizer = accelerator.prepare(module, make_sgd(module, recipe.optimizer, recipe.phase1.lr.peak))
    counter.watch_ddp(model)
    test_loader = accelerator.prepare(test_data.eval_loader(recipe.eval.batch_size))
    module = accelerator.unwrap_model(model)
    tracking.start(accelerator, recipe, run_dir)
    log = Monitor(accelerator, recipe, counter, module, train_data, test_data, test_loader, Progress(accelerator))
    accelerator.print(
        f"swap_accel {__version__}: {recipe.mode} | {recipe.model.name} on {train_data.num_samples} train / "
        f"{test_data.num_samples} test samples | {world} process(es) on {accelerator.device} "
        f"({accelerator.distributed_type.value}, {torch.get_num_threads()} threads each) | run dir {run_dir}",
        flush=True,
    )
    # Issue 4: re-running the same command continues from the newest good checkpoint of each part.
    ckpt = Checkpointer(run_dir, recipe, accelerator)
    start = find_start(run_dir, recipe, rank, accelerator.is_main_process)

    # Phase 1: synchronized large-batch training to τ.
    with counter.phase("phase1"):
        if start.phase1_end is None:
            p1 = train_phase1(model, optimizer, train_data, recipe.phase1, recipe.optimizer, accelerator,
                              seed=recipe.seed, log=log, ckpt=ckpt, resume=start.phase1_step,
                              # The paper's SGD baselines train their whole epoch budget (Tables 5-6: "100 %").
                              tau=recipe.phase1.stop_train_accuracy if recipe.mode == "swap" else None)
            broadcast_buffers_(module, accelerator)
        else:  # finished before: by this run, or by the --from-phase1 run
            p1 = load_result(start.phase1_end, module, Phase1Result)
            log.phase1_steps, log.phase1_epochs = p1.steps, p1.epochs
        if accelerator.is_main_process and start.phase1_end != ckpt.root / "p1-end":
            ckpt.save_end(module, "p1-end", "phase1-end", p1.steps,
                          {"result": dataclasses.asdict(p1), "source": str(start.phase1_end or run_dir)})
    rank_record = {"rank": rank, "phase1": {"steps": p1.steps, "epochs": p1.epochs, "params": _params_digest(module)}}
    eval_start = time.perf_counter()
    # The last logging point may already have evaluated this very model (same weights, rank 0's BN buffers).
    p1_test_acc = p1.history[-1].get("test_acc") if p1.history else None
    if p1_test_acc is None:
        with counter.phase("evaluation"):
            p1_test_acc, _ = evaluate_shared(module, test_loader, accelerator)
    eval_seconds = time.perf_counter() - eval_start
    tracking.log(accelerator, {"phase1/test_acc": p1_test_acc}, step=p1.steps)
    accelerator.print(f"phase 1 done: {p1.epochs} epochs, {p1.steps} steps, {p1.seconds:.1f} s, "
                      f"train acc {100 * p1.train_acc:.2f}%, test acc {100 * p1_test_acc:.2f}%", flush=True)
    results = {
        **run_header(recipe, accelerator, recipe.mode),
        # Table 1 times exclude issue 3's monitoring at logging points (reported as monitoring_seconds).
        "phase1": {"epochs": p1.epochs, "steps": p1.steps, "seconds": p1.seconds,
                   "monitoring_seconds": log.seconds["phase1"], "train_acc": p1.train_acc,
                   "train_loss": p1.train_loss, "reached_tau": p1.reached_tau, "test_acc": p1_test_acc,
                   "global_batch_size": recipe.phase1.global_batch_size, "history": p1.history},
        "phase2": None, "phase3": None, "workers": [], "before_averaging": None, "after_averaging": None,
        "test_acc": p1_test_acc, "critical_path_steps": p1.steps,
    }

    if recipe.mode == "swap":
        # Phase 2: independent small-batch refinement, one worker per process, no communication.
        # Issue 3 logs phase 2 with one gather per epoch end. A resumed worker first replays the rows it logged
        # before (with the accuracies measured then): every worker then makes exactly one gather per epoch, in
        # order, whichever epoch it resumes at, and the resumed run's curves cover the whole of phase 2.
        own_epoch, rows = phase2_position(start, recipe.phase2.epochs)
        with counter.phase("phase2"), peers_optional(f"worker {rank}"):
            for row in rows[:own_epoch]:
                log(dict(row))
            if start.worker_end is None:
                p2 = train_phase2(module, train_data, recipe.phase2, recipe.optimizer, accelerator,
                                  seed=recipe.seed, worker=rank, log=log, ckpt=ckpt, resume=start.worker_step)
            else:  # this worker finished before the run stopped
                p2 = load_result(start.worker_end, module, Phase2Result)
        rank_record["phase2"] = {"steps": p2.steps, "params": _params_digest(module),
                                 "samples_per_epoch": p2.samples_per_epoch, "order_digests": p2.order_digests}
        eval_start = time.perf_counter()
        worker_acc = p2.history[-1].get("test_acc")  # evaluated at the last logging point, if it was due
        if worker_acc is None:
            with counter.phase("evaluation"):
                worker_acc = evaluate_local(module, test_data, recipe.eval.batch_size, accelerator)
        eval_seconds += time.perf_counter() - eval_start
        (run_dir / "workers").mkdir(exist_ok=True)
        save_weights(run_dir / "workers" / f"worker{rank}.safetensors", module,
                     {"worker": str(rank), "phase2_steps": str(p2.steps), "test_acc": str(worker_acc)})
        if start.worker_end is None:  # what `swap_accel average` needs to use this worker without the others
            ckpt.save_end(module, f"p2-w{rank}-end", "phase2-end", p2.steps,
                          {"worker": rank, "test_acc": worker_acc, "result": dataclasses.asdict(p2),
                           "phase1": results["phase1"], "phase1_params": rank_record["phase1"]["params"]})

        # Phase 3: average the workers' weights, recompute BN statistics, evaluate.
        p3_start = time.perf_counter()
        lost = lambda: (  # noqa: E731  (only evaluated if a peer is gone)
            f"phase 3 averages every worker but one is gone; workers {finished_workers(run_dir)} of {world} finished "
            f"phase 2 ({run_dir}/checkpoints/p2-w*-end); rerun the same command to resume the others, or average "
            f"the finished ones: swap_accel average {run_dir} --recipe RECIPE --out DIR")
        with counter.phase("phase3"), peers_required(lost):
            averaged = average_parameters_(module, accelerator)
            bn = recalibrate_bn_(module, train_data, accelerator, samples=recipe.eval.bn_samples,
                                 batch_size=recipe.eval.bn_batch_size, seed=recipe.seed)
        p3_seconds = time.perf_counter() - p3_start
        eval_start = time.perf_counter()
        with counter.phase("evaluation"):
            final_acc, counted = evaluate_shared(module, test_loader, accelerator)
        eval_seconds += time.perf_counter() - eval_start
        log.final_point(final_acc)
        with counter.phase("report"):
            per_worker = gather_values(torch.tensor([worker_acc, p2.train_acc], device=accelerator.device), accelerator)
        accs = per_worker[:, 0].tolist()
        results.update({
            "phase2": {"epochs": p2.epochs, "steps_per_worker": p2.steps, "seconds": p2.seconds,
                       "monitoring_seconds": log.seconds["phase2"],
                       "per_worker_batch_size": recipe.phase2.per_worker_batch_size, "history": p2.history,
                       "workers_history": log.worker_history},
            "averaged_curve": log.curve_summary(),
            "phase3": {"seconds": p3_seconds, "averaged_values": averaged, "bn": bn},
            "workers": [{"index": i, "test_acc": a, "train_acc": t} for i, (a, t) in enumerate(per_worker.tolist())],
            **averaging_summary(accs, final_acc, counted),
            "critical_path_steps": p1.steps + p2.steps,
        })

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
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    save_weights(run_dir / "model.safetensors", module, {"name": recipe.name, "test_acc": str(results["test_acc"])})
    results["model_sha256"] = sha256_file(run_dir / "model.safetensors")  # results.json, written last, vouches for it
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
