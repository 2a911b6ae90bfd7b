"""Phase 2 for all the workers of this process, and what phase 3 needs of them.

A process trains one worker (alone, or as a member of the worker's group) or several in turn (W > P).
Each worker starts from the same phase-1 weights, with its own order, seeds, optimizer and checkpoints
(`p2-w<k>-*`), and resumes on its own. What phase 3 averages is the running sum of the finished workers'
samples this process leads (a worker's last model, or its S cyclic samples; a group's other members
contribute zeros: every model counts once, equally): with W/P workers per process, two flat vectors (this sum, and
the current worker's own running sum of samples), not W/P or W x S copies.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..checkpointing.files import save_weights
from ..checkpointing.resume import find_worker_start, load_result
from ..checkpointing.saver import Checkpointer
from ..checkpointing.snapshots import CycleSamples
from ..data.sampling import digest
from ..parallel.counting import CollectiveCounter
from ..parallel.distributed import broadcast_object, data_parallel, flat_state, gather_objects, gather_values
from ..recipe import Recipe
from ..topology import WorkerLayout
from .evaluate import evaluate_local, evaluate_recalibrated
from .loop import LoopContext
from .phase2 import Phase2Result, train_phase2
from .stacked import train_stacked


@dataclass
class WorkerRecord:
    """One worker as this process saw it: its numbers for results.json and its digests for ranks/rank<r>.json."""

    worker: int
    member: int
    test_acc: float
    test_acc_bn: float  # after the same BN recalibration as the averaged model
    result: Phase2Result
    params: str


@dataclass
class Phase2Outcome:
    records: list[WorkerRecord] = field(default_factory=list)
    local_sum: torch.Tensor | None = None  # sum of the flat weights of the samples of the workers this process leads

    @property
    def seconds(self) -> float:
        """This process's phase-2 training time: its workers' times added (they ran one after the other)."""
        return sum(r.result.seconds for r in self.records)


class WorkerRun(Protocol):
    """What phase 2 uses of a run (run_context.RunContext has it all): the phase-1 module and the recipe, the
    workers' layout and this process's worker group, the data, monitoring, checkpoints, the collective counter, the
    run directory, and what the workers' loops read (`loop_context`)."""

    module: torch.nn.Module
    recipe: Recipe
    layout: WorkerLayout
    group: object
    accelerator: object
    train_data: object
    test_data: object
    log: object
    ckpt: Checkpointer
    counter: CollectiveCounter
    run_dir: Path
    loop_context: LoopContext


def run_workers(run: WorkerRun, starts: dict, *, phase1: dict, phase1_params: str) -> Phase2Outcome:
    """Train (or resume, or reload) every worker of this process; `run.module` holds the phase-1 weights on entry.
    `starts` collects each worker's resume point for results.json; `phase1` and `phase1_params` (phase 1's summary
    and weights digest) go into every finished worker's checkpoint for `swap_accel average`."""
    module, recipe, accelerator, group = run.module, run.recipe, run.accelerator, run.group
    log, ckpt, run_dir = run.log, run.ckpt, run.run_dir
    seat = run.layout.seat(accelerator.process_index, group)
    mine = run.layout.workers_of(accelerator.process_index)
    # Where each worker resumes: its group's leader decides and tells the members, so members that
    # see the shared directory differently cannot start at different steps.
    for worker in mine:
        found = find_worker_start(run_dir, worker, leader=seat.leads) if seat.leads else None
        starts[worker] = broadcast_object(found, accelerator, group) if group is not None else found
        log.restore_worker(worker, starts[worker].position(recipe.phase2.epochs)[1])
    if isinstance(recipe.tracking.averaged_curve, int):
        # A curve point is a collective over every process, so every process must reach the same points. After a
        # resume the workers stand at different epochs (each checkpoints on its own clock; a finished one skips
        # phase 2): points only at epochs after the latest start, which every worker trains in this launch.
        first = max(starts[worker].position(recipe.phase2.epochs)[0] for worker in mine)
        with run.counter.phase("averaged_curve"):
            log.curve_after = int(gather_values(torch.tensor([first], device=accelerator.device), accelerator).max())
    # Sequential workers all start from phase 1's weights and buffers; one copy, kept on the device.
    origin = {k: v.detach().clone() for k, v in module.state_dict().items()} if len(mine) > 1 else None
    model = data_parallel(module, group, accelerator.device)
    samples = {worker: CycleSamples(recipe.phase2.sampling, run_dir, worker, leader=seat.leads) for worker in mine}
    stacked = _train_stacked(run, starts, samples, origin) if recipe.phase2.stack_workers else {}
    outcome = Phase2Outcome()
    for worker in mine:
        if origin is not None:
            module.load_state_dict(origin)
        start = starts[worker]
        if worker in stacked:  # trained at once with this process's other workers
            p2, state = stacked[worker]
            module.load_state_dict(state)
        elif start.end is None:
            p2 = train_phase2(run.loop_context, model, module, recipe.phase2, worker=worker, samples=samples[worker],
                              resume=start.step, seat=seat)
        else:  # this worker finished before the run stopped
            p2 = load_result(start.end, module, Phase2Result)
            # Its earlier samples from disk, then its last epoch's sample once more: the end weights just loaded.
            last_epoch = recipe.phase2.epochs - 1
            samples[worker].restore(last_epoch, module, accelerator.device)
            samples[worker].take(module, last_epoch, ckpt, p2.steps)
        with run.counter.phase("evaluation"):
            test_acc = p2.history[-1].get("test_acc")  # evaluated at the last logging point, if it was due
            if test_acc is None:
                test_acc = evaluate_local(module, run.test_data, recipe.eval.batch_size, accelerator, group,
                                          seat.member, seat.members)
            test_acc_bn = evaluate_recalibrated(module, recipe, run.train_data, run.test_data, accelerator,
                                                group=group, member=seat.member, members=seat.members)
        outcome.records.append(WorkerRecord(worker, seat.member, test_acc, test_acc_bn, p2, digest(flat_state(module))))
        log.end_worker(p2.steps)
        if not seat.leads:
            continue
        (run_dir / "workers").mkdir(exist_ok=True)
        save_weights(run_dir / "workers" / f"worker{worker}.safetensors", module,
                     {"worker": str(worker), "phase2_steps": str(p2.steps), "test_acc": str(test_acc)})
        if start.end is None:  # what `swap_accel average` needs to use this worker without the others
            ckpt.save_end(module, f"p2-w{worker}-end", "phase2-end", p2.steps,
                          {"worker": worker, "seed": recipe.seed, "members": seat.members, "test_acc": test_acc,
                           "result": dataclasses.asdict(p2), "phase1": phase1, "phase1_params": phase1_params,
                           "samples": [p.name for p in samples[worker].dirs]})
        total = samples[worker].sum
        outcome.local_sum = total if outcome.local_sum is None else outcome.local_sum.add_(total)
    if outcome.local_sum is None:
        outcome.local_sum = torch.zeros_like(flat_state(module))
    return outcome


def _train_stacked(run: WorkerRun, starts: dict, samples: dict, origin: dict | None) -> dict:
    """This process's unfinished workers trained at once (phase2.stack_workers), when they stand at one step: the
    normal case, since they checkpoint together. A kill between two of their checkpoints' commits leaves them one
    checkpoint apart; they then finish in turn (each from its own checkpoint, no work lost), as they would
    without stacking. Returns {worker: (result, final state)}."""
    unfinished = [w for w in run.layout.workers_of(run.accelerator.process_index) if starts[w].end is None]
    steps = {starts[w].step.name if starts[w].step else None for w in unfinished}
    steps = {name.rsplit("step", 1)[1] if name else None for name in steps}
    if len(unfinished) < 2 or len(steps) != 1:
        if len(unfinished) > 1:
            print(f"note: workers {unfinished} resume from different steps; they finish in turn", file=sys.stderr,
                  flush=True)
        return {}
    origin = origin or {k: v.detach().clone() for k, v in run.module.state_dict().items()}
    trained = train_stacked(run.loop_context, run.module, run.recipe.phase2, workers=unfinished,
                            resumes=[starts[w].step for w in unfinished], samples=[samples[w] for w in unfinished],
                            origin=origin)
    return dict(zip(unfinished, trained, strict=True))


def gathered_rows(records: list[WorkerRecord], accelerator) -> tuple[list[dict], dict[int, list[dict]]]:
    """Every worker's row for results.json, one per worker (a group's members report the same numbers), and every
    worker's phase-2 history rows; one gather at the end, in place of any exchange during phase 2."""
    mine = [(r.worker, r.member, {"index": r.worker, "test_acc": r.test_acc, "test_acc_bn": r.test_acc_bn,
                                  "train_acc": r.result.train_acc, "seconds": r.result.seconds,
                                  "steps": r.result.steps, "loss_scale": r.result.loss_scale}, r.result.history)
            for r in records]
    rows, histories = {}, {}
    for worker, member, row, history in (x for each in gather_objects(mine, accelerator) for x in each):
        if member == 0:
            rows[worker], histories[worker] = row, history
    return [rows[k] for k in sorted(rows)], histories
