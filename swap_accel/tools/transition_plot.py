"""The picture of `swap_accel transition`: what each τ buys against what it costs, and phase 1's
gradient noise scale with the candidates' crossings marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def save(report: dict, path: Path) -> Path:
    rows, chosen = report["rows"], report["recommendation"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    se = 100 * chosen["standard_error"]
    left.errorbar([r["parallel_equivalent_seconds"] / 60 for r in rows], [100 * r["holdout_acc"] for r in rows],
                  yerr=se, fmt="o-", color="tab:blue", capsize=3, label="averaged model, held-out (±1 s.e.)")
    left.plot([r["parallel_equivalent_seconds"] / 60 for r in rows], [100 * r["test_acc"] for r in rows], "s--",
              color="tab:gray", alpha=0.6, label="test (reported, not used)")
    for r in rows:
        left.annotate(f"τ={r['tau']:g}", (r["parallel_equivalent_seconds"] / 60, 100 * r["holdout_acc"]),
                      textcoords="offset points", xytext=(4, 6), fontsize=8)
        if r["tau"] == chosen["tau"]:
            left.scatter([r["parallel_equivalent_seconds"] / 60], [100 * r["holdout_acc"]], s=220,
                         facecolors="none", edgecolors="tab:red", linewidths=2, label="recommended", zorder=5)
    left.set(xlabel="parallel-equivalent minutes (phase 1 + slowest worker + phase 3)", ylabel="accuracy (%)",
             title=f"choosing τ: W={report['phase2']['workers']}, {report['phase2']['epochs']} phase-2 epochs")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    curve = [p for p in report["noise_scale"] if p.get("b_simple") is not None]
    if curve:
        right.plot([p["epoch"] for p in curve], [p["b_simple"] for p in curve], "o-", color="tab:purple",
                   label="B_simple (per epoch)")
        right.axhline(report["phase1_global_batch_size"], color="tab:orange", ls=":", label="phase-1 global batch")
        right.set(xlabel="phase-1 epoch", ylabel="gradient noise scale B_simple", yscale="log")
        for r in rows:
            right.axvline(r["phase1_epochs"], color="tab:gray", alpha=0.4)
            right.annotate(f"τ={r['tau']:g}", (r["phase1_epochs"], right.get_ylim()[1]), fontsize=7, rotation=90,
                           va="top", ha="right")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no gradient noise scale\n(one process, or fp16)", ha="center", va="center")
    right.set_title("phase 1: McCandlish et al. 2018's B_simple")
    right.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
