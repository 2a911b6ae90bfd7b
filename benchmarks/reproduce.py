"""The paper's Table 1: SGD small batch, SGD large batch, SWAP with W = 8, 4 and 2 workers (and, in the faithful
regimes, large-batch SWA at SWAP's compute) on Fashion-MNIST, in one of the regimes of `benchmarks/regimes.py`:
`paper` (default on a CPU; faithful by optimizer steps and ratios), `full` (default with --device cuda; all images
and Table 5's numbers) or `gap` (the earlier record).

Every run is `accelerate launch ... -m swap_accel train RECIPE --set ...` (2 processes on a CPU, one per GPU).
Reports test accuracy mean +- std (raw, and after the BN recomputation SWAP's phase 3 gets), equal-hardware and
parallel-equivalent time, critical-path optimizer steps and counted sync events; judges the regime's targets; writes
benchmarks/results/<regime result>[_quick].json and the table between the regime's markers (README or docs).

    .venv/bin/python -m benchmarks.reproduce                  # paper regime: 3 seeds, about an hour on 2 cores
    .venv/bin/python -m benchmarks.reproduce --regime gap     # the earlier regime, about 90 min
    .venv/bin/python -m benchmarks.reproduce --quick          # smoke test of the pipeline, a few minutes
    .venv/bin/python -m benchmarks.reproduce --device cuda --budget-minutes 60   # full scale (regime full) on a GPU

Finished runs are reused (an interrupted benchmark continues where it stopped) unless --fresh. With a budget
(`--budget-minutes`, implied by `--device cuda`), only the missing runs that fit are run and each finished run is
committed under benchmarks/results/ (benchmarks/planner.py), so a later call adds seeds instead of repeating them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import planner
from benchmarks.common import replace_block, save
from benchmarks.regimes import REGIMES, ROOT, Regime, Row
from swap_accel.data.loading import load_data
from swap_accel.recipe import Recipe, load_recipe


def effective(recipe: Recipe) -> Recipe:
    """The settings a run actually used: `mode: sgd` reads neither phase 2 nor tau, so tuning SWAP's phase 2
    does not make the finished baselines stale (they take most of the benchmark's hour)."""
    if recipe.mode != "sgd":
        return recipe
    return recipe.model_copy(update={"phase2": None, "phase1": recipe.phase1.model_copy(
        update={"stop_train_accuracy": None})})


def phase1_digest(run_dir: Path) -> str | None:
    """The phase-1 weights a run's phase 2 started from (rank 0's record of their digest)."""
    path = run_dir / "ranks" / "rank0.json"
    return json.loads(path.read_text())["phase1"]["params"] if path.exists() else None


def run(row: Row, overrides: list[str], seed: int, out: Path, fresh: bool, source: Path | None = None, *,
        recipe: Path, num_processes: int | None = None) -> dict:
    """One training run. A finished run directory of the same resolved recipe is reused and an interrupted one
    resumes, so an interrupted benchmark continues where it stopped; --fresh starts every run over.
    A run started from `source`'s phase 1 is reused only while that phase 1 is still the one it started from."""
    wanted = effective(load_recipe(recipe, [f"seed={seed}", *overrides]))
    if (out / "results.json").exists() and not fresh:
        finished = json.loads((out / "results.json").read_text())
        # Validating the stored recipe fills keys added since with their defaults.
        if effective(Recipe.model_validate(finished["recipe"])) == wanted and (
                source is None or phase1_digest(out) == phase1_digest(source)):
            return finished
        fresh = True  # the benchmark's settings (or the phase 1 it starts from) changed since: this run is stale
    elif (out / "recipe.yaml").exists() and not fresh:
        # An interrupted run resumes only under its own recipe; one of older settings starts over.
        fresh = effective(load_recipe(out / "recipe.yaml")) != wanted
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_config.yaml"), *processes, "-m", "swap_accel", "train", str(recipe),
           "--out", str(out),
           *(["--overwrite"] if fresh else []), "--set", f"seed={seed}", *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{row.name} seed {seed} failed ({out}):\n{done.stderr[-3000:]}")
    print(f"  {out.name}: {time.perf_counter() - start:.0f} s launch to exit", flush=True)
    return json.loads((out / "results.json").read_text())


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def sync_events(run: dict, source: dict | None) -> int:
    """Collectives of the training itself (phases 1-3; evaluation and reporting are monitoring). A run started
    from another's phase 1 did not run it: that run's phase-1 collectives are on its critical path too."""
    c = (source or run)["collectives"]["phase1"]["calls"]
    return c + run["collectives"]["phase2"]["calls"] + run["collectives"]["phase3"]["calls"]


def summarize(runs: list[dict], sources: list[dict | None]) -> dict:
    swap = runs[0]["mode"] != "sgd"  # SWAP and SWA both average models in phase 3
    times = [r["training_seconds"] if swap else {"measured": r["phase1"]["seconds"],
                                                 "parallel_equivalent": r["phase1"]["seconds"]} for r in runs]
    row = {
        "test_acc": mean_std([r["test_acc"] for r in runs]),
        # Phase 3 gives SWAP fresh BN statistics; the same recalibration of the baselines is their fair
        # comparison (large batch's running statistics cost it ~0.5 points here).
        "test_acc_bn": mean_std([r["test_acc"] if swap else r["phase1"]["test_acc_bn"] for r in runs]),
        # SGD: the last epoch's running training accuracy; SWAP: its workers' mean (the convergence check).
        "train_acc": mean_std([statistics.fmean(w["train_acc"] for w in r["workers"]) if swap
                               else r["phase1"]["train_acc"] for r in runs]),
        "measured_s": mean_std([t["measured"] for t in times]),
        "parallel_equivalent_s": mean_std([t["parallel_equivalent"] for t in times]),
        # The run's own clock from start to results.json: training, evaluation, checkpoints (not the launcher's
        # ~10 s of imports), the same for runs this benchmark launched and finished runs it reuses.
        "run_total_s": mean_std([r["total_seconds"] for r in runs]),
        "critical_path_steps": mean_std([r["critical_path_steps"] for r in runs]),
        "sync_events": mean_std([sync_events(r, s) for r, s in zip(runs, sources, strict=True)]),
        "seeds": len(runs),
    }
    if not swap:  # training throughput, for large batch's per-image speed-up over small batch
        row["images_per_s"] = mean_std([r["phase1"]["steps"] * r["phase1"]["global_batch_size"]
                                        / r["phase1"]["seconds"] for r in runs])
    if swap:
        row["before_averaging"] = mean_std([r["before_averaging"]["mean"] for r in runs])
        row["before_averaging_bn"] = mean_std([r["before_averaging_bn"]["mean"] for r in runs])
        row["phase1_epochs"] = mean_std([r["phase1"]["epochs"] for r in runs])
        row["phase1_reached_tau_per_seed"] = [bool(r["phase1"]["reached_tau"]) for r in runs]
        row["after_minus_workers_per_seed"] = [r["test_acc"] - r["before_averaging"]["mean"] for r in runs]
        row["after_minus_workers_bn_per_seed"] = [r["test_acc"] - r["before_averaging_bn"]["mean"] for r in runs]
    return row


def resumed(results: dict, out: Path) -> bool:
    """A run continued from its own checkpoints (not merely started from another run's phase 1)."""
    start = results.get("resumed_from") or {}
    own_phase1 = bool(start.get("phase1_end")) and Path(start["phase1_end"]).resolve().is_relative_to(out.resolve())
    return bool(start.get("phase1_step") or own_phase1
                or any(v for w in (start.get("workers") or {}).values() for v in w.values()))


def table(table_rows: tuple[Row, ...], rows: dict) -> str:
    # Equal hardware first: every row measured on the same 2 processes; then the parallel-equivalent time.
    lines = ["| method | test accuracy (%) | BN recomputed (%) | train accuracy (%) | measured on 2 processes (s) "
             "| parallel-equivalent (s) | critical-path steps | sync events |", "|---|---|---|---|---|---|---|---|"]

    def pct(ms):
        return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"

    for row in table_rows:
        r = rows[row.tag]
        rest = (f"{pct(r['train_acc'])} | {r['measured_s']['mean']:.0f} | {r['parallel_equivalent_s']['mean']:.0f} | "
                f"{r['critical_path_steps']['mean']:.0f} | {r['sync_events']['mean']:.0f}")
        if "before_averaging" in r:
            before = "workers' mean" if row.tag.startswith("swap") else "last model"
            lines.append(f"| {row.name}, before averaging ({before}) | {pct(r['before_averaging'])} | "
                         f"{pct(r['before_averaging_bn'])} | {rest} |")
            lines.append(f"| **{row.name}, after averaging** | **{pct(r['test_acc'])}** | {pct(r['test_acc_bn'])} | "
                         f"{rest} |")
        else:
            lines.append(f"| {row.name} | {pct(r['test_acc'])} | {pct(r['test_acc_bn'])} | {rest} |")
    return "\n".join(lines)


def command(regime: Regime, quick: bool) -> str:
    flag = {"paper": "", "full": " --device cuda"}.get(regime.name, f" --regime {regime.name}")
    return ".venv/bin/python -m benchmarks.reproduce" + flag + (" --quick" if quick else "")


def verdict(payload: dict) -> str:
    """Table 1's result in one sentence, from the numbers the benchmark wrote."""
    rows, targets = payload["rows"], payload["targets"]
    sb, lb, swap, swa = (rows[t] for t in ("sgd-sb", "sgd-lb", "swap-w8", "swa-lb"))
    missed = [name for name, ok in targets.items() if not ok]

    def pct(row, key="test_acc"):
        return f"{100 * row[key]['mean']:.2f} %"

    share = swap["critical_path_steps"]["mean"] / sb["critical_path_steps"]["mean"]
    return (f"**SWAP with 8 workers reaches {pct(swap)} against small batch's {pct(sb)} and large batch's "
            f"{pct(lb, 'test_acc_bn')} (BN recomputed; large-batch SWA at the same compute: {pct(swa)}), in "
            f"{100 * share:.0f} % of small batch's critical-path optimizer steps, mean of {payload['seeds']} seeds: "
            f"{len(targets) - len(missed)} of {len(targets)} checks pass"
            + (f" (missed: {'; '.join(missed)})." if missed else ".") + "**")


def render_readme(payload: dict) -> None:
    """Put the table, the targets and the command that made them between the README's markers."""
    regime = REGIMES[payload.get("regime", "gap")]  # payloads from before the paper regime are the gap regime's
    quick = payload["quick"]
    smoke = " **A smoke test of the pipeline, not a result.**" if quick else ""
    checks = "\n".join(f"- {'PASS' if ok else 'MISS'}: {name}" for name, ok in payload["targets"].items())
    if payload.get("missing_rows"):
        checks = f"Targets not judged yet: no run of {', '.join(payload['missing_rows'])}."
    note = f"\n\n{regime.note}" if regime.note else ""
    if payload.get("large_batch_speedup_per_image") and regime.name == "full":
        note += f" Measured: large batch trains {payload['large_batch_speedup_per_image']:.2f}x small batch's images/s."
    per_row = payload.get("seeds_per_row") or {}
    seeds = (f"{payload['seeds']} seeds per row" if all(n == payload["seeds"] for n in per_row.values()) else
             "seeds per row: " + ", ".join(f"{tag} {n}" for tag, n in per_row.items()))
    where = f"{payload.get('processes', 2)} process(es) on {payload.get('device') or 'cpu'}"
    replace_block(regime.marker + ("-quick" if quick else ""),
                  f"Measured with `{command(regime, quick)}` (`{payload['recipe']}`"
                  f"{', ' + ', '.join(payload['extra']) if payload['extra'] else ''}), {seeds}, {where}, "
                  f"{payload['runs_total_s'] / 60:.0f} min of runs.{smoke}\n\n{payload['table']}{note}\n\n{checks}")
    if regime.name == "paper" and not quick:
        replace_block("table1-verdict", verdict(payload))


def comparable(recipe: Recipe) -> Recipe:
    """`effective` settings without the machine-specific path of the phase 1 a row started from (its weights are
    compared by digest instead)."""
    return effective(recipe).model_copy(update={"from_phase1": None})


def run_all(regime: Regime, table_rows: tuple[Row, ...], seeds: int, extra: list[str], runs_dir: Path, prefix: str,
            fresh: bool) -> dict[str, dict[int, dict]]:
    """Every row and seed on this machine, reusing its finished run directories."""
    return {row.tag: {seed: launch(regime, row, seed, extra, runs_dir, prefix, fresh) for seed in range(seeds)}
            for row in table_rows}


def launch(regime: Regime, row: Row, seed: int, extra: list[str], runs_dir: Path, prefix: str, fresh: bool,
           num_processes: int | None = None) -> dict:
    source_dir = runs_dir / f"{prefix}{row.phase1_from}-s{seed}" if row.phase1_from else None
    overrides = [*row.overrides, *extra, *([f"from_phase1={source_dir}"] if source_dir else [])]
    out = runs_dir / f"{prefix}{row.tag}-s{seed}"
    r = run(row, overrides, seed, out, fresh, source_dir, recipe=regime.recipe, num_processes=num_processes)
    if resumed(r, out):
        print(f"  note: {out.name} was resumed, so its collectives and seconds count its last launch only; "
              "rerun with --fresh for exact counts", flush=True)
    print(f"{row.name} seed {seed}: test acc {100 * r['test_acc']:.2f}%, {r['total_seconds']:.0f} s", flush=True)
    return r


def run_planned(regime: Regime, table_rows: tuple[Row, ...], seeds: int, extra: list[str], runs_dir: Path,
                prefix: str, args) -> dict[str, dict[int, dict]] | None:
    """The missing runs that fit --budget-minutes on this device (benchmarks/planner.py), each committed as it
    finishes; then every committed run of this regime and device. None with --dry-run (the plan only)."""
    device = planner.device_name(args.device)
    store = planner.Store(regime.result + ("_quick" if args.quick else ""), device)
    processes = args.num_processes or (torch.cuda.device_count() if args.device == "cuda" else 2)

    def recipe_of(row: Row, seed: int) -> Recipe:
        return load_recipe(regime.recipe, [f"seed={seed}", *row.overrides, *extra])

    committed = store.load(table_rows, seeds, lambda row, seed, record: comparable(
        Recipe.model_validate(record["recipe"])) == comparable(recipe_of(row, seed)))
    data = load_data(recipe_of(table_rows[0], 0).data, torch.device("cpu"), split="train")
    tau_epochs = [r["phase1"]["epochs"] for (tag, _), r in committed.items() if tag == "swap-w8"]
    rates: dict[int, float] = {}

    def estimate(row: Row, seed: int) -> tuple[float, str]:
        seen = planner.committed_seconds(committed, row.tag)
        if seen is not None:
            return seen, "committed runs on this device"
        recipe = recipe_of(row, seed)
        images = planner.per_process_images(recipe, data.num_samples, processes,
                                            statistics.fmean(tau_epochs) if tau_epochs else None,
                                            trains_phase1=row.phase1_from is None)
        timed = {b: planner.calibration_batch(b, args.device) for b in images}
        for b in set(timed.values()) - rates.keys():
            rates[b] = planner.calibrate(recipe, b, args.device, in_chans=data.in_chans,
                                         num_classes=data.num_classes, image_size=data.image_size)
        return planner.MARGIN * sum(n / rates[timed[b]] for b, n in images.items()), "calibration"

    def has_local_phase1(row: Row, seed: int) -> bool:
        source = runs_dir / f"{prefix}{row.phase1_from}-s{seed}"
        record = committed.get((row.phase1_from, seed))
        return (source / "checkpoints" / "p1-end").exists() and record is not None \
            and phase1_digest(source) == record["phase1_params"]

    budget_s = 60 * args.budget_minutes
    todo, left_out = planner.plan(table_rows, seeds, committed, budget_s, estimate, has_local_phase1)
    print(f"{device}, {processes} process(es); committed: {len(committed)} run(s) in {store.dir}", flush=True)
    print(planner.describe(todo, left_out, budget_s), flush=True)
    if args.dry_run:
        return None
    start = time.monotonic()
    for unit in todo:
        left = budget_s - (time.monotonic() - start)
        if unit.seconds > left or (unit.row.phase1_from and (unit.row.phase1_from, unit.seed) not in committed):
            print(f"  skipped {unit.row.tag}-s{unit.seed}: ~{unit.seconds / 60:.1f} min, {left / 60:.1f} left "
                  "(or its source did not run)", flush=True)
            continue
        r = launch(regime, unit.row, unit.seed, extra, runs_dir, prefix, args.fresh, processes)
        committed[unit.row.tag, unit.seed] = store.save(
            unit.row.tag, unit.seed, r, phase1_digest(runs_dir / f"{prefix}{unit.row.tag}-s{unit.seed}"))
    return {row.tag: {s: committed[row.tag, s] for s in range(seeds) if (row.tag, s) in committed}
            for row in table_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIMES),
                        help="paper: faithful by optimizer steps (default on cpu); full: all images, Table 5's "
                             "numbers (default on cuda); gap: the earlier regime, kept as record.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: plan the rows to --budget-minutes and commit each run (default regime full).")
    parser.add_argument("--budget-minutes", type=float,
                        help="Run only the missing runs that fit this many minutes, reusing the runs committed under "
                             "benchmarks/results/<regime result>/<device>/ (default 60 with --device cuda).")
    parser.add_argument("--dry-run", action="store_true", help="With a budget: calibrate, print the plan, exit.")
    parser.add_argument("--num-processes", type=int, help="Processes per run (default: the GPUs, or 2 on cpu).")
    parser.add_argument("--render", type=Path, help="Only re-render the README table from a results JSON.")
    parser.add_argument("--quick", action="store_true", help="Smoke test: small subset, few epochs, 2 seeds.")
    parser.add_argument("--seeds", type=int, help="Seeds per row (default 3; 2 with --quick).")
    parser.add_argument("--runs-dir", type=Path, help="Where the runs go (default runs/reproduce for the gap regime, "
                                                      "runs/reproduce-<regime> otherwise).")
    parser.add_argument("--fresh", action="store_true", help="Rerun finished runs instead of reusing them.")
    args = parser.parse_args()
    if args.render:
        return render_readme(json.loads(args.render.read_text()))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; run on a GPU machine or use --device cpu")
    regime = REGIMES[args.regime or ("full" if args.device == "cuda" else "paper")]
    if args.budget_minutes is None and args.device == "cuda":
        args.budget_minutes = 60.0
    runs_dir = (args.runs_dir or regime.default_runs_dir()).resolve()  # the runs are launched from the repository root
    if args.quick:
        print("--quick: a smoke test of the benchmark pipeline (small subset, few epochs): its accuracies are not "
              "the paper's claim; the full run is the result.", flush=True)
    extra, seeds = list(regime.quick if args.quick else ()), args.seeds or (2 if args.quick else 3)
    table_rows = regime.rows(args.quick)
    prefix = "quick-" if args.quick else ""
    if args.budget_minutes is None:
        results = run_all(regime, table_rows, seeds, extra, runs_dir, prefix, args.fresh)
    else:
        results = run_planned(regime, table_rows, seeds, extra, runs_dir, prefix, args)
        if results is None:
            return
    report(regime, table_rows, results, seeds, extra, args.quick)


def report(regime: Regime, table_rows: tuple[Row, ...], results: dict[str, dict[int, dict]], seeds: int,
           extra: list[str], quick: bool) -> None:
    """Summarize the rows that have runs, judge the targets once every row has one, write the JSON and the table.
    `results[tag][seed]`: a row started from another's phase 1 counts that run's phase-1 collectives (`sync_events`)."""
    measured = tuple(r for r in table_rows if results.get(r.tag))
    rows = {}
    for row in measured:
        runs = results[row.tag]
        sources = [results[row.phase1_from][seed] if row.phase1_from else None for seed in runs]
        rows[row.tag] = summarize(list(runs.values()), sources)
    missing = [r.tag for r in table_rows if r not in measured]
    first = next(iter(results[measured[0].tag].values())) if measured else None
    checks = regime.targets(rows) if not missing else {}
    speedup = (rows["sgd-lb"]["images_per_s"]["mean"] / rows["sgd-sb"]["images_per_s"]["mean"]
               if {"sgd-lb", "sgd-sb"} <= rows.keys() else None)
    rendered = table(measured, rows)
    print(rendered)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'} {name}")
    if missing:
        print(f"targets not judged: no run yet of {', '.join(missing)}")
    payload = {"regime": regime.name, "quick": quick, "recipe": regime.relative_recipe(), "seeds": seeds,
               "seeds_per_row": {tag: len(runs) for tag, runs in results.items()},
               "device": first.get("device_name", "cpu") if first else None,
               "processes": first["num_processes"] if first else None,
               "rows_overrides": {r.tag: [*r.overrides, *([f"from_phase1=<{r.phase1_from} run>"]
                                                         if r.phase1_from else [])] for r in table_rows},
               "extra": extra, "rows": rows, "targets": checks, "missing_rows": missing, "table": rendered,
               "large_batch_speedup_per_image": speedup,
               "runs_total_s": sum(r["total_seconds"] for runs in results.values() for r in runs.values())}
    print(f"wrote {save(regime.result + ('_quick' if quick else ''), payload)}")
    render_readme(payload)


if __name__ == "__main__":
    main()
