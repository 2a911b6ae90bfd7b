"""Counting collectives: the claim "phase 2 communicates nothing between workers" is
measured for every run, not assumed. Wraps the `torch.distributed` functions, so it sees Accelerate's
ops, DDP's broadcasts and (through the stock comm hook) DDP's gradient all-reduces.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

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


def group_argument(position: int | None, args: tuple, kwargs: dict):
    """The process group a collective call names (None: the default group); `position` from `_group_position`."""
    group = kwargs.get("group", kwargs.get("process_group"))
    if group is None and position is not None and len(args) > position:
        group = args[position]
    return group


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
    made while phase 2 runs is counted as `phase2_in_group`, apart from `phase2`, which counts
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
        return "phase2_in_group" if group_argument(position, args, kwargs) is self.worker_group else self.current

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
