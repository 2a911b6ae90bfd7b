"""The paper's Figure 1 for one run, drawn from its own `results.json`.

Learning-rate schedules of both phases on the left axis; on the right the test accuracy of the
shared phase-1 model, of every phase-2 worker and of the averaged model (the accuracy phase 3
would give were phase 2 stopped there), with the phase boundary marked. Workers share one colour
map and one legend entry beyond four, so 8 workers read as a band, not as 8 legend lines.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes or in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..algorithm.schedules import EpochSchedule, make_schedule  # noqa: E402
from ..recipe import LRConfig, StageConfig  # noqa: E402

_SAMPLES_PER_EPOCH = 20  # LR is piecewise smooth; 20 points per epoch draw it exactly enough


def _lr_curve(phase: dict, budget: int, epochs: int, steps: int, offset: float) -> tuple[list[float], list[float]]:
    """The LR the run used at each step, recomputed as the loops do from the recorded recipe's phase (schedule over
    the epoch `budget`) and the run's step counts; phase 1 may stop before its budget (τ)."""
    if phase.get("stages"):  # piecewise over epochs: drawn at points within each epoch it trained
        schedule = EpochSchedule([StageConfig(**s) for s in phase["stages"]], None, epochs=budget, batch_size=1,
                                 batch_key="global_batch_size", steps_for=lambda batch: _SAMPLES_PER_EPOCH)
        at = [(e, i) for e in range(epochs) for i in range(_SAMPLES_PER_EPOCH)]
        return ([offset + e + (i + 0.5) / _SAMPLES_PER_EPOCH for e, i in at], [schedule.lr(0, e, i) for e, i in at])
    lr = phase["lr"]
    per_epoch = max(1, steps // max(epochs, 1))
    lr_at = make_schedule(LRConfig(**lr), epochs=budget, steps_per_epoch=per_epoch)
    stride = max(1, per_epoch // _SAMPLES_PER_EPOCH)
    at = list(range(0, steps, stride)) + [steps - 1]
    return [offset + s / per_epoch for s in at], [lr_at(s) for s in at]


def draw(results: dict) -> Figure:
    fig, lr_ax = plt.subplots(figsize=(9, 5), layout="constrained")
    acc_ax = lr_ax.twinx()
    p1, p2, recipe = results["phase1"], results["phase2"], results["recipe"]
    e1 = p1["epochs"]
    xs, ys = _lr_curve(recipe["phase1"], recipe["phase1"]["max_epochs"], e1, p1["steps"], 0.0)
    lr_ax.plot(xs, ys, color="0.55", lw=1.2, ls="--", label="learning rate")
    # `swap_accel average` of a worker's mid-phase checkpoint knows no phase-1 test accuracy or history.
    p1_acc = p1.get("test_acc")
    start = [(e1, p1_acc)] if p1_acc is not None else []
    p1_points = [(r["epoch"], r["test_acc"]) for r in p1.get("history", []) if r.get("test_acc") is not None]
    if start and (not p1_points or p1_points[-1][0] != e1):
        p1_points += start
    if p1_points:
        acc_ax.plot(*zip(*p1_points, strict=True), color="black", marker="o", ms=3, lw=2,
                    label="phase-1 model (shared)")
    if p2:
        xs, ys = _lr_curve(recipe["phase2"], p2["epochs"], p2["epochs"], p2["steps_per_worker"], e1)
        lr_ax.plot(xs, ys, color="0.55", lw=1.2, ls="--")
        # (epoch, accuracy) of each worker at its logging points; workers trained in turn share epochs.
        logged: dict[int, list] = {}
        for h in p2.get("workers_history", []):
            if h["test_acc"] is not None:
                logged.setdefault(h["worker"], []).append((h["epoch"], h["test_acc"]))
        n = len(results["workers"])
        colours = plt.get_cmap("tab10" if n <= 10 else "viridis")
        for k, final in enumerate(results["workers"]):
            points = start + logged.get(final["index"], [])
            if not points or points[-1][0] != e1 + p2["epochs"]:
                points.append((e1 + p2["epochs"], final["test_acc"]))
            label = f"worker {k}" if n <= 4 else (f"workers 0-{n - 1}" if k == 0 else None)
            acc_ax.plot(*zip(*points, strict=True), color=colours(k % 10 if n <= 10 else k / max(n - 1, 1)),
                        lw=1, alpha=0.8 if n <= 4 else 0.55, marker=".", ms=3, label=label, gid=f"worker{k}")
        curve = results.get("averaged_curve") or {"points": []}
        if curve["points"]:
            points = start + [(p["epoch"], p["test_acc"]) for p in curve["points"]]
            acc_ax.plot(*zip(*points, strict=True), color="crimson", lw=2, marker="*", ms=9,
                        label=f"averaged model ({'SWA' if results.get('mode') == 'swa' else 'SWAP'})",
                        gid="averaged")
        lr_ax.axvline(e1, color="0.3", lw=0.8, ls=":")
        lr_ax.text(e1, 1.0, " phase 2 →", transform=lr_ax.get_xaxis_transform(), va="bottom", fontsize=8)
        lr_ax.text(e1, 1.0, "← phase 1 ", transform=lr_ax.get_xaxis_transform(), va="bottom", ha="right",
                   fontsize=8)
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    acc_ax.set_ylabel("test accuracy")
    lr_ax.set_ylim(bottom=0)
    handles = [h for ax in (acc_ax, lr_ax) for h in ax.get_legend_handles_labels()[0]]
    acc_ax.legend(handles=handles, loc="lower right", fontsize=8, ncol=2 if len(handles) > 5 else 1)
    workers = len(results["workers"]) if p2 else results["num_processes"]
    method = "SWA, 1 model sampled" if results.get("mode") == "swa" else f"SWAP with {workers} workers"
    fig.suptitle(f"{results.get('name', '')}: {method} on {results['num_processes']} processes "
                 "(paper Figure 1)",
                 fontsize=10)
    return fig


def save(results: dict, path: Path) -> Path:
    fig = draw(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
