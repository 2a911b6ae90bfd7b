"""Which process trains which phase-2 worker: a worker is not a process.

W workers on P processes, three layouts through one rule set:
- W = P: one worker per process (the paper's CIFAR runs, 8 workers on 8 GPUs).
- W < P, W divides P (worker groups): P/W consecutive ranks form one worker and train its model
  data-parallel on their own process group (the paper's ImageNet run, section 5.2: 2 workers x 8 GPUs).
- W > P, P divides W (sequential workers): each process trains W/P workers one after the other, worker
  k on rank k mod P (how one GPU or a 2-core laptop runs the paper's 8-worker setting).
Pure arithmetic, checked before any process group forms.
"""

from __future__ import annotations

from dataclasses import dataclass


def layout_error(workers: int, processes: int) -> str | None:
    """One line naming the valid worker counts for this process count, or None if `workers` fits."""
    if workers >= 1 and (processes % workers == 0 or workers % processes == 0):
        return None
    divisors = [d for d in range(1, processes + 1) if processes % d == 0]
    multiples = [processes * k for k in (2, 3, 4)]
    return (f"phase2.workers={workers} does not fit {processes} processes: use a divisor of {processes} "
            f"({', '.join(map(str, divisors))}: groups of processes per worker) or a multiple of {processes} "
            f"({', '.join(map(str, multiples))}, ...: several workers per process, trained in turn)")


@dataclass(frozen=True)
class Seat:
    """Where one process sits in the worker it trains: the worker's process group (None: a one-process worker),
    its position in the group (`member` 0 is the leader, which writes the worker's files) and the group's size."""

    group: object = None
    member: int = 0
    members: int = 1

    @property
    def leads(self) -> bool:
        return self.member == 0


@dataclass(frozen=True)
class WorkerLayout:
    workers: int
    processes: int

    def __post_init__(self) -> None:
        problem = layout_error(self.workers, self.processes)
        if problem:
            raise ValueError(problem)

    @property
    def processes_per_worker(self) -> int:
        return max(1, self.processes // self.workers)

    @property
    def workers_per_process(self) -> int:
        return max(1, self.workers // self.processes)

    def workers_of(self, rank: int) -> list[int]:
        """The workers `rank` trains, in the order it trains them."""
        if self.workers <= self.processes:
            return [rank // self.processes_per_worker]
        return [rank + j * self.processes for j in range(self.workers_per_process)]

    def member_of(self, rank: int) -> int:
        """This rank's position inside its worker's group (0: the group's leader, which writes its files)."""
        return rank % self.processes_per_worker

    def group_ranks(self, worker: int) -> list[int]:
        if self.workers > self.processes:
            return [worker % self.processes]
        g = self.processes_per_worker
        return list(range(worker * g, (worker + 1) * g))

    def leads(self, rank: int) -> bool:
        return self.member_of(rank) == 0

    def seat(self, rank: int, group) -> Seat:
        """`rank`'s seat in its worker, whose process group is `group` (None when a worker is one process)."""
        return Seat(group, self.member_of(rank), self.processes_per_worker)

    def describe(self) -> str:
        if self.workers == self.processes:
            return f"{self.workers} worker(s), one per process"
        if self.workers < self.processes:
            return f"{self.workers} worker(s) of {self.processes_per_worker} processes each"
        return f"{self.workers} workers, {self.workers_per_process} per process trained in turn"
