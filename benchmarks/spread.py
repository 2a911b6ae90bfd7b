"""How far the averaged models spread, against what averaging them gains: the premise of the paper's section 4.

SWAP's gain needs workers that end in *different* points of one basin (section 4: the workers sit on the rim, the
average nearer the centre). For every run of a `benchmarks.reproduce` regime that averages models (SWAP with W
workers, SWA's samples), this reads the saved models and reports, per row over the seeds:
- how far each model moved from the phase-1 model it started from (||theta_k - theta_p1||),
- the mean pairwise distance between the averaged models, and their mean distance to the average,
- averaging's gain in test accuracy over the models' mean, both BN-recomputed (`after - before_bn`).
Parameters only: BatchNorm statistics are recomputed, not averaged as weights. No training, a few seconds.

    .venv/bin/python -m benchmarks.spread                    # the paper regime's runs (runs/reproduce-paper)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import save
from benchmarks.regimes import REGIMES
from swap_accel.checkpointing.files import load_weights
from swap_accel.checkpointing.resume import ROOT
from swap_accel.checkpointing.snapshots import sample_dirs

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def parameters(directory: Path) -> torch.Tensor:
    state = load_weights(directory / "model.safetensors")
    return torch.cat([t.double().reshape(-1) for k, t in sorted(state.items()) if not k.endswith(BUFFERS)])


def spread(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    p2 = results["phase2"]
    models = [parameters(d) for k in range(p2["workers"]) for d in sample_dirs(run_dir, k, p2["samples_per_worker"])]
    start_dir = Path((results.get("resumed_from") or {}).get("phase1_end") or run_dir / ROOT / "p1-end")
    start = parameters(start_dir)
    mean = torch.stack(models).mean(0)
    return {
        "models": len(models),
        "moved": statistics.fmean(float((m - start).norm()) for m in models),
        "pairwise": statistics.fmean(float((a - b).norm()) for a, b in itertools.combinations(models, 2)),
        "to_average": statistics.fmean(float((m - mean).norm()) for m in models),
        "start_norm": float(start.norm()),
        "gain_bn": results["test_acc"] - results["before_averaging_bn"]["mean"],
        "test_acc": results["test_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="paper")
    parser.add_argument("--runs-dir", type=Path, help="default: benchmarks.reproduce's for the regime")
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    runs_dir = args.runs_dir or regime.default_runs_dir()
    rows = {}
    print(f"{'row':38s} {'models':>6s} {'moved':>8s} {'pairwise':>9s} {'to avg':>8s} {'gain (pts)':>10s}")
    for row in regime.rows(False):
        if row.tag.startswith("sgd"):  # one model: nothing averaged
            continue
        seeds = [spread(d) for d in sorted(runs_dir.glob(f"{row.tag}-s*")) if (d / "results.json").exists()]
        if not seeds:
            continue
        rows[row.tag] = {key: statistics.fmean(s[key] for s in seeds) for key in seeds[0]} | {"seeds": len(seeds)}
        r = rows[row.tag]
        print(f"{row.name:38s} {r['models']:6.0f} {r['moved']:8.3f} {r['pairwise']:9.3f} {r['to_average']:8.3f} "
              f"{100 * r['gain_bn']:+10.2f}")
    print(f"wrote {save(f'spread_{regime.name}', {'regime': regime.name, 'rows': rows})}")


if __name__ == "__main__":
    main()
