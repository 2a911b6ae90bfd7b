"""The paper's Table 4 at CPU scale: SWA against SWAP, in the regime of `recipes/fashion_mnist_gap.yaml`
where large batch really loses (the Table-1 benchmark's regime, benchmarks/reproduce.py).

Every row is `accelerate launch ... -m swap_accel train recipes/fashion_mnist_gap.yaml --set ...` on 2 processes:
- the SGD baselines and SWAP with 8 workers are Table 1's runs (same directories, reused when finished);
- SWA is `mode: swa`: one data-parallel model whose phase 2 takes a sample at the end of each LR cycle, averaged and
  BN-recomputed by phase 3 exactly as SWAP's workers are. Large-batch SWA starts from the large-batch baseline's
  final model, large-batch-then-small-batch SWA from SWAP's phase 1 (interrupted at the same τ, as the paper does),
  small-batch SWA from the small-batch baseline's final model (`--from-phase1`, the paper's section 5.3);
- SWAP with longer phase 2 averages two samples per worker (`phase2.samples_per_worker: 2`, two LR cycles), 16 models.
SWA's cycles are as long as SWAP's phase 2 (the paper: 10-epoch cycles for a 10-epoch phase 2) and restart at
SWAP's phase-2 peak (the paper re-uses one peak for both); large-batch SWA's peak is one third of large batch's own.
These rows were measured with re-warming cycles (`phase2.lr.cycle_shape=restart`: every cycle decays to zero and
starts again at the peak), before mode: swa defaulted to Izmailov et al.'s decay to a constant α2; they request it
explicitly, so rerunning them reproduces the committed results, and the table names each row's schedule.
Training time counts the phase 1 a row started from: a row's time is what it takes to produce its model.

    .venv/bin/python -m benchmarks.table4            # full: one seed, about an hour on 2 cores
    .venv/bin/python -m benchmarks.table4 --quick    # smoke test of the pipeline

Finished runs are reused (an interrupted benchmark continues where it stopped) unless --fresh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import replace_block, save
from benchmarks.regimes import GAP_QUICK as QUICK
from benchmarks.regimes import GAP_RECIPE as RECIPE
from benchmarks.regimes import GAP_SB as SB
from benchmarks.regimes import ROOT, Row
from benchmarks.reproduce import run
from swap_accel.algorithm.schedules import describe
from swap_accel.recipe import load_recipe

SWAP_PHASE2_EPOCHS = 5  # the recipe's phase 2: one cycle of 5 small-batch epochs per worker
# The schedule these rows were measured with (re-warming cycles), requested explicitly since mode: swa defaults to
# Izmailov et al.'s; SWAP's phase 2 keeps it by default, named here so each row says what it ran.
RESTART = "phase2.lr.cycle_shape=restart"


def rows(cycle_epochs: int, samples: int) -> tuple[Row, ...]:
    swa = ("mode=swa", "phase2.workers=1", f"phase2.epochs={cycle_epochs * samples}", f"phase2.lr.cycles={samples}",
           f"phase2.samples_per_worker={samples}", RESTART)
    return (
        Row("SGD (small-batch)", "sgd-sb", SB),
        Row("SGD (large-batch)", "sgd-lb", ("mode=sgd",)),
        Row("Large-batch SWA", "swa-lb", (*swa, "phase2.per_worker_batch_size=2048", "phase2.lr.peak=0.4"),
            phase1_from="sgd-lb"),
        Row("Large-batch followed by small-batch SWA", "swa-lb-sb", swa, phase1_from="swap-w8"),
        Row("Small-batch SWA", "swa-sb", swa, phase1_from="sgd-sb"),
        Row(f"SWAP ({cycle_epochs} small-batch epochs)", "swap-w8", (f"phase2.epochs={cycle_epochs}",)),
        Row(f"SWAP (2 x {cycle_epochs} small-batch epochs, 2 samples per worker)", "swap-w8-2c",
            (f"phase2.epochs={2 * cycle_epochs}", "phase2.lr.cycles=2", "phase2.samples_per_worker=2", RESTART),
            phase1_from="swap-w8"),
    )


def schedule(row: Row) -> str:
    """The phase-2 learning-rate schedule a row runs, from its resolved recipe (the SGD rows have no phase 2)."""
    recipe = load_recipe(RECIPE, list(row.overrides))
    return describe(recipe.phase2.lr, recipe.phase2.epochs) if recipe.phase2_runs else "none (phase 1 only)"


def schedules_of(payload: dict, table_rows: tuple[Row, ...]) -> dict[str, str]:
    """Each row's schedule as the payload records it; a payload written before it recorded them (before
    cycle_shape existed, when every cycle re-warmed) gets it from the rows, which must be the ones it ran."""
    if "schedules" in payload:
        return payload["schedules"]
    for row in table_rows:
        ran = [o for o in payload["rows_overrides"][row.tag] if not o.startswith("from_phase1=")]
        if ran != [o for o in row.overrides if o != RESTART]:
            raise SystemExit(f"{row.tag}: {payload['rows_overrides'][row.tag]} are not this script's rows; rerun the "
                             "benchmark instead of re-rendering its old results")
    return {row.tag: schedule(row) for row in table_rows}


def summary(r: dict) -> dict:
    """One row's numbers: test accuracy before averaging (SWAP: the workers' mean; SWA: its last model; SGD: the
    model, and after the same BN recomputation) and after, and the time to produce the model."""
    if r["mode"] == "sgd":
        return {"before": r["test_acc"], "after": r["phase1"]["test_acc_bn"], "models": 1,
                "seconds": r["phase1"]["seconds"], "measured_seconds": r["phase1"]["seconds"],
                "critical_path_steps": r["critical_path_steps"]}
    return {"before": r["before_averaging"]["mean"], "before_bn": r["before_averaging_bn"]["mean"],
            "after": r["test_acc"], "models": r["phase3"]["averaged_models"],
            # Phase 1 (this run's, or the one it started from) + the slowest worker + phase 3: what W devices take.
            "seconds": r["training_seconds"]["parallel_equivalent"],
            "measured_seconds": r["training_seconds"]["measured"], "critical_path_steps": r["critical_path_steps"]}


def table(table_rows: tuple[Row, ...], numbers: dict, schedules: dict[str, str]) -> str:
    # Equal hardware first: every row measured on the same 2 processes; then the parallel-equivalent time.
    lines = ["| method | phase-2 learning rate | models averaged | test acc before averaging (%) "
             "| test acc after averaging (%) | training time measured on 2 processes (s) "
             "| parallel-equivalent (s): phases 1 and 3 on 2 devices, phase 2 on one per worker "
             "| critical-path steps |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table_rows:
        n = numbers[row.tag]
        after = f"{100 * n['after']:.2f}" + (" (BN recomputed, no averaging)" if n["models"] == 1 else "")
        name = f"**{row.name}**" if row.tag.startswith("swap") else row.name
        lines.append(f"| {name} | {schedules[row.tag]} | {n['models']} | {100 * n['before']:.2f} | {after} | "
                     f"{n['measured_seconds']:.0f} | {n['seconds']:.0f} | {n['critical_path_steps']} |")
    return "\n".join(lines)


def render_readme(payload: dict) -> None:
    """The full benchmark's table between its markers, in README.md or the docs page that holds them (the --quick
    smoke test only prints its own)."""
    if payload["quick"]:
        return
    table_rows = rows(SWAP_PHASE2_EPOCHS, 8)
    rendered = table(table_rows, payload["rows"], schedules_of(payload, table_rows))
    replace_block("table4", f"Measured with `.venv/bin/python -m benchmarks.table4` (`{RECIPE.relative_to(ROOT)}`), "
                            f"seed 0, 2 processes, {payload['runs_total_s'] / 60:.0f} min of runs.\n\n{rendered}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smoke test: small subset, 1-epoch cycles.")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce",
                        help="Shared with benchmarks.reproduce: its finished baselines and SWAP runs are reused.")
    parser.add_argument("--fresh", action="store_true", help="Rerun finished runs instead of reusing them.")
    parser.add_argument("--render", type=Path, help="Only re-render the README table from a results JSON.")
    args = parser.parse_args()
    if args.render:
        return render_readme(json.loads(args.render.read_text()))
    runs_dir = args.runs_dir.resolve()
    extra = list(QUICK[:-1]) if args.quick else []  # QUICK's last override is phase 2's length, set per row here
    table_rows = rows(1, 2) if args.quick else rows(SWAP_PHASE2_EPOCHS, 8)
    prefix, seed = ("quick-" if args.quick else ""), 0
    results, numbers = {}, {}
    # Sources first: a row that starts from another's phase 1 needs that run finished.
    for row in sorted(table_rows, key=lambda r: r.phase1_from is not None):
        overrides = [*row.overrides, *extra]
        source = runs_dir / f"{prefix}{row.phase1_from}-s{seed}" if row.phase1_from else None
        if source is not None:
            overrides.append(f"from_phase1={source}")
        r = run(row, overrides, seed, runs_dir / f"{prefix}{row.tag}-s{seed}", args.fresh, source, recipe=RECIPE)
        results[row.tag], numbers[row.tag] = r, summary(r)
        print(f"{row.name}: test acc {100 * r['test_acc']:.2f}%, {numbers[row.tag]['seconds']:.0f} s", flush=True)
    schedules = {row.tag: schedule(row) for row in table_rows}
    rendered = table(table_rows, numbers, schedules)
    print(rendered)
    payload = {"quick": args.quick, "recipe": str(RECIPE.relative_to(ROOT)), "seed": seed, "extra": extra,
               "rows_overrides": {r.tag: [*r.overrides, *([f"from_phase1=<{r.phase1_from} run>"]
                                                         if r.phase1_from else [])] for r in table_rows},
               "rows": numbers, "schedules": schedules, "table": rendered,
               "runs_total_s": sum(r["total_seconds"] for r in results.values())}
    print(f"wrote {save('table4_quick' if args.quick else 'table4', payload)}")
    render_readme(payload)


if __name__ == "__main__":
    main()
