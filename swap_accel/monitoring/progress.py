"""Console output: a live progress bar on the main process, one line per epoch, quiet elsewhere.
In phase 2 the lines are the main process's own worker's; every worker's final numbers follow in the table.

On a terminal the main process shows a rich progress bar (phase, epoch/total, step, ETA) under the
per-epoch lines; in CI and logs (not a TTY) only the per-epoch lines are printed. The bar advances
per step from host-side counters only; loss, accuracy and images/s are the last epoch's numbers,
because the loops sync metrics once per epoch (a per-step `.item()` would stall the device).
Non-main processes print nothing but errors, which carry their rank (cli).
"""

from __future__ import annotations

import logging
import warnings

from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, accelerator: Accelerator) -> None:
        self.main = accelerator.is_main_process
        self.console = Console()
        self.bar: RichProgress | None = None
        self.task = None
        self.phase = None
        if not self.main:
            # With P processes every warning would appear P times; rank 0 shows it once.
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)

    def steps(self, iterable, *, phase: int, epoch: int, epochs: int, total: int):
        """Yield the loop's batches, advancing the bar (main process, terminal only)."""
        if not (self.main and self.console.is_terminal):
            yield from iterable
            return
        if self.bar is None:
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                    console=self.console, refresh_per_second=2)
            self.bar.start()
        if phase != self.phase:
            # One task per phase; phase 1's total is its epoch budget (τ may end it sooner), so ETA is an upper bound.
            self.phase = phase
            if self.task is not None:
                self.bar.remove_task(self.task)  # phase 1 may have stopped early at τ: its bar would look stuck
            self.task = self.bar.add_task("", total=epochs * total, completed=epoch * total, stats="")
        self.bar.update(self.task, description=f"phase {phase} · epoch {epoch + 1}/{epochs}")
        for item in iterable:
            yield item
            self.bar.advance(self.task)

    def epoch(self, row: dict, averaged: float | None = None) -> None:
        if not self.main:
            return
        who = f"phase {row['phase']}" + (f" worker {row['worker']}" if "worker" in row else "")
        line = (f"{who} | epoch {row['epoch']} | step {row['step']} | lr {row['lr']:.4f} "
                f"| loss {row['train_loss']:.4f} | train acc {100 * row['train_acc']:.2f}% "
                f"| {row['images_per_s']:.0f} img/s | {row['seconds']:.1f} s")
        if "test_acc" in row:
            line += f" | test acc {100 * row['test_acc']:.2f}%"
        if averaged is not None:
            line += f" | averaged {100 * averaged:.2f}%"
        if (row.get("noise_scale") or {}).get("b_simple") is not None:
            line += f" | B_simple {row['noise_scale']['b_simple']:.0f}"
        self.console.print(line, highlight=False, soft_wrap=True)
        if self.bar is not None:
            self.bar.update(self.task, stats=f"loss {row['train_loss']:.3f} · acc {100 * row['train_acc']:.1f}% · "
                                             f"{row['images_per_s']:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
