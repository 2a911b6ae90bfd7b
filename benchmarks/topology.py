"""Worker topology side by side: what W workers on P processes cost in phase 2.

One phase 1 on P = 4 processes, then phase 2 from it (`--from-phase1`) with W = 4 (one worker per
process), W = 2 (groups of 2) and W = 1 (one group of 4), in alternating rounds; and W = 8 on P = 2
(four workers per process, in turn). Prints phase-2 wall clock, the collectives between workers (must
be 0) and inside a worker's group (per step and per DDP bucket, as phase 1's), and for W = 8 the measured
time next to the parallel-equivalent time (phase 1 + slowest single worker + phase 3: what 8 devices
would take). Tiny model on 2 CPU cores: 4 processes share 2 cores, so the ratios, not the seconds, matter.

    .venv/bin/python -m benchmarks.topology [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import replace_block, save

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "name": "topology", "model": {"name": "resnet9", "kwargs": {"base_width": 8}},
    "data": {"train_subset": 4096, "test_subset": 1000},
    "phase1": {"global_batch_size": 512, "micro_batch_size": 128, "max_epochs": 2, "stop_train_accuracy": 0.99,
               "lr": {"peak": 0.4, "warmup_epochs": 1}},
    "phase2": {"per_worker_batch_size": 128, "epochs": 2, "lr": {"peak": 0.05}},
    "eval": {"bn_samples": 1024},
    "tracking": {"eval_every": 0},  # test accuracy at phase ends only: phase-2 time is training time
}


def launch(processes: int, recipe: Path, out: Path, *extra: str) -> dict:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes",
           str(processes), "-m", "swap_accel", "train", str(recipe), "--out", str(out), "--overwrite", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def summary(results: dict) -> dict:
    c, p2 = results["collectives"], results["phase2"]
    return {"phase2_seconds": p2["seconds"], "slowest_worker_seconds": p2["slowest_worker_seconds"],
            "steps_per_worker": p2["steps_per_worker"], "between_workers_calls": c["phase2"]["calls"],
            "in_group_calls": c["phase2_in_group"]["calls"], "in_group_bytes": c["phase2_in_group"]["bytes"],
            "after_averaging": results["after_averaging"]["test_acc"],
            "training_seconds": results["training_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE))
        base = tmp / "phase1"
        launch(4, recipe, base, "--set", "phase2.workers=4")
        for _ in range(args.rounds):
            for workers in (4, 2, 1):
                r = launch(4, recipe, tmp / f"w{workers}", "--set", f"phase2.workers={workers}", "--from-phase1",
                           str(base))
                rows.setdefault(f"P=4 W={workers}", []).append(summary(r))
        p2 = tmp / "p2"
        launch(2, recipe, p2 / "phase1")
        for _ in range(args.rounds):
            r = launch(2, recipe, p2 / "w8", "--set", "phase2.workers=8", "--from-phase1", str(p2 / "phase1"))
            rows.setdefault("P=2 W=8", []).append(summary(r))

    table = {}
    print(f"{'layout':10} {'phase-2 s':>10} {'slowest worker s':>17} {'steps/worker':>13} {'between workers':>16} "
          f"{'in-group calls':>15} {'per step':>9} {'test acc':>9}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("phase2_seconds", "slowest_worker_seconds")}
        last = runs[-1]
        per_step = last["in_group_calls"] / last["steps_per_worker"]
        table[name] = {**last, **med, "rounds": len(runs), "in_group_calls_per_step": per_step}
        print(f"{name:10} {med['phase2_seconds']:10.1f} {med['slowest_worker_seconds']:17.1f} "
              f"{last['steps_per_worker']:13d} {last['between_workers_calls']:16d} {last['in_group_calls']:15d} "
              f"{per_step:9.2f} {100 * last['after_averaging']:8.2f}%")
    w4, w2, w1 = (table[f"P=4 W={w}"]["phase2_seconds"] for w in (4, 2, 1))
    w8 = table["P=2 W=8"]
    ratios = {"W2_over_W4": w2 / w4, "W1_over_W4": w1 / w4,
              "W8_measured_over_parallel_equivalent": w8["training_seconds"]["measured"]
              / w8["training_seconds"]["parallel_equivalent"],
              "W8_phase2_over_slowest_worker": w8["phase2_seconds"] / w8["slowest_worker_seconds"]}
    print(f"phase-2 wall clock on P=4: W=2 / W=4 = {ratios['W2_over_W4']:.2f}, W=1 / W=4 = {ratios['W1_over_W4']:.2f}")
    print(f"P=2 W=8: measured {w8['training_seconds']['measured']:.1f} s vs parallel-equivalent "
          f"{w8['training_seconds']['parallel_equivalent']:.1f} s (phase 1 + slowest worker + phase 3); phase 2 "
          f"{w8['phase2_seconds']:.1f} s = {ratios['W8_phase2_over_slowest_worker']:.2f} x the slowest worker")
    zero = all(r["between_workers_calls"] == 0 for r in table.values())
    print(f"collectives between workers in phase 2: {'0 in every layout' if zero else 'NOT ZERO'}")
    payload = {"recipe": RECIPE, "rounds": args.rounds, "layouts": table, "ratios": ratios, "between_zero": zero}
    print(f"wrote {save('topology', payload)} and {replace_block('topology', render(payload))}")


LAYOUTS = {"P=4 W=4": "P=4, W=4 (one worker per process)", "P=4 W=2": "P=4, W=2 (groups of 2)",
           "P=4 W=1": "P=4, W=1 (one group of 4)", "P=2 W=8": "P=2, W=8 (4 per process, in turn)"}


def render(payload: dict) -> str:
    """The README's topology table and its reading, from this benchmark's own results."""
    table, ratios = payload["layouts"], payload["ratios"]
    lines = [f"Measured with `.venv/bin/python -m benchmarks.topology` (2-core CPU, tiny ResNet-9 on "
             f"{RECIPE['data']['train_subset']} Fashion-MNIST images, {RECIPE['phase2']['epochs']} phase-2 epochs of "
             f"batch {RECIPE['phase2']['per_worker_batch_size']}, medians of {payload['rounds']} alternating rounds; "
             "`benchmarks/results/topology.json`):", "",
             "| layout | phase-2 wall clock (s) | slowest worker (s) | steps per worker | collectives between workers "
             "| in-group collectives (per step) | after averaging |", "|---|---|---|---|---|---|---|"]
    for key, name in LAYOUTS.items():
        row = table[key]
        measured = " measured" if key == "P=2 W=8" else ""
        in_group = (f"{row['in_group_calls']} ({row['in_group_calls_per_step']:.2f})" if row["in_group_calls"]
                    else "0")
        lines.append(f"| {name} | {row['phase2_seconds']:.1f}{measured} | {row['slowest_worker_seconds']:.1f} | "
                     f"{row['steps_per_worker']} | **{row['between_workers_calls']}** | {in_group} | "
                     f"{100 * row['after_averaging']:.2f} % |")
    w8 = table["P=2 W=8"]["training_seconds"]
    lines += ["", f"Phase-2 wall clock on the same 4 processes: W=2 takes **{ratios['W2_over_W4']:.2f}×** and W=1 "
              f"**{ratios['W1_over_W4']:.2f}×** the time of W=4, because each worker's epoch is shared by its group. "
              "In-group collectives are one gradient all-reduce per step per DDP bucket, plus per epoch the epoch's "
              "loss/accuracy sum and the leader's BN statistics, plus the leader's one broadcast of the resume point. "
              f"W=8 on 2 processes: {w8['measured']:.1f} s measured (equal hardware) against a parallel-equivalent "
              f"{w8['parallel_equivalent']:.1f} s (phase 1 and 3 on the 2 processes, phase 2 as 8 workers on 8 "
              "devices); "
              f"its phase 2 is {ratios['W8_phase2_over_slowest_worker']:.2f}× the slowest single worker (4 in turn)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
