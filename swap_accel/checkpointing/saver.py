"""The one checkpoint writer of a run (timm keeps its `CheckpointSaver` the same way): when a checkpoint is due, and
writing it atomically, each rank its own loop state, the shared weights and optimizer from one rank. `resume` reads
what it writes (the layout is described there).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from ..data.provenance import provenance
from ..parallel.distributed import barrier
from ..parallel.precision import LossScale
from ..recipe import Recipe
from ..topology import Seat
from .files import MANIFEST, commit_checkpoint, load_weights_into, save_weights, verify_checkpoint, write_state
from .resume import ROOT, step_dirs


def loop_state(totals: torch.Tensor, generator: torch.Generator) -> dict:
    """Per-rank state of a training loop at a step boundary, beyond the weights: the partial epoch sums (phase
    1's τ decision at epoch end must see the same sums after a mid-epoch resume), the augmentation generator
    and the global RNG (dropout, drop-path)."""
    state = {"totals": totals.cpu(), "generator": generator.get_state(), "rng": torch.get_rng_state(),
             "py_rng": random.getstate()}  # streaming sources' timm transforms draw from Python's RNG
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state



class Checkpointer:
    """Writes this rank's checkpoints. `due(step)` is an integer compare (phase 2 adds a clock read): no cost
    and no host sync when nothing is due."""

    def __init__(self, run_dir: Path, recipe: Recipe, accelerator) -> None:
        self.root, self.cfg, self.accelerator = run_dir / ROOT, recipe.checkpoint, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        # Every manifest says which images its weights were trained on (data.provenance), so a run that reuses it
        # (--from-phase1, average, transition) can refuse other data, and how the worker takes its samples
        # (snapshots.CycleSamples), so `average` finds a dead worker's samples without its run's recipe, and the
        # precision it trained in (what `auto` resolved to on its device), so `average` recomputes BN in that one.
        self.meta = {"num_processes": self.world, "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs},
                     "data": provenance(recipe.data), "sampling": recipe.phase2 and recipe.phase2.sampling,
                     "mixed_precision": recipe.mixed_precision}
        self.last_good: Path | None = None
        # Checkpoints committed by an earlier launch of this run. Listed here, before this launch trains a step, so
        # that every process agrees which ones it may reach again (`_save_once`) however its view of the shared
        # directory lags.
        self._committed_before = frozenset(p.parent.name for p in self.root.glob(f"*/{MANIFEST}"))
        self._time_steps = sys.maxsize
        self.begin(0, by_clock=False)

    def begin(self, step: int, *, by_clock: bool) -> None:
        """Count intervals from `step`. Phase-2 workers read their own clocks (they need not agree); phase-1
        ranks must all pick the same step, so phase 1 turns minutes into steps with `calibrate` instead."""
        self._every = self.cfg.every_steps or sys.maxsize
        self._by_clock = by_clock and self.cfg.every_minutes is not None
        if by_clock:  # phase 2 keeps time by its own clock, not by phase 1's (longer) calibrated steps
            self._time_steps = sys.maxsize
        self._mark(step)

    def _mark(self, step: int) -> None:
        self._last, self._clock = step, time.monotonic()
        self._next = step + min(self._every, self._time_steps)

    def calibrate(self, seconds_per_step: float) -> None:
        """Phase 1, at epoch ends, with the step time averaged over ranks by the epoch's all-reduce."""
        if self.cfg.every_minutes is not None:
            self._time_steps = max(1, int(60 * self.cfg.every_minutes / max(seconds_per_step, 1e-9)))
            self._next = self._last + min(self._every, self._time_steps)

    def due(self, step: int) -> bool:
        return step >= self._next or (self._by_clock and time.monotonic() - self._clock >= 60 * self.cfg.every_minutes)

    def _commit(self, staging: Path, name: str, files: list[str], kind: str, step: int, info: dict) -> Path:
        final = self.root / name
        commit_checkpoint(staging, final, files, {"kind": kind, **self.meta, "step": step, **info})
        return final

    def _prune(self, prefix: str) -> None:
        # Renamed out of sight first: a kill during the deletion leaves no half-deleted checkpoint in view.
        for old in step_dirs(self.root, prefix)[self.cfg.keep :]:
            old.rename(old.with_name(f".{old.name}.deleting"))
        for doomed in self.root.glob(f".{prefix}*.deleting"):
            shutil.rmtree(doomed, ignore_errors=True)

    def _staging(self, name: str) -> Path:
        staging = self.root / f".{name}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _save_optimizer(self, staging: Path, module, optimizer, loss_scale: LossScale) -> list[str]:
        """The weights, the optimizer and, with fp16, its loss scaler: the state every rank shares."""
        save_weights(staging / "model.safetensors", module)
        write_state(staging / "optimizer.pt", optimizer.state_dict())
        if loss_scale.scaler is None:
            return ["model.safetensors", "optimizer.pt"]
        write_state(staging / "scaler.pt", loss_scale.state_dict())
        return ["model.safetensors", "optimizer.pt", "scaler.pt"]

    def save_phase1(self, module, optimizer, loss_scale: LossScale, result, *, epoch: int, step_in_epoch: int,
                    totals, generator) -> None:
        name = f"p1-step{result.steps:08d}"
        staging = self._staging(name)
        write_state(staging / f"rank{self.rank}.pt", loop_state(totals, generator))
        if self.rank == 0:
            shared = self._save_optimizer(staging, module, optimizer, loss_scale)
        # Every rank's file is on disk before rank 0 checksums them; the run dir is shared, as on any cluster.
        self.accelerator.wait_for_everyone()
        if self.rank == 0:
            files = shared + [f"rank{r}.pt" for r in range(self.world)]
            self._commit(staging, name, files, "phase1", result.steps,
                         {"epoch": epoch, "step_in_epoch": step_in_epoch, "result": dataclasses.asdict(result)})
            self._prune("p1-step")
        self.last_good = self.root / name
        self._mark(result.steps)

    def save_phase2(self, module, optimizer, loss_scale: LossScale, result, *, worker: int, epoch: int,
                    step_in_epoch: int, totals, generator, seat: Seat = Seat()) -> None:
        """One worker's checkpoint, as phase 1's but inside its group: the weights and optimizer (identical on
        every member after the in-group all-reduce) from the leader, each member's loop state from itself."""
        group, member, members = seat.group, seat.member, seat.members
        name = f"p2-w{worker}-step{result.steps:08d}"
        staging = self._staging(name)
        write_state(staging / f"member{member}.pt", loop_state(totals, generator))
        if member == 0:
            shared = self._save_optimizer(staging, module, optimizer, loss_scale)
        if members > 1:
            barrier(self.accelerator, group)
        if member == 0:
            files = shared + [f"member{j}.pt" for j in range(members)]
            self._commit(staging, name, files, "phase2", result.steps,
                         {"worker": worker, "members": members, "epoch": epoch, "step_in_epoch": step_in_epoch,
                          "result": dataclasses.asdict(result)})
            self._prune(f"p2-w{worker}-step")
        self.last_good = self.root / name
        self._mark(result.steps)

    def save_transition_point(self, module, result, tau: float) -> None:
        """`p1-tau<τ>`: phase 1 as a run with this τ would end it, kept once and by rank 0, as p1-end is;
        `--from-phase1` takes it. Every rank calls it at the end of the epoch that first reaches τ."""
        self._save_once(module, f"p1-tau{tau:g}", "phase1-end", result.steps,
                        {"tau": tau, "result": {**dataclasses.asdict(result), "reached_tau": True}},
                        writer=self.rank == 0)

    def save_sample(self, module, name: str, step: int, info: dict, *, writer: bool) -> None:
        """`p2-w<k>-sample<s>` (snapshots.py): a worker's model at the end of a sampled cycle. Every member of the
        worker's group calls it; its leader (`writer`) writes."""
        self._save_once(module, name, "phase2-sample", step, info, writer=writer)

    def _save_once(self, module, name: str, kind: str, step: int, info: dict, *, writer: bool) -> None:
        """A weights-only checkpoint that a resumed run may reach again. The copy an earlier launch committed is the
        one `--from-phase1`, `average` and the greedy soup read, so the run continues from that copy (every process
        holding the model loads it) rather than from its recomputation: equal bit for bit on CPU, not on GPUs, whose
        kernels need not be deterministic. Not `save_end`: no fallback for the run, so `last_good` stays."""
        path = self.root / name
        if name in self._committed_before:
            verify_checkpoint(path)
            load_weights_into(module, path)
        elif writer:
            self._save_weights_only(module, name, kind, step, info)

    def save_end(self, module, name: str, kind: str, step: int, info: dict) -> Path:
        """End of phase 1 (rank 0, the weights every rank holds after the buffer broadcast) or of one worker."""
        self.last_good = self._save_weights_only(module, name, kind, step, info)
        return self.last_good

    def _save_weights_only(self, module, name: str, kind: str, step: int, info: dict) -> Path:
        staging = self._staging(name)
        save_weights(staging / "model.safetensors", module)
        return self._commit(staging, name, ["model.safetensors"], kind, step, info)
