"""Distributed helpers: with `counting`, the only module that calls `torch.distributed`.

Three jobs. (1) Form a real process group on CPU-only machines and refuse a launch whose processes
are not one group (`torchrun`/`accelerate launch --multi_gpu` without CUDA otherwise start
independent single-process runs, silently). (2) Phase 2's worker groups and their
data-parallel wrapper. (3) The collectives SWAP needs: one flattened all-reduce to average the
workers (paper Algorithm 1, phase 3), sums for metrics and BN statistics, broadcasts of buffers and
of decisions one rank takes for all. `counting` counts every one of them per phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType

from ..recipe import LossScaleConfig
from ..topology import WorkerLayout
from .counting import CollectiveCounter
from .precision import enable_fp16_on_cpu, scaler_kwargs


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


@dataclasses.dataclass
class _DDPKwargs(DistributedDataParallelKwargs):
    """Accelerate 1.15 forwards `broadcast_buffers`, which torch deprecates with a FutureWarning in every process
    of every run; torch's current name is `forward_sync_buffers`. False keeps one sync at DDP's
    construction, where every rank holds the same seeded buffers anyway, and none before each forward."""

    forward_sync_buffers: bool = True


def use_cudnn_benchmark() -> bool:
    """Turn on cuDNN's algorithm search unless this process asked for deterministic kernels; says whether it is on.

    Every step repeats its convolutions' shapes (fixed batch and image sizes; a few more with progressive resizing,
    evaluation and a last partial batch), so each shape's algorithms are timed once and the fastest kept, as timm's
    train.py does. The search picks by timing, so two runs may pick differently: a process that turned on
    `torch.use_deterministic_algorithms` or `cudnn.deterministic` keeps the search off. GPU kernels are not bitwise
    deterministic without those either (saver._save_once)."""
    if not (torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic):
        torch.backends.cudnn.benchmark = True
    return torch.backends.cudnn.benchmark


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None, project_dir: str | None = None,
                     timeout_minutes: float = 30.0, loss_scale: LossScaleConfig | None = None) -> Accelerator:
    """An Accelerator that is one real group whenever WORLD_SIZE > 1, on GPUs or CPU-only.

    `log_with`/`project_dir` select Accelerate's experiment tracker; None adds none. Every
    collective fails after `timeout_minutes` instead of the backend's own default (NCCL's
    watchdog and gloo disagree; a recipe states it once for both). `loss_scale` sets fp16's scalers. On CUDA it
    also turns on cuDNN's algorithm search, process-wide (`use_cudnn_benchmark`)."""
    cpu = not torch.cuda.is_available()
    if not cpu:
        use_cudnn_benchmark()
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        # P processes on C cores do best with C/P threads each (measured: two 1-thread
        # processes 225 img/s combined vs 183 for one 2-thread process).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    # DDP's default broadcasts rank 0's BN buffers before a forward: one collective per phase-1 step that
    # changes nothing we use. Running statistics do not enter training-mode forwards, rank 0's own buffers
    # evolve the same either way, and every reader (evaluation, phase-1 end, checkpoints on rank 0) takes
    # rank 0's through `broadcast_buffers_` first, so the results are bitwise the same with one fewer sync.
    group = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                              kwargs_handlers=[group, scaler_kwargs(loss_scale or LossScaleConfig())])
    enable_fp16_on_cpu(accelerator)
    # Accelerate takes its DDP handler by exact class, so it is set after construction, before any prepare.
    accelerator.ddp_handler = _DDPKwargs(forward_sync_buffers=False)
    require_one_group(accelerator)
    return accelerator


def make_worker_group(layout: WorkerLayout, rank: int, counter: CollectiveCounter):
    """This rank's phase-2 worker group, or None when a worker is one process. `new_group` must be
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
# usual; inside `peers_required` a callable that decides. (Phase 2 makes no collective at all, so no
# worker ever needs to carry on past a lost peer inside one.)
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


def all_reduce_sum(tensor: torch.Tensor, accelerator: Accelerator, group=None) -> torch.Tensor:
    """Sum across processes (or across a worker group) in place (float64 stays float64; gloo supports it)."""
    if is_distributed(accelerator):
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as e:
            if _on_lost_peer is not None:
                _on_lost_peer(e)
            raise
    return tensor


def all_true(flag: bool, accelerator: Accelerator, group=None) -> bool:
    """Whether `flag` holds on every process (of `group`): a decision no rank may take alone, e.g. stopping on
    NaN before a checkpoint barrier (a rank that stops alone leaves the others at the barrier)."""
    failed = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return all_reduce_sum(failed, accelerator, group).item() == 0


def broadcast_object(obj, accelerator: Accelerator, group=None):
    """`obj` as the first rank (of `group`) has it: one rank decides, e.g. where a resumed run starts."""
    if not is_distributed(accelerator):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return box[0]


def gather_objects(obj, accelerator: Accelerator) -> list:
    """Every process's `obj` (small, picklable), in rank order."""
    if not is_distributed(accelerator):
        return [obj]
    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def _float_state(module: torch.nn.Module) -> list[torch.Tensor]:
    # Parameters and every floating-point buffer: a non-BN float buffer (an EMA, a learned-schedule state) must
    # not stay one worker's; BN statistics are averaged too and then recomputed by phase 3.
    return [t for t in (*module.parameters(), *module.buffers()) if t.dtype.is_floating_point]


def flat_state(module: torch.nn.Module) -> torch.Tensor:
    """Every floating-point parameter and buffer in one new flat vector: a worker's term of phase 3's sum."""
    return torch.cat([t.detach().reshape(-1) for t in _float_state(module)])


def flat_state_of(tensors: dict[str, torch.Tensor], module: torch.nn.Module, device) -> torch.Tensor:
    """`flat_state` of a saved state dict (a checkpoint's weights), in `module`'s order, without loading it into
    `module`: how a resumed worker rebuilds its running sum of samples. A non-persistent buffer (e.g.
    timm's swin attention masks) is in no state dict; it is a constant of the architecture, so `module`'s own."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.dtype.is_floating_point]
    return torch.cat([tensors.get(n, t.detach().cpu()).reshape(-1).to(device) for n, t in named])


def load_flat_state_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """The inverse of `flat_state`: every floating-point parameter and buffer of `module` set from `flat`."""
    _unflatten_into(flat, _float_state(module))


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    # copy_ (not `.data =` views into `flat`) keeps each tensor's own storage and memory format.
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(chunk.view(t.shape))


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
