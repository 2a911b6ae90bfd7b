"""Choosing the transition point. The gradient noise scale estimator against a known gradient
variance, its DDP comm hook against hand-computed gradients on two real processes, the held-out split, the
recommendation rule, and a real `swap_accel transition` search on two processes whose rows are checked against
the runs' own checkpoints and a held-out accuracy recomputed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from launching import ROOT, needs_fashion, run_on_ranks, tiny_recipe

from swap_accel.algorithm.noise_scale import GradientNoise, estimate
from swap_accel.checkpointing.files import load_weights_into
from swap_accel.data.loading import _indices
from swap_accel.data.sources import DataError
from swap_accel.models import build_model
from swap_accel.recipe import DataConfig, load_recipe
from swap_accel.tools.transition import parse_candidates, recommend


def test_noise_scale_recovers_a_known_gradient_variance():
    """Per-sample gradients G + ε with Cov(ε) = diag(σ²): B_simple = Σσ² / |G|² exactly. Batches of B_small on each
    of P "processes" and their mean over B_big = P·B_small, averaged over many steps as an epoch does."""
    g = torch.Generator().manual_seed(0)
    dim, processes, b_small, steps = 50, 4, 16, 4000
    true_g = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    expected = float((sigma**2).sum() / (true_g @ true_g))
    samples = true_g + sigma * torch.randn(steps, processes, b_small, dim, generator=g, dtype=torch.float64)
    local = samples.mean(2)  # each process's gradient over its own batch
    reduced = local.mean(1)  # the all-reduced gradient over the global batch
    # What phase 1's epoch all-reduce hands over: every process's local² summed, and the same global² P times.
    sums = [float(local.pow(2).sum()), processes * float(reduced.pow(2).sum())]
    got = GradientNoise().epoch_estimate(sums, steps, processes, processes * b_small)
    assert got["b_simple"] == pytest.approx(expected, rel=0.05)
    assert got["trace_cov"] == pytest.approx(float((sigma**2).sum()), rel=0.03)
    assert got["grad_sq"] == pytest.approx(float(true_g @ true_g), rel=0.05)
    # The exact expectations in, the exact answer out; noise so large that |G|² < 0: undefined, not a huge number.
    g2, tr = float(true_g @ true_g), float((sigma**2).sum())
    exact = estimate(g2 + tr / b_small, g2 + tr / (processes * b_small), b_small, processes * b_small)
    assert exact["b_simple"] == pytest.approx(expected, rel=1e-9)
    assert estimate(1.0, 0.1, 16, 64)["b_simple"] is None  # |G|² = (64·0.1 − 16·1)/48 < 0


HOOK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    import torch.distributed as dist
    from swap_accel.parallel.distributed import make_accelerator
    from swap_accel.algorithm import noise_scale
    from swap_accel.algorithm.noise_scale import GradientNoise

    acc = make_accelerator()
    rank = acc.process_index
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 600), torch.nn.ReLU(), torch.nn.Linear(600, 500))
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1))[rank]
    reference = [p.detach().clone() for p in net.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.5)
    calls = []
    original = noise_scale._hook
    noise_scale._hook = lambda state, bucket: calls.append(bucket.index()) or original(state, bucket)
    noise = GradientNoise.attach(ddp)
    ddp(x).pow(2).mean().backward()  # DDP rebuilds its buckets (0.5 MB each) after its first backward
    net.zero_grad()
    noise.sums, calls[:] = torch.zeros(2, dtype=torch.float64), []
    ddp(x).pow(2).mean().backward()
    noise.add_reduced(ddp)
    # This rank's own gradient, by hand on a copy that is not data-parallel.
    copy = torch.nn.Sequential(torch.nn.Linear(6, 600), torch.nn.ReLU(), torch.nn.Linear(600, 500))
    for p, r in zip(copy.parameters(), reference):
        p.data.copy_(r)
    copy(x).pow(2).mean().backward()
    local = torch.cat([p.grad.flatten() for p in copy.parameters()]).double()
    mine = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(mine, local)
    reduced = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
    out = {"hook": noise.sums.tolist(), "buckets": len(calls), "local_sq": float(local @ local),
           "mean_sq": float((sum(mine) / 2).pow(2).sum()), "reduced_sq": float(reduced @ reduced)}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
""")


@pytest.mark.slow
def test_comm_hook_measures_the_local_and_the_all_reduced_gradient_on_two_real_processes(tmp_path):
    outs = run_on_ranks(HOOK_SCRIPT, tmp_path)
    assert outs[0]["local_sq"] != pytest.approx(outs[1]["local_sq"])  # different data per rank
    for out in outs:
        local_sq, global_sq = out["hook"]
        assert local_sq == pytest.approx(out["local_sq"], rel=1e-6)  # before the all-reduce: this rank's gradient
        # After it, from .grad (float32 norms): the mean of both ranks' gradients, which is what DDP left in .grad.
        assert global_sq == pytest.approx(out["mean_sq"], rel=1e-4)
        assert global_sq == pytest.approx(out["reduced_sq"], rel=1e-4)
        assert out["buckets"] >= 2, out["buckets"]


def test_holdout_split_is_disjoint_from_training_and_keeps_train_subset():
    cfg = DataConfig(train_subset=300, holdout_samples=100)
    train, held = _indices(1000, cfg, "train"), _indices(1000, cfg, "holdout")
    assert len(train) == 300 and len(held) == 100 and not set(train.tolist()) & set(held.tolist())
    assert torch.equal(train, _indices(1000, DataConfig(train_subset=300), "train"))  # the same subset as before
    whole = _indices(1000, DataConfig(holdout_samples=100), "train")
    assert len(whole) == 900 and not set(whole.tolist()) & set(held.tolist())
    with pytest.raises(DataError, match="holdout_samples"):
        _indices(1000, DataConfig(), "holdout")
    with pytest.raises(DataError, match="exceed"):
        _indices(1000, DataConfig(train_subset=950, holdout_samples=100), "train")


def test_recommendation_is_the_fastest_within_one_standard_error_of_the_best():
    rows = [{"tau": 0.8, "parallel_equivalent_seconds": 100, "holdout_acc": 0.880, "holdout_samples": 2500},
            {"tau": 0.85, "parallel_equivalent_seconds": 130, "holdout_acc": 0.900, "holdout_samples": 2500},
            {"tau": 0.9, "parallel_equivalent_seconds": 160, "holdout_acc": 0.905, "holdout_samples": 2500}]
    rec = recommend(rows)
    assert rec["standard_error"] == pytest.approx((0.905 * 0.095 / 2500) ** 0.5)  # 0.59 points
    assert rec["best_tau"] == 0.9 and rec["tau"] == 0.85  # 0.900 is within it, 0.880 is not
    assert recommend(rows[:1])["tau"] == 0.8
    assert parse_candidates("0.9, 0.85,0.9") == [0.85, 0.9]
    for bad in ("0.9", "0.8,1.2", "a,b"):
        with pytest.raises(ValueError, match="--candidates"):
            parse_candidates(bad)


@pytest.mark.slow
@needs_fashion
def test_transition_search_on_two_real_processes(tmp_path, data_cache):
    """One phase-1 run to the highest τ keeps p1-tau<τ> where each candidate was first reached; the other
    candidates' phase 2 starts there; every row is what its run and checkpoint say; τ is chosen on held-out data."""
    recipe = tiny_recipe(tmp_path, data_cache, phase1={"stop_train_accuracy": 0.6, "max_epochs": 8},
                         phase2={"epochs": 1}, checkpoint={"every_minutes": None})
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "swap_accel", "transition", str(recipe), "--candidates", "0.4,0.6",
           "--holdout-samples", "400", "--out", str(out), "--config-file", str(ROOT / "accelerate_config.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "transition.json").read_text())
    assert "recommended tau" in done.stdout and (out / "transition.png").stat().st_size > 10_000

    main = json.loads((out / "tau0.6" / "results.json").read_text())
    history = main["phase1"]["history"]
    assert main["phase1"]["reached_tau"] and main["phase1"]["epochs"] < 8
    # Each candidate has a row, or is skipped because one epoch reached it together with a higher one.
    assert {r["tau"] for r in report["rows"]} | {s["tau"] for s in report["skipped"]} == {0.4, 0.6}
    for row in report["rows"]:
        # The checkpoint is the end of the first epoch whose (all-reduced) training accuracy reached τ.
        first = next(h for h in history if h["train_acc"] >= row["tau"])
        assert (row["phase1_epochs"], row["phase1_steps"]) == (first["epoch"], first["step"])
        run = json.loads((ROOT / row["run_dir"] / "results.json").read_text())
        assert run["phase1"]["steps"] == row["phase1_steps"] and run["holdout_acc"] == row["holdout_acc"]
        assert run["training_seconds"]["parallel_equivalent"] == row["parallel_equivalent_seconds"]
    # The held-out accuracy of one averaged model, recomputed: the held-out images, its weights, no swap_accel run.
    row = report["rows"][0]
    run_dir = out / f"tau{row['tau']:g}"
    r = load_recipe(run_dir / "recipe.yaml")
    assert r.data.holdout_samples == 400 and r.from_phase1 is not None
    from swap_accel.data.loading import load_data

    held = load_data(r.data, torch.device("cpu"), split="holdout")
    module = build_model(r.model.name, in_chans=1, num_classes=10, kwargs=r.model.kwargs, image_size=(28, 28))
    load_weights_into(module, run_dir)
    assert held.num_samples == 400
    module.eval()
    with torch.no_grad():
        correct = sum(int((module(x).argmax(1) == y).sum()) for x, y in held.eval_loader(100))
    assert correct / 400 == pytest.approx(row["holdout_acc"], abs=2 / 400)  # thread count may move a sample
    # Each worker trained on the 2048 train_subset images per epoch (that they exclude the held-out ones is
    # test_holdout_split_is_disjoint_from_training_and_keeps_train_subset's).
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    assert {n for rk in ranks for w in rk["phase2"] for n in w["samples_per_epoch"]} == {2048}
    # B_simple each epoch of the 2-process phase 1, from the two measured mean squared gradient norms: a process's
    # own gradient over B_small samples is noisier than the all-reduced one over B_big, and McCandlish et al.'s
    # B_simple = tr(Σ)/|G|² follows from E|g_B|² = |G|² + tr(Σ)/B at the two sizes (solved here by hand).
    for h in history:
        n = h["noise_scale"]
        assert (n["b_small"], n["b_big"]) == (126, 252) and n["small_sq"] > n["big_sq"] > 0, n
        # E|g_small|² - E|g_big|² = tr(Σ) (1/B_small - 1/B_big) = tr(Σ) / 252 here; |G|² = 2 E|g_big|² - E|g_small|².
        trace, g2 = (n["small_sq"] - n["big_sq"]) * 252, 2 * n["big_sq"] - n["small_sq"]
        assert n["b_simple"] == (pytest.approx(trace / g2) if g2 > 0 else None), n
    # The recommendation is the rule applied to the rows: the fastest within one binomial standard error of the
    # best held-out accuracy (worked by hand here, not by calling the rule).
    best = max(r["holdout_acc"] for r in report["rows"])
    error = (best * (1 - best) / 400) ** 0.5
    fastest = min((r for r in report["rows"] if r["holdout_acc"] >= best - error),
                  key=lambda r: r["parallel_equivalent_seconds"])
    assert report["recommendation"]["tau"] == fastest["tau"]
    # Rerunning the same command reuses every finished run.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == len(report["rows"])
