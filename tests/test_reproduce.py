"""benchmarks/reproduce.py's bookkeeping: which finished runs it may reuse, that each regime's rows are the settings
their names claim, and how it judges the targets. The benchmark itself takes an hour and is never part of the
suite; `--quick` is its smoke test."""

from __future__ import annotations

import pytest

from benchmarks.regimes import GAP, GAP_ROWS, PAPER, PAPER_PHASE2_EPOCHS, SB_EPOCHS
from benchmarks.reproduce import effective
from swap_accel.recipe import load_recipe


def test_baselines_stay_reusable_when_only_swap_settings_change():
    RECIPE = GAP.recipe
    sb = ["mode=sgd", "phase1.global_batch_size=128"]
    base = effective(load_recipe(RECIPE, sb))
    # phase 2 and tau are not read by mode: sgd, so tuning them keeps the finished baselines...
    assert effective(load_recipe(RECIPE, [*sb, "phase2.epochs=9", "phase1.stop_train_accuracy=0.5"])) == base
    # ...but anything the baseline trains with makes it stale, and SWAP runs compare every setting.
    assert effective(load_recipe(RECIPE, [*sb, "phase1.max_epochs=30"])) != base
    assert effective(load_recipe(RECIPE, ["phase2.epochs=9"])) != effective(load_recipe(RECIPE, []))


def _row(acc, train_acc=0.99, seconds=100.0, per_seed=None, bn=None, steps=1000, tau=(True,)):
    return {"critical_path_steps": {"mean": steps}, "phase1_reached_tau_per_seed": list(tau),
            "test_acc": {"mean": acc}, "test_acc_bn": {"mean": acc if bn is None else bn},
            "train_acc": {"mean": train_acc}, "measured_s": {"mean": seconds},
            "parallel_equivalent_s": {"mean": seconds},
            "after_minus_workers_per_seed": per_seed or [0.01], "after_minus_workers_bn_per_seed": per_seed or [0.01]}


def test_gap_targets_are_judged_on_their_thresholds():
    targets = GAP.targets
    # SB 92, LB 90: SWAP must reach 91.8 (SB - 0.2) and 91.5 (LB + 0.75 gap), in half SB's time.
    rows = {"sgd-sb": _row(0.92, seconds=200.0), "sgd-lb": _row(0.90, train_acc=0.95)}
    met = targets({**rows, "swap-w8": _row(0.9181, seconds=100.0, per_seed=[0.01, 0.002])})
    assert all(met.values()), met
    missed = targets({**rows, "swap-w8": _row(0.9170, seconds=101.0, per_seed=[0.01, -0.001])})
    assert [name for name, ok in missed.items() if not ok] == [
        "SWAP after averaging >= SB - 0.2 points", "SWAP after averaging >= SB - 0.2 points, baselines BN-recomputed",
        "SWAP above its workers' mean in every seed",
        "SWAP above its workers' mean in every seed, workers BN-recomputed",
        "SWAP parallel-equivalent time <= 50 % of SB's"]
    # BN-matched: a large batch whose recalibrated accuracy is 91 sets the bar at 91.75, which 91.7 misses.
    bn = targets({"sgd-sb": _row(0.92), "sgd-lb": _row(0.90, bn=0.91), "swap-w8": _row(0.917)})
    assert bn["SWAP after averaging >= LB + 0.75 (SB - LB)"]
    assert not bn["SWAP after averaging >= LB + 0.75 (SB - LB), baselines BN-recomputed"]
    # The regime itself is checked too: a gap under a point, or an unconverged small batch, is reported.
    flat = targets({"sgd-sb": _row(0.92, train_acc=0.97), "sgd-lb": _row(0.915), "swap-w8": _row(0.92)})
    assert not flat["regime: small batch converges (train acc >= 98 %)"]
    assert not flat["regime: large batch >= 1 point below small batch"]


def test_table4_rows_are_valid_recipes_that_share_table1s_runs():
    """benchmarks/table4.py: every row, full and quick, resolves to a valid recipe with the settings the
    row's name claims; the SGD and 8-worker SWAP rows are Table 1's very runs, so one benchmark reuses the other's."""
    from benchmarks import table4

    RECIPE = GAP.recipe

    for table_rows, extra, cycle_epochs, samples in ((table4.rows(5, 8), [], 5, 8),
                                                     (table4.rows(1, 2), list(GAP.quick[:-1]), 1, 2)):
        by_tag = {row.tag: row for row in table_rows}
        recipes = {row.tag: load_recipe(RECIPE, [*row.overrides, *extra]) for row in table_rows}
        for tag in ("swa-lb", "swa-lb-sb", "swa-sb"):
            r = recipes[tag]
            assert r.mode == "swa" and r.worker_layout(2).workers == 1
            assert (r.phase2.epochs, r.phase2.lr.cycles, r.phase2.samples_per_worker) == (
                cycle_epochs * samples, samples, samples)
        assert recipes["swa-lb"].phase2.per_worker_batch_size == recipes["sgd-lb"].phase1.global_batch_size
        assert {t: by_tag[t].phase1_from for t in ("swa-lb", "swa-lb-sb", "swa-sb", "swap-w8-2c")} == {
            "swa-lb": "sgd-lb", "swa-lb-sb": "swap-w8", "swa-sb": "sgd-sb", "swap-w8-2c": "swap-w8"}
        two = recipes["swap-w8-2c"].phase2
        assert (two.epochs, two.lr.cycles, two.samples_per_worker) == (2 * cycle_epochs, 2, 2)
    # Table 1's rows, resolved exactly as benchmarks/reproduce.py resolves them: the same runs.
    table1 = {row.tag: row for row in GAP_ROWS}
    for tag in ("sgd-sb", "sgd-lb", "swap-w8"):
        mine = {row.tag: row for row in table4.rows(5, 8)}[tag]
        assert effective(load_recipe(RECIPE, list(mine.overrides))) == effective(
            load_recipe(RECIPE, list(table1[tag].overrides)))


def test_paper_rows_keep_the_papers_ratios():
    """The paper regime is faithful by the quantities that drive the effect (Table 5, CIFAR-10): large batch 8x small
    batch with >= 1500 steps, tau 98 %, phase 2 = 30 % of small batch's epochs at 0.4x its peak LR without warm-up,
    8 workers; large-batch SWA sees as many images as SWAP's phase 2 in as many critical-path steps."""
    for quick in (False, True):
        extra = list(PAPER.quick) if quick else []
        rows = {row.tag: row for row in PAPER.rows(quick)}
        r = {tag: load_recipe(PAPER.recipe, [*row.overrides, *extra]) for tag, row in rows.items()}
        sb, lb, swap, swa = r["sgd-sb"], r["sgd-lb"], r["swap-w8"], r["swa-lb"]
        images = sb.data.train_subset
        assert lb.phase1.global_batch_size == 8 * sb.phase1.global_batch_size
        assert (swap.phase2.workers, r["swap-w4"].phase2.workers, r["swap-w2"].phase2.workers) == (8, 4, 2)
        assert swap.phase2.per_worker_batch_size == sb.phase1.global_batch_size
        assert swap.phase1 == lb.phase1.model_copy(update={"stop_train_accuracy": 0.98})
        assert swap.phase2.lr.warmup_epochs == 0
        assert swap.phase2.lr.peak == pytest.approx(0.4 * sb.phase1.lr.peak)
        assert {rows[t].phase1_from for t in ("swap-w4", "swap-w2", "swa-lb")} == {"swap-w8"}
        assert swa.mode == "swa" and swa.worker_layout(2).workers == 1
        assert swa.phase2.per_worker_batch_size == lb.phase1.global_batch_size
        assert swa.phase2.epochs == swap.phase2.workers * swap.phase2.epochs  # the same images
        assert swa.phase2.epochs * images // swa.phase2.per_worker_batch_size == (
            swap.phase2.epochs * images // swap.phase2.per_worker_batch_size)  # the same critical-path steps
        assert swa.phase2.lr.peak == pytest.approx(0.4 * lb.phase1.lr.peak)
        if not quick:
            assert images // lb.phase1.global_batch_size * lb.phase1.max_epochs >= 1500
            assert swap.phase2.epochs == PAPER_PHASE2_EPOCHS == round(0.3 * SB_EPOCHS) == round(
                0.3 * sb.phase1.max_epochs)
            assert sb.phase1.lr.warmup_epochs == round(0.3 * SB_EPOCHS)


def test_paper_targets_are_judged_on_the_issue_thresholds():
    # SB 89.2, LB 88.4 raw / 88.6 BN-recomputed: SWAP must reach 89.0 (SB - 0.2) and 88.9 (LB_bn + half the gap),
    # in at most 40 % of SB's 8000 steps.
    base = {"sgd-sb": _row(0.892, steps=8000), "sgd-lb": _row(0.884, bn=0.886, steps=1500, train_acc=0.999),
            "swa-lb": _row(0.8898)}
    met = PAPER.targets({**base, "swap-w8": _row(0.8901, steps=3200)})
    assert all(met.values()), met
    missed = PAPER.targets({**base, "swap-w8": _row(0.8895, steps=3201, tau=(True, False))})
    assert [name for name, ok in missed.items() if not ok] == [
        "regime: phase 1 stops at tau before its budget in every seed", "SWAP after averaging >= SB - 0.2 points",
        "CPU: SWAP critical-path steps <= 40 % of SB's", "SWAP after averaging >= large-batch SWA at the same compute"]
    # Half the gap is judged against large batch with its BN recomputed (88.6 -> bar 88.9), not its raw 88.4.
    half = PAPER.targets({**base, "sgd-sb": _row(0.890, steps=8000), "swap-w8": _row(0.8879, steps=3000)})
    assert not half["SWAP after averaging >= LB (BN recomputed) + 0.5 (SB - LB)"]
    # An unconverged or short large batch is not the paper's regime, and the benchmark says so.
    short = PAPER.targets({**base, "sgd-lb": _row(0.884, steps=200, train_acc=0.93), "swap-w8": _row(0.89)})
    assert not short["regime: large batch trains >= 1500 optimizer steps"]
    assert not short["regime: large batch converges (train acc >= 99 %)"]


def test_table1_verdict_states_the_measured_numbers_and_every_miss():
    from benchmarks.reproduce import verdict

    rows = {"sgd-sb": _row(0.892, steps=8000), "sgd-lb": _row(0.884, bn=0.886, steps=1500),
            "swap-w8": _row(0.8901, steps=3400), "swa-lb": _row(0.8898)}
    targets = PAPER.targets(rows)
    sentence = verdict({"rows": rows, "targets": targets, "seeds": 3})
    assert "89.01 %" in sentence and "89.20 %" in sentence and "88.60 %" in sentence and "88.98 %" in sentence
    assert "42 % of small batch's critical-path" in sentence and "8 of 9 checks pass" in sentence
    assert "(missed: CPU: SWAP critical-path steps <= 40 % of SB's)" in sentence


def test_full_regime_is_table5_number_for_number():
    """The GPU regime is the paper's CIFAR-10 column (Appendix A, Table 5) on all of Fashion-MNIST."""
    from benchmarks.regimes import FULL

    r = {row.tag: load_recipe(FULL.recipe, list(row.overrides)) for row in FULL.rows(False)}
    sb, lb, swap, swa = r["sgd-sb"], r["sgd-lb"], r["swap-w8"], r["swa-lb"]
    assert r["swap-w8"].data.train_subset is None and swap.model.kwargs == {"base_width": 64}
    assert (sb.phase1.global_batch_size, sb.phase1.lr.peak, sb.phase1.max_epochs, sb.phase1.lr.warmup_epochs) == (
        512, 0.3, 100, 30)
    assert (lb.phase1.global_batch_size, lb.phase1.lr.peak, lb.phase1.max_epochs, lb.phase1.lr.warmup_epochs) == (
        4096, 1.2, 150, 30)
    assert swap.phase1.stop_train_accuracy == 0.98
    assert (swap.phase2.workers, swap.phase2.per_worker_batch_size, swap.phase2.epochs, swap.phase2.lr.peak,
            swap.phase2.lr.warmup_epochs) == (8, 512, 30, 0.12, 0)
    assert swa.phase2.epochs == 8 * 30 and swa.phase2.per_worker_batch_size == 4096
    assert 60_000 // 4096 * lb.phase1.max_epochs >= 1500


def _units(todo):
    return [f"{u.row.tag}-s{u.seed}" for u in todo]


def test_planner_fills_the_budget_seed_by_seed_and_reuses_what_is_committed():
    from benchmarks.planner import plan
    from benchmarks.regimes import FULL

    rows = FULL.rows(False)
    cost = {"sgd-sb": 10, "sgd-lb": 10, "swap-w8": 20, "swap-w4": 5, "swap-w2": 5, "swa-lb": 10}

    def estimate(row, seed):
        return float(cost[row.tag]), "test"

    # Nothing committed, 70 s: seed 0 of every row first (60 s); seed 1's small batch fits, its large batch not.
    todo, left = plan(rows, 2, {}, 70.0, estimate, lambda row, seed: False)
    assert _units(todo) == ["sgd-sb-s0", "sgd-lb-s0", "swap-w8-s0", "swap-w4-s0", "swap-w2-s0", "swa-lb-s0",
                            "sgd-sb-s1"]
    assert _units(left)[0] == "sgd-lb-s1"
    # Seed 0 committed: only seed 1 is planned.
    committed = {(row.tag, 0): {} for row in rows}
    todo, _ = plan(rows, 2, committed, 1000.0, estimate, lambda row, seed: False)
    assert _units(todo) == [f"{row.tag}-s1" for row in rows]
    # One dependent missing and SWAP-8's phase 1 gone from this machine: SWAP-8 runs again, and with it every row
    # that starts from its phase 1 (their committed runs would be of the old one)...
    partial = {k: v for k, v in committed.items() if k != ("swap-w2", 0)}
    todo, _ = plan(rows, 1, partial, 1000.0, estimate, lambda row, seed: False)
    assert _units(todo) == ["swap-w8-s0", "swap-w4-s0", "swap-w2-s0", "swa-lb-s0"]
    # ...while a phase 1 still on this machine lets the dependent run alone; and a family that does not fit is left.
    todo, _ = plan(rows, 1, partial, 1000.0, estimate, lambda row, seed: True)
    assert _units(todo) == ["swap-w2-s0"]
    todo, left = plan(rows, 1, partial, 30.0, estimate, lambda row, seed: False)
    assert todo == [] and _units(left) == ["swap-w2-s0"]


def test_store_drops_runs_of_other_settings_and_dependents_of_an_older_phase1(tmp_path):
    from benchmarks.planner import Store
    from benchmarks.regimes import FULL

    rows = FULL.rows(False)
    store = Store("reproduce_full", "NVIDIA H200", root=tmp_path)
    assert store.dir == tmp_path / "reproduce_full" / "nvidia-h200"
    for tag, digest in (("swap-w8", "a"), ("swap-w4", "a"), ("swap-w2", "old"), ("sgd-sb", None)):
        store.save(tag, 0, {"total_seconds": 1.0, "lr": 0.3 if tag == "sgd-sb" else 0.1}, digest)
    found = store.load(rows, 3, lambda row, seed, record: record["lr"] == 0.1)
    # sgd-sb's settings changed; swap-w2 started from another phase 1 than the committed SWAP-8 has now.
    assert sorted(found) == [("swap-w4", 0), ("swap-w8", 0)]
    assert found["swap-w8", 0]["device_name"] == "NVIDIA H200"


@pytest.mark.slow
def test_dry_run_plans_on_this_device_without_running_or_writing(tmp_path):
    """`--budget-minutes ... --dry-run` calibrates this device on the recipe's model and prints the plan; nothing
    is trained and nothing is written under benchmarks/results."""
    import subprocess
    import sys

    from benchmarks.regimes import ROOT

    before = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    for regime, budget, expect in (("paper", "600", "run  sgd-sb-s0"), ("full", "1", "skip sgd-sb-s0")):
        done = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--regime", regime, "--budget-minutes",
                               budget, "--dry-run", "--quick", "--runs-dir", str(tmp_path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert expect in done.stdout and "(calibration)" in done.stdout, done.stdout
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir()) == before
    assert not any(tmp_path.iterdir())
