"""Distributed helpers: the only module that calls `torch.distributed`.

Three jobs. (1) Form a real process group on CPU-only machines and refuse a launch whose processes
are not one group (issue 2: `torchrun`/`accelerate launch --multi_gpu` without CUDA otherwise start
independent single-process runs, silently). (2) Count every collective per phase, so the claim
"phase 2 communicates nothing" is measured, not assumed. (3) The collectives SWAP needs: one
flattened all-reduce to average weights (paper Algorithm 1, phase 3), sums for metrics and BN
statistics, a broadcast of buffers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from collections import defaultdict

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from .topology import WorkerLayout


class DistributedError(RuntimeError):
    """A launch problem, phrased as one line with the fix."""


def launched_world_size() -> int:
    """Processes the launcher started (torchrun/accelerate set WORLD_SIZE), known before any group forms."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_one_group(accelerator: Accelerator) -> None:
    launched = launched_world_size()
    if accelerator.num_processes != launched:
        raise DistributedError(
            f"rank {os.environ.get('RANK', '?')}: launched as {launched} processes but this one sees "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}): the processes "
            "are not one group and would train independently; on a CPU-only machine set ACCELERATE_USE_CPU=1 "
            "or build Accelerator(cpu=True) (swap_accel does), then relaunch"
        )


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator that is one real group whenever WORLD_SIZE > 1, on GPUs or CPU-only.

    `log_with`/`project_dir` select Accelerate's experiment tracker (issue 3); None adds none."""
    cpu = not torch.cuda.is_available()
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        # Issue 5: P processes on C cores do best with C/P threads each (measured: two 1-thread
        # processes 225 img/s combined vs 183 for one 2-thread process).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    # DDP's default broadcasts rank 0's BN buffers before a forward: one collective per phase-1 step that
    # changes nothing we use. Running statistics do not enter training-mode forwards, rank 0's own buffers
    # evolve the same either way, and every reader (evaluation, phase-1 end, checkpoints on rank 0) takes
    # rank 0's through `broadcast_buffers_` first, so the results are bitwise the same with one fewer sync.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                              kwargs_handlers=[ddp])
    require_one_group(accelerator)
    return accelerator


# Collectives counted by name; `_broadcast_coalesced` is what DDP uses for parameters and buffers.
_COUNTED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "_broadcast_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object",
    "scatter", "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv",
)


def _group_position(name: str, fn) -> int | None:
    """Where a collective takes its process group positionally (`group`; `_broadcast_coalesced`: first)."""
    if name == "_broadcast_coalesced":
        return 0
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("group") if "group" in params else None


def _payload_bytes(name: str, args: tuple) -> int:
    position = 1 if name in ("all_gather", "all_gather_into_tensor", "_broadcast_coalesced") else 0
    tensors = args[position] if len(args) > position else None
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return 0


class CollectiveCounter:
    """Counts calls and payload bytes of every `torch.distributed` collective, per phase.

    Wrapping the module functions catches Accelerate's ops (`reduce`, `gather`, ...) and DDP's
    parameter/buffer broadcasts; DDP's gradient all-reduce runs in C++ unless a comm hook is set, so
    `watch_ddp` registers the stock all-reduce hook, which calls `dist.all_reduce` (same math).
    Nested calls (e.g. all_gather_object → all_gather) count once. A collective on a phase-2 worker group
    (issue 9) made while phase 2 runs is counted as `phase2_in_group`, apart from `phase2`, which counts
    what crosses between workers and must stay 0.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.current = "setup"
        self.worker_group = None
        self._depth = threading.local()
        self._originals: dict[str, object] = {}

    def install(self) -> CollectiveCounter:
        for name in _COUNTED:
            if hasattr(dist, name) and name not in self._originals:
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._originals[name]))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()

    def _label(self, name: str, position: int | None, args: tuple, kwargs: dict) -> str:
        if self.current != "phase2" or self.worker_group is None:
            return self.current
        group = kwargs.get("group", kwargs.get("process_group"))
        if group is None and position is not None and len(args) > position:
            group = args[position]
        return "phase2_in_group" if group is self.worker_group else self.current

    def _wrap(self, name: str, fn):
        position = _group_position(name, fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                label = self._label(name, position, args, kwargs)
                self.calls[label] += 1
                self.bytes[label] += _payload_bytes(name, args)
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return counted

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def summary(self) -> dict[str, dict[str, int]]:
        return {p: {"calls": self.calls[p], "bytes": self.bytes[p]} for p in sorted(self.calls)}

    @staticmethod
    def watch_ddp(model: torch.nn.Module, group=None) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(group, allreduce_hook)


def make_worker_group(layout: WorkerLayout, rank: int, counter: CollectiveCounter):
    """This rank's phase-2 worker group (issue 9), or None when a worker is one process. `new_group` must be
    called by every rank for every group in the same order, so all groups are made here, once, before phase 1."""
    if layout.processes_per_worker == 1:
        return None
    mine = None
    for worker in range(layout.workers):
        group = dist.new_group(layout.group_ranks(worker))
        if rank in layout.group_ranks(worker):
            mine = group
    counter.worker_group = mine
    return mine


def data_parallel(module: torch.nn.Module, group, device: torch.device) -> torch.nn.Module:
    """A worker group's data-parallel wrapper: gradients all-reduced inside `group` only. Every member already
    holds the phase-1 weights (no initial broadcast) and BN buffers are synced once, at the worker's end
    (`broadcast_buffers_`), not before every forward."""
    if group is None:
        return module
    ddp = torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
        init_sync=False, forward_sync_buffers=False)
    CollectiveCounter.watch_ddp(ddp, group)
    return ddp


def is_distributed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type != DistributedType.NO and accelerator.num_processes > 1


# What a collective does when a peer process is gone (gloo: "Connection closed by peer"): None raises as
# usual; inside `peers_required`/`peers_optional` (issue 4) a callable that decides.
_on_lost_peer = None


@contextlib.contextmanager
def _lost_peer_policy(policy):
    global _on_lost_peer
    previous, _on_lost_peer = _on_lost_peer, policy
    try:
        yield
    finally:
        _on_lost_peer = previous


def peers_required(explain):
    """Inside, a collective that finds a peer gone ends with the one line `explain()`, not a traceback."""

    def fail(error: RuntimeError) -> None:
        raise DistributedError(f"{explain()} ({str(error).splitlines()[0][:160]})") from None

    return _lost_peer_policy(fail)


def peers_optional(who: str):
    """Phase 2: a worker needs no other worker (paper section 3), so when a logging gather finds a peer gone
    this worker carries on alone and the gather returns its own values only."""

    def warn(error: RuntimeError) -> None:
        print(f"warning: {who}: a peer process is gone ({str(error).splitlines()[0][:100]}); phase 2 continues "
              "alone", file=sys.stderr, flush=True)

    return _lost_peer_policy(warn)


def all_reduce_sum(tensor: torch.Tensor, accelerator: Accelerator, group=None) -> torch.Tensor:
    """Sum across processes (or across a worker group) in place (float64 stays float64; gloo supports it)."""
    if is_distributed(accelerator):
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as e:
            if _on_lost_peer is not None:
                _on_lost_peer(e)
            raise  # a sum without all its terms is no result, even for a worker that may carry on alone
    return tensor


def _float_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dtype.is_floating_point]


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every floating-point parameter in one new flat vector: a worker's term of phase 3's sum."""
    return torch.cat([p.detach().reshape(-1) for p in _float_params(module)])


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    # copy_ (not `.data =` views into `flat`) keeps each tensor's own storage and memory format.
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(chunk.view(t.shape))


@torch.no_grad()
def average_workers_(module: torch.nn.Module, local_sum: torch.Tensor, workers: int, accelerator: Accelerator) -> int:
    """Set every floating-point parameter of `module` to the mean of the W workers' (paper Algorithm 1, phase 3).

    `local_sum` is the sum of the workers this process leads (`flat_parameters` of each; zeros on a group's
    other members, so every worker counts once, each with equal weight, issue 9). One flattened all-reduce
    instead of one per tensor: a constant number of collectives whatever the architecture (issue 5). With
    one worker per process this is exactly the old (a + b) / 2. Returns the number of averaged values.
    """
    all_reduce_sum(local_sum, accelerator).div_(workers)
    _unflatten_into(local_sum, _float_params(module))
    return local_sum.numel()


@torch.no_grad()
def broadcast_buffers_(module: torch.nn.Module, accelerator: Accelerator, group=None) -> None:
    """Give every rank (of `group`, else of all) its first rank's floating-point buffers: BN running statistics
    drift per rank under DDP (measured), and a shared model evaluated in shards must use one set."""
    bufs = [b for b in module.buffers() if b.dtype.is_floating_point]
    if not bufs or not is_distributed(accelerator):
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.broadcast(flat, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    _unflatten_into(flat, bufs)


def barrier(accelerator: Accelerator, group=None) -> None:
    if is_distributed(accelerator):
        dist.barrier(group=group)


def gather_values(values: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Stack a small per-process tensor from every process: [num_processes, *values.shape]."""
    if not is_distributed(accelerator):
        return values.unsqueeze(0)
    out = [torch.empty_like(values) for _ in range(accelerator.num_processes)]
    try:
        dist.all_gather(out, values)
    except RuntimeError as e:
        if _on_lost_peer is None:
            raise
        _on_lost_peer(e)
        return values.unsqueeze(0)
    return torch.stack(out)
