"""Several samples per worker (paper section 5.3, Table 4): the models at the ends of a worker's last S
learning-rate cycles, kept as one running sum.

`phase2.lr.cycles` cuts phase 2 into equal cycles, each a whole schedule (schedules.py). At the end of each of the
last `phase2.samples_per_worker` cycles the worker's weights are one sample. Its `flat_state` is added to a running
sum: one model-sized vector however many samples, never a copy per sample in memory during training (the greedy
soup, which must try each model, reads them back from disk). Each sample but the last is also
written once to disk, as the weights-only checkpoint `p2-w<k>-sample<s>`; the last is the worker's own `p2-w<k>-end`.
The disk copies let a resume in mid-cycle rebuild the sum bit for bit, and let `swap_accel average` and the greedy
soup (soup.py) see every one of the W x S models. Phase 3 divides the sum of all running sums by W x S: every model
weighs the same. `mode: swa` takes its samples the same way, from its one data-parallel model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..parallel.distributed import flat_state, flat_state_of
from .files import CheckpointError, load_weights, verify_checkpoint
from .resume import ROOT


def model_name(worker: int, sample: int) -> str:
    """How results.json names one of the W x S averaged models (`phase3.selection.models`)."""
    return f"w{worker}s{sample}"


def load_flat(path: Path, module: torch.nn.Module, device) -> torch.Tensor:
    """The `flat_state` of a saved sample, without loading it into `module` (which only names the tensors)."""
    return flat_state_of(load_weights(path / "model.safetensors"), module, device)


def sample_dirs(run_dir: Path, worker: int, samples: int) -> list[Path]:
    """Where worker `worker`'s samples are saved, in the order they were taken (the last is its end checkpoint)."""
    root = run_dir / ROOT
    return [root / f"p2-w{worker}-sample{s}" for s in range(samples - 1)] + [root / f"p2-w{worker}-end"]


def finished_sample_states(run_dir: Path, workers: int, samples: int, module: torch.nn.Module,
                           device) -> list[torch.Tensor]:
    """The `flat_state` of every worker's every sample (W x S, worker-major; the last of a worker's is its
    p2-w<k>-end), read by every process from the checkpoints (the run directory is shared, as phase 1's checkpoints
    already require): each rank holds only the running sum of its own workers."""
    return [load_flat(path, module, device) for k in range(workers) for path in sample_dirs(run_dir, k, samples)]


class CycleSamples:
    """One worker's samples. Only its group's leader keeps the sum and writes the samples (the members hold the
    same weights after the in-group all-reduce, and contribute zeros to phase 3)."""

    def __init__(self, sampling: dict[str, int], run_dir: Path, worker: int, *, leader: bool = True) -> None:
        """`sampling`: Phase2Config.sampling, or the record a checkpoint holds of it."""
        self.cycle_epochs = sampling["epochs"] // sampling["cycles"]
        # early cycles that only lead to the sampled ones
        self.skipped_cycles = sampling["cycles"] - sampling["samples_per_worker"]
        self.dirs = sample_dirs(run_dir, worker, sampling["samples_per_worker"])
        self.leader = leader
        self.sum: torch.Tensor | None = None

    def index_after(self, epoch: int) -> int | None:
        """The sample taken when epoch `epoch` (0-based) ends; None if it ends no sampled cycle."""
        if (epoch + 1) % self.cycle_epochs:
            return None
        index = (epoch + 1) // self.cycle_epochs - 1 - self.skipped_cycles
        return index if index >= 0 else None

    def taken_before(self, epoch: int) -> int:
        """How many samples a worker has taken when it starts epoch `epoch`."""
        return max(0, epoch // self.cycle_epochs - self.skipped_cycles)

    @torch.no_grad()
    def take(self, module: torch.nn.Module, epoch: int, ckpt, step: int) -> None:
        """At the end of every epoch: a sample if the epoch ends a sampled cycle."""
        index = self.index_after(epoch)
        if index is None:
            return
        if index < len(self.dirs) - 1:  # the last sample is the end of phase 2, which workers.py checkpoints
            # Written by the leader; a copy an earlier launch committed is loaded by every member instead, and the
            # sum and the rest of phase 2 continue from it (Checkpointer._save_once).
            ckpt.save_sample(module, self.dirs[index].name, step, {"sample": index, "epoch": epoch + 1},
                             writer=self.leader)
        if self.leader:
            flat = flat_state(module)
            self.sum = flat if self.sum is None else self.sum.add_(flat)

    @torch.no_grad()
    def restore(self, epoch: int, module: torch.nn.Module, device) -> None:
        """The sum as it was when epoch `epoch` started, read back from the samples on disk in the order they were
        added (bit for bit the uninterrupted sum); `module` only names the tensors and is left untouched."""
        if not self.leader:
            return
        for path in self.dirs[: self.taken_before(epoch)]:
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; a finished sample of this worker is lost, so its average cannot be "
                                      "rebuilt: rerun with --overwrite") from None
            flat = load_flat(path, module, device)
            self.sum = flat if self.sum is None else self.sum.add_(flat)
