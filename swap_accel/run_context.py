"""What one training run holds from its first step to its results: the setup before phase 1 and the finish after
phase 3, so that `train()` reads as the paper's Algorithm 1 and the phases take one argument.

Setup makes the accelerator and the worker groups (identically on every rank, before phase 1), the data, the model
and its optimizer, the loaders, the monitor and the checkpointer, and decides (on rank 0, for all) where the run
resumes. Finish writes what every rank measured (ranks/rank<r>.json), then on the main process the model, results.json
(last: it vouches for the files before it), Figure 1 and the tracker's summary.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import __version__
from .algorithm.evaluate import evaluate_shared
from .algorithm.loop import LoopContext, make_sgd
from .algorithm.noise_scale import GradientNoise
from .algorithm.phase1 import warn_ghost_batchnorm
from .checkpointing.files import save_weights, weights_identity, write_json, write_text
from .checkpointing.resume import Start, find_start
from .checkpointing.rundir import discard_outputs
from .checkpointing.saver import Checkpointer
from .data.loading import load_data
from .data.sources import DataSource
from .models import build_model, compile_in_place
from .monitoring import tracking
from .monitoring.monitor import Monitor
from .monitoring.progress import Progress
from .monitoring.report import print_table, table_rows
from .parallel.counting import CollectiveCounter
from .parallel.distributed import broadcast_object, gather_values, make_accelerator, make_worker_group
from .parallel.liveness import Heartbeat
from .recipe import Recipe, dump_recipe
from .topology import WorkerLayout

# averaged_curve is the opt-in Figure-1 curve of the averaged model, counted apart so phase 2 itself stays at
# zero; phase2_in_group counts a worker group's own data-parallel collectives, never crossing workers.
PHASES = ("setup", "phase1", "phase2", "phase2_in_group", "averaged_curve", "phase3", "evaluation", "report")


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    counter: CollectiveCounter
    layout: WorkerLayout | None  # None for the SGD baselines, which have no phase 2
    group: object                # this process's worker group (None: a worker of one process, or no phase 2)
    heartbeat: Heartbeat | None
    train_data: DataSource
    test_data: DataSource
    module: torch.nn.Module      # the model's weights, unwrapped
    model: torch.nn.Module       # phase 1's data-parallel wrapper of `module`
    optimizer: torch.optim.Optimizer
    noise: GradientNoise | None
    test_loader: object
    holdout_loader: object | None
    log: Monitor
    ckpt: Checkpointer
    start: Start                 # where this launch resumes
    started: float = field(default_factory=time.perf_counter)
    eval_seconds: float = 0.0
    rank_record: dict = field(default_factory=dict)  # this rank's digests and counts: ranks/rank<r>.json

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def loop_context(self) -> LoopContext:
        """What phase 1's and the workers' loops read of this run."""
        return LoopContext(self.accelerator, self.train_data, self.recipe.optimizer, self.recipe.seed, self.log,
                           self.ckpt)

    def say(self, message: str) -> None:
        self.accelerator.print(message, flush=True)

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation's collectives and seconds, kept apart from training's (Table 1 times exclude them)."""
        begun = time.perf_counter()
        with self.counter.phase("evaluation"):
            yield
        self.eval_seconds += time.perf_counter() - begun

    @classmethod
    def open(cls, recipe: Recipe, run_dir: Path, *, fresh: bool) -> RunContext:
        """Everything before phase 1; `fresh` (--overwrite) first removes the old outputs."""
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

        train_data = load_data(recipe.data, accelerator.device, split="train", resized=recipe.resized_sides)
        recipe.check_data(train_data.num_samples)  # also in the CLI's preflight; here for train() called directly
        test_data = load_data(recipe.data, accelerator.device, split="test")
        module = build_model(recipe.model.name, in_chans=train_data.in_chans, num_classes=train_data.num_classes,
                             kwargs=recipe.model.kwargs, image_size=train_data.image_size)
        if recipe.model.channels_last:
            module = module.to(memory_format=torch.channels_last)
        compile_in_place(module, recipe.model.compile)
        optimizer = make_sgd(module.parameters(), recipe.optimizer, recipe.phase1.first_lr, device=accelerator.device,
                             fp16=recipe.mixed_precision == "fp16")
        model, optimizer = accelerator.prepare(module, optimizer)
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
        log = Monitor(accelerator=accelerator, recipe=recipe, counter=counter, module=module, train_data=train_data,
                      test_data=test_data, test_loader=test_loader, progress=Progress(accelerator), layout=layout,
                      group=group, run_dir=run_dir)
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
        return cls(recipe, run_dir, accelerator, counter, layout, group, heartbeat, train_data, test_data, module,
                   model, optimizer, noise, test_loader, holdout_loader, log, ckpt, start, started=started,
                   rank_record={"rank": rank})

    def finish(self, results: dict) -> dict | None:
        """Evaluate on held-out images, count every rank's collectives, write the rank's record; on the main process
        write the model, results.json, Figure 1 and the tracker's summary. Returns results there, None elsewhere."""
        accelerator, counter, run_dir = self.accelerator, self.counter, self.run_dir
        if self.holdout_loader is not None:  # the final model (the average, or the baseline) on held-out images
            with counter.phase("evaluation"):
                results["holdout_acc"], _ = evaluate_shared(self.module, self.holdout_loader, accelerator)
        # Collective counts of every rank (counted, not assumed); this gather itself is in "report".
        with counter.phase("report"):
            calls = torch.tensor([[counter.calls[p], counter.bytes[p]] for p in PHASES], device=accelerator.device)
            all_calls = gather_values(calls, accelerator)
        self.rank_record["collectives"] = counter.summary()
        self.rank_record["resumed_from"] = results["resumed_from"] = self.start.describe()
        (run_dir / "ranks").mkdir(exist_ok=True)
        write_json(run_dir / "ranks" / f"rank{self.rank}.json", self.rank_record)
        counter.uninstall()
        results["collectives"] = {p: {"calls": int(all_calls[:, i, 0].max()), "bytes": int(all_calls[:, i, 1].max())}
                                  for i, p in enumerate(PHASES)}
        results["evaluation_seconds"] = self.eval_seconds
        results["total_seconds"] = time.perf_counter() - self.started
        accelerator.wait_for_everyone()
        if self.heartbeat:
            self.heartbeat.stop()
        if not accelerator.is_main_process:
            accelerator.end_training()
            return None
        save_weights(run_dir / "model.safetensors", self.module,
                     {"name": self.recipe.name, "test_acc": str(results["test_acc"])})
        results.update(weights_identity(run_dir / "model.safetensors"))  # results.json, written last, vouches for it
        self.log.progress.close()
        # Imported here: matplotlib costs every process a third of a second at start-up, and only this one draws.
        from .monitoring import figure

        results["figure"] = figure.save(results, run_dir / "figure1.png").name
        write_json(run_dir / "results.json", results)
        print_table([results])
        if results["phase2"]:
            curve = results["averaged_curve"]
            self.say(f"averaged-model curve ({curve['setting']}): {len(curve['points'])} point(s), "
                     f"{curve['seconds']:.1f} s extra ({100 * curve['seconds'] / results['total_seconds']:.1f}% "
                     f"of the run); Figure 1: {run_dir / results['figure']}")
        tracking.finish(self.accelerator, self.recipe, results, table_rows(results), run_dir / results["figure"])
        accelerator.end_training()
        return results
