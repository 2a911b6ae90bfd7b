"""`swap_accel transition RECIPE --candidates 0.85,0.88,0.90,0.92`: choosing τ, the transition point.

The paper grid-searched τ by hand and names choosing it as future work (section 6). Here one phase-1 run to the
highest candidate keeps its state where the training accuracy first reaches each lower one
(`phase1.save_at_train_accuracy`, checkpoints/p1-tau<τ>); that run's own phase 2 is the highest candidate's, and
`train --from-phase1 .../p1-tau<τ>` gives each other candidate the same short phase 2 (W workers on the same P
processes, the worker topology). Every run trains without `data.holdout_samples` images of the training split, and
τ is chosen on those, never on the test set (reported beside them, not used).

The recommendation weighs held-out accuracy against parallel-equivalent time (phase 1 to τ + the slowest worker +
phase 3: what W devices would take): the fastest candidate whose held-out accuracy is within one binomial standard
error of the best. Held-out accuracy per minute alone would always pick the earliest τ; the best accuracy alone
ignores time, and differences below one standard error of the held-out estimate are not evidence.

This is a plain process that launches `accelerate launch -m swap_accel train` runs one after another: each run is a
normal run directory, resumable by rerunning the same command, and a finished one is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..checkpointing.files import verify_checkpoint, write_json
from ..checkpointing.resume import ROOT, check_data, check_model
from ..checkpointing.rundir import recipe_difference
from ..recipe import Recipe, RecipeError, load_recipe
from .preflight import preflight  # the checks `train` makes before any process group, for the phase-1 run
from .transition_plot import save as save_plot


class TransitionError(RuntimeError):
    pass


def parse_candidates(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise RecipeError(f"--candidates {text!r} must be comma-separated training accuracies, e.g. 0.85,0.9") from None
    if len(values) < 2 or any(not 0 < v <= 1 for v in values):
        raise RecipeError(f"--candidates {text!r}: give at least two training accuracies in (0, 1], e.g. 0.85,0.9")
    return values


def candidate_dir(out: Path, tau: float) -> Path:
    return out / f"tau{tau:g}"


def plan(recipe_path: Path, overrides: list[str], candidates: list[float], holdout: int | None,
         phase2_epochs: int | None) -> tuple[list[str], list[str]]:
    """The overrides every run shares, and those of the phase-1 run (which keeps p1-tau<τ> checkpoints)."""
    common = [*overrides]
    base = load_recipe(recipe_path, common)
    if base.mode != "swap":
        raise RecipeError(f"transition needs a SWAP recipe (mode: swap), {recipe_path} has mode: {base.mode}")
    if holdout is not None or base.data.holdout_samples is None:
        common.append(f"data.holdout_samples={holdout or 5000}")
    if phase2_epochs is not None:
        common.append(f"phase2.epochs={phase2_epochs}")
    return common, [*common, f"phase1.stop_train_accuracy={max(candidates)}",
                    f"phase1.save_at_train_accuracy={candidates}"]


def _launch(recipe_path: Path, overrides: list[str], out: Path, num_processes: int, config_file: Path | None,
            label: str) -> dict:
    """One `train` run; a finished one of the same recipe is reused, an unfinished one resumes."""
    wanted = load_recipe(recipe_path, overrides)
    if (out / "results.json").exists():
        finished = json.loads((out / "results.json").read_text())
        diff = recipe_difference(wanted, finished["recipe"])
        if diff is None and finished["num_processes"] != num_processes:  # its times would not compare
            diff = f"num_processes: {finished['num_processes']} -> {num_processes}"
        if diff is None:
            if (out / ROOT / "p1-end").exists():
                check_phase1(out / ROOT / "p1-end", wanted)
            print(f"[transition] {label}: reusing the finished run in {out}", flush=True)
            return finished
        raise TransitionError(f"{out} holds a finished run of other settings ({diff}); pass --overwrite to start "
                              "the search over, or choose --out DIR")
    # accelerate's launch command as a module of this interpreter: what `accelerate launch` runs, without the console
    # script's import of every other subcommand first (3 s of start-up per run).
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           *(["--config_file", str(config_file)] if config_file else []), "--num_processes", str(num_processes),
           "-m", "swap_accel", "train", str(recipe_path), "--out", str(out),
           *[a for o in overrides for a in ("--set", o)]]
    print(f"[transition] {label}: {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd)
    if done.returncode:
        raise TransitionError(f"the run for {label} failed (exit {done.returncode}, its output is above); finished "
                              "runs are kept: rerun the same command to resume")
    return json.loads((out / "results.json").read_text())


def check_phase1(checkpoint: Path, recipe: Recipe) -> None:
    """Before a candidate's phase 2 starts from `checkpoint` (a p1-tau<τ> of the search's phase-1 run), or a finished
    run is reused: it is this search's model, trained on exactly the recipe's training images, so τ is chosen on
    held-out images no candidate trained on (the search's whole point). Checked here, before any launch."""
    manifest = verify_checkpoint(checkpoint)
    check_model(manifest, checkpoint, recipe)
    check_data(manifest, checkpoint, recipe, trained_by="phase 1",
               consequence="a candidate's phase 2 would train on other images than its phase 1",
               missing_fix="pass --overwrite to run the search again with this version",
               mismatch_fix=lambda theirs, ours: "pass --overwrite to run the search again with these settings")


def _row(tau: float, results: dict, manifest: dict, run_dir: Path) -> dict:
    p1 = manifest["result"]
    return {"tau": tau, "phase1_epochs": p1["epochs"], "phase1_steps": p1["steps"], "train_acc": p1["train_acc"],
            "phase1_seconds": p1["seconds"],
            "parallel_equivalent_seconds": results["training_seconds"]["parallel_equivalent"],
            "measured_seconds": results["training_seconds"]["measured"], "holdout_acc": results["holdout_acc"],
            "holdout_samples": results["recipe"]["data"]["holdout_samples"], "test_acc": results["test_acc"],
            "workers_mean_test_acc": results["before_averaging"]["mean"], "run_dir": str(run_dir)}


def recommend(rows: list[dict]) -> dict:
    """The fastest candidate whose held-out accuracy is within one standard error of the best (module doc)."""
    best = max(rows, key=lambda r: r["holdout_acc"])
    p, n = best["holdout_acc"], best["holdout_samples"]
    standard_error = math.sqrt(max(p * (1 - p), 1e-12) / n)
    close = [r for r in rows if r["holdout_acc"] >= p - standard_error]
    chosen = min(close, key=lambda r: (r["parallel_equivalent_seconds"], -r["holdout_acc"]))
    return {"tau": chosen["tau"], "best_tau": best["tau"], "standard_error": standard_error,
            "rule": "fastest candidate within one binomial standard error of the best held-out accuracy"}


def noise_curve(results: dict) -> list[dict]:
    """Phase 1's per-epoch gradient noise scale (noise_scale.py) beside its training accuracy."""
    return [{"epoch": r["epoch"], "train_acc": r["train_acc"], **(r.get("noise_scale") or {})}
            for r in results["phase1"]["history"]]


def run(recipe_path: Path, overrides: list[str], candidates: list[float], out: Path, *, num_processes: int,
        config_file: Path | None, holdout: int | None, phase2_epochs: int | None, overwrite: bool) -> dict:
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise TransitionError("transition launches its own runs: start it as `python -m swap_accel transition ...`, "
                              "not under accelerate launch")
    common, first = plan(recipe_path, overrides, candidates, holdout, phase2_epochs)
    top = max(candidates)
    main_dir = candidate_dir(out, top)
    first_recipe, _ = preflight(recipe_path, first, num_processes, main_dir, overwrite=True)
    if overwrite:  # only what a search writes: --out may be a folder that also holds other runs
        for old in out.glob("tau*"):
            shutil.rmtree(old)
        for name in ("transition.json", "transition.png"):
            (out / name).unlink(missing_ok=True)
    main = _launch(recipe_path, first, main_dir, num_processes, config_file, f"phase 1 to tau={top:g} and its phase 2")
    rows, skipped, by_step = [], [], {}
    for tau in reversed(candidates):  # the highest first: the phase-1 run's own phase 2 is its row
        checkpoint = main_dir / "checkpoints" / f"p1-tau{tau:g}"
        if not (checkpoint / "manifest.json").exists():
            skipped.append({"tau": tau, "why": f"training accuracy never reached it within phase1.max_epochs "
                                               f"(phase 1 ended at {100 * main['phase1']['train_acc']:.2f} %)"})
            continue
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        step = manifest["step"]
        if step in by_step:  # one epoch crossed several candidates: the same start, the same run
            skipped.append({"tau": tau, "why": f"reached in the same epoch as tau={by_step[step]['tau']:g}"})
            continue
        run_dir = candidate_dir(out, tau)
        if tau != top:
            overrides_tau = [*common, f"phase1.stop_train_accuracy={tau}", f"from_phase1={checkpoint}"]
            check_phase1(checkpoint, load_recipe(recipe_path, overrides_tau))
        results = main if tau == top else _launch(recipe_path, overrides_tau, run_dir, num_processes, config_file,
                                                  f"phase 2 from tau={tau:g}")
        by_step[step] = _row(tau, results, manifest, run_dir)
        rows.append(by_step[step])
    rows.sort(key=lambda r: r["tau"])
    if not rows:
        raise TransitionError(f"no candidate was reached in phase 1 ({skipped[0]['why']}); lower the candidates or "
                              "raise phase1.max_epochs")
    report = {"candidates": candidates, "rows": rows, "skipped": skipped, "recommendation": recommend(rows),
              "noise_scale": noise_curve(main), "phase1_global_batch_size": first_recipe.phase1.global_batch_size,
              "phase2": {"workers": main["phase2"]["workers"], "epochs": main["phase2"]["epochs"]},
              "num_processes": num_processes}
    write_json(out / "transition.json", report)
    report["figure"] = str(save_plot(report, out / "transition.png"))
    return report


def print_report(report: dict) -> None:
    """The search's table, recommendation and phase-1 noise scale on the console."""
    print(f"\ntransition search, W={report['phase2']['workers']} workers x {report['phase2']['epochs']} phase-2 "
          f"epochs on {report['num_processes']} process(es); held-out accuracy of the averaged model:")
    print("  tau    phase-1 epochs  train acc  parallel-equiv. s  held-out acc  test acc (not used)")
    for r in report["rows"]:
        print(f"  {r['tau']:<6g} {r['phase1_epochs']:>14}  {100 * r['train_acc']:8.2f}%  "
              f"{r['parallel_equivalent_seconds']:17.1f}  {100 * r['holdout_acc']:11.2f}%  {100 * r['test_acc']:8.2f}%")
    for s in report["skipped"]:
        print(f"  {s['tau']:<6g} skipped: {s['why']}")
    rec = report["recommendation"]
    print(f"recommended tau = {rec['tau']:g} ({rec['rule']}: {100 * rec['standard_error']:.2f} points; best "
          f"held-out at tau = {rec['best_tau']:g})")
    noise = [p for p in report["noise_scale"] if p.get("b_simple") is not None]
    if noise:
        print("phase-1 gradient noise scale B_simple per epoch: "
              + ", ".join(f"{p['b_simple']:.0f}" for p in noise)
              + f" (phase-1 global batch {report['phase1_global_batch_size']})")
    print(f"figure: {report['figure']}; raw: {Path(report['figure']).with_name('transition.json')}")
