"""Who is still alive, without a collective: fault handling that holds on NCCL, not only gloo.

Phase 2 makes no collective at all, so a worker never waits for another there. Phase 3 must meet all of
them, and a collective with a dead peer does not fail on NCCL: it blocks until the watchdog kills the
process. So before phase 3 every process waits on the file system instead: it polls the run directory
until every worker's `p2-w<k>-end` checkpoint exists, while each process keeps a heartbeat file fresh
from a background thread. A peer whose heartbeat stops changing (killed, hung, its machine gone) is
reported in one line naming the finished workers, before any collective could hang. The run directory is
shared by all machines already (checkpoints), so this needs nothing new from the cluster. Staleness is
measured on the waiting process's own clock between two reads of the same file, so machines whose clocks
disagree do not matter.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

BEAT_SECONDS = float(os.environ.get("SWAP_ACCEL_HEARTBEAT_SECONDS", "10"))


# A peer is taken for dead when its heartbeat has not changed for this many beats (2 minutes by default).
DEAD_AFTER_BEATS = 12


class Heartbeat:
    """Rewrites `run_dir/heartbeat/rank<r>` ("<state> <count>") every BEAT_SECONDS from a daemon thread while
    this process lives; `state` says how far it got ("phase3": it waits there)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = run_dir / "heartbeat" / f"rank{rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = "training"
        self._stop = threading.Event()
        self._beats = 0
        self._beat()
        self._thread = threading.Thread(target=self._run, name="swap_accel-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._beats += 1
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(f"{self.state} {self._beats}\n")
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat()
            except OSError:  # a full or flaky file system must not kill training; the waiter will say so
                pass

    def arrive(self, state: str) -> None:
        self.state = state
        self._beat()

    def stop(self) -> None:
        self._stop.set()


def wait_for_all(run_dir: Path, ranks: int, state: str, *, explain: Callable[[list[int]], str],
                 say: Callable[[str], None], poll: float = 0.5) -> None:
    """Return once every rank's heartbeat says `state` (a barrier on the file system, no collective); raise
    RuntimeError(explain(silent ranks)) when a rank that is not there yet stops beating."""
    dead_after = DEAD_AFTER_BEATS * BEAT_SECONDS
    seen: dict[int, tuple[str, float]] = {}  # rank -> (last content, local time it last changed)
    announced = False
    while True:
        now, waiting, silent = time.monotonic(), [], []
        for rank in range(ranks):
            try:
                beat = (run_dir / "heartbeat" / f"rank{rank}").read_text()
            except OSError:
                beat = ""
            if beat.split(" ")[0] == state:
                continue
            waiting.append(rank)
            if rank not in seen or seen[rank][0] != beat:
                seen[rank] = (beat, now)
            elif now - seen[rank][1] > dead_after:
                silent.append(rank)
        if not waiting:
            return
        if silent:
            raise RuntimeError(explain(silent))
        if not announced:
            say(f"waiting for ranks {waiting} to finish phase 2 (no collective until all are here)")
            announced = True
        time.sleep(poll)
