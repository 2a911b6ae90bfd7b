"""Several samples per worker and SWA through the same code: the cyclic schedule, which
epochs end a sampled cycle, the recipe's one-line errors, and a real 2-process `mode: swa` run whose model is the
equal-weight average of its samples, taken at the cycle ends. Resume in the middle of a cycle, W x S averaging
against an independent computation and `average` over samples are in test_resume.py (its reference run samples)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from launching import ENV, ROOT, launch, needs_fashion, tiny_recipe
from safetensors.torch import load_file

from swap_accel.algorithm.schedules import lr_at_epoch, make_schedule
from swap_accel.checkpointing.snapshots import CycleSamples
from swap_accel.recipe import LRConfig, Phase2Config, RecipeError, load_recipe


def test_cycles_restart_the_whole_schedule_and_one_cycle_is_the_old_schedule():
    steps = 10
    cyclic = make_schedule(LRConfig(peak=0.1, warmup_epochs=1, cycles=3), epochs=6, steps_per_epoch=steps)
    one = make_schedule(LRConfig(peak=0.1, warmup_epochs=1), epochs=2, steps_per_epoch=steps)
    for cycle in range(3):  # each 2-epoch cycle is exactly the 2-epoch schedule: warm-up, then decay to zero
        assert [cyclic(cycle * 2 * steps + s) for s in range(2 * steps)] == pytest.approx(
            [one(s) for s in range(2 * steps)], abs=1e-12)
    # Half a step from the end of a 1-epoch decay of 10 steps: 5 % of the peak; the peak is met after warm-up.
    assert one(2 * steps - 1) == pytest.approx(0.1 * 0.05) and max(one(s) for s in range(2 * steps)) > 0.9 * 0.1
    # One cycle is the schedule as it was before cycles existed, bit for bit: the step's mid-point epoch, undivided.
    single = make_schedule(LRConfig(peak=0.1, warmup_epochs=1), epochs=4, steps_per_epoch=steps)
    assert [single(s) for s in range(40)] == [
        lr_at_epoch((s + 0.5) / steps, peak=0.1, warmup_epochs=1, total_epochs=4, shape="linear") for s in range(40)]


def test_samples_are_the_ends_of_the_last_cycles(tmp_path):
    cfg = Phase2Config(per_worker_batch_size=8, epochs=6, samples_per_worker=2, lr=LRConfig(peak=0.1, cycles=3))
    samples = CycleSamples(cfg.sampling, tmp_path, worker=3)
    # 3 cycles of 2 epochs; the first only leads to the sampled two, whose ends are epochs 4 and 6 (0-based 3, 5).
    assert [samples.index_after(e) for e in range(6)] == [None, None, None, 0, None, 1]
    assert [samples.taken_before(e) for e in range(7)] == [0, 0, 0, 0, 1, 1, 2]
    assert [p.name for p in samples.dirs] == ["p2-w3-sample0", "p2-w3-end"]


@pytest.mark.parametrize("sets, message", [
    (["phase2.samples_per_worker=2"], "phase2.samples_per_worker=2 takes one model at the end of each of the last "
                                      "cycles, but phase2.lr.cycles=1; set phase2.lr.cycles=2"),
    (["phase2.lr.cycles=3"], "phase2.lr.cycles=3 cuts the 2 epochs into equal whole-epoch cycles"),
    (["mode=swa", "phase2.workers=2"], "mode 'swa' trains one model (phase2.workers=2)"),
    (["phase2.epochs=4", "phase2.lr.cycles=4", "phase2.lr.warmup_epochs=2"],
     "phase2.lr.warmup_epochs (2.0) exceeds the length of one of the 4 cycles (1 epochs)"),
    (["phase1.lr.cycles=2"], "phase1.lr.cycles: cyclic learning rates are phase 2's"),
])
def test_sampling_settings_that_cannot_work_are_one_line(sets, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", sets)
    assert message in str(err.value) and "\n" not in str(err.value) and "{" not in str(err.value)


def test_swa_cycle_shape_decays_once_to_a_constant_alpha2_and_never_rewarms():
    """Izmailov et al. 2018: from α1 down to α2 > 0 (here over the first of 4 one-epoch cycles, after a half-epoch
    warm-up), then α2 to the end; no later cycle warms up or rises again."""
    steps = 10
    lr_at = make_schedule(LRConfig(peak=0.1, warmup_epochs=0.5, cycles=4, cycle_shape="swa", swa_lr=0.02), epochs=4,
                          steps_per_epoch=steps)
    lrs = [lr_at(s) for s in range(4 * steps)]
    assert lrs[:5] == pytest.approx([0.1 * (s + 0.5) / 5 for s in range(5)])  # the only warm-up: phase 2's start
    # Then linear from α1 to α2 over the rest of the first cycle, at each step's mid-point epoch.
    assert lrs[5:10] == pytest.approx([0.02 + 0.08 * (1 - ((s + 0.5) / steps - 0.5) / 0.5) for s in range(5, 10)])
    assert lrs[10:] == [0.02] * 30  # constant α2 exactly: the sampled cycles are one constant-LR SGD run
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False)) and min(lrs[5:]) == 0.02 > 0
    cosine = make_schedule(LRConfig(peak=0.1, cycles=2, cycle_shape="swa", swa_lr=0.02, shape="cosine"), epochs=2,
                           steps_per_epoch=steps)
    assert cosine(0) == pytest.approx(0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * 0.05))) and cosine(10) == 0.02


def test_restart_cycle_shape_is_the_schedule_swap_always_ran_bit_for_bit():
    for cycles in (1, 2):
        old = make_schedule(LRConfig(peak=0.1, warmup_epochs=0.5, cycles=cycles), epochs=4, steps_per_epoch=7)
        new = make_schedule(LRConfig(peak=0.1, warmup_epochs=0.5, cycles=cycles, cycle_shape="restart"), epochs=4,
                            steps_per_epoch=7)
        assert [new(s) for s in range(28)] == [old(s) for s in range(28)]
    # The quickstart's phase 2 resolves to restart: one linear decay from 0.1 to zero, the formula it always had.
    recipe = load_recipe(ROOT / "recipes" / "fashion_mnist.yaml")
    assert (recipe.phase2.lr.cycle_shape, recipe.phase2.lr.swa_lr) == ("restart", None)
    lr_at = make_schedule(recipe.phase2.lr, epochs=2, steps_per_epoch=469)
    assert [lr_at(s) for s in range(938)] == [0.1 * (1.0 - min(1.0, (s + 0.5) / 469 / 2)) for s in range(938)]


def test_mode_swa_defaults_to_the_swa_papers_schedule_and_takes_restart_when_asked():
    quickstart = ROOT / "recipes" / "fashion_mnist.yaml"
    swa = ["mode=swa", "phase2.epochs=4", "phase2.lr.cycles=4", "phase2.samples_per_worker=4"]
    recipe = load_recipe(quickstart, swa)
    assert (recipe.phase2.lr.cycle_shape, recipe.phase2.lr.swa_lr) == ("swa", 0.05)  # α2 = α1 / 2 by default
    assert load_recipe(quickstart, [*swa, "phase2.lr.swa_lr=0.01"]).phase2.lr.swa_lr == 0.01
    restart = load_recipe(quickstart, [*swa, "phase2.lr.cycle_shape=restart"])
    assert (restart.phase2.lr.cycle_shape, restart.phase2.lr.swa_lr) == ("restart", None)
    swap = load_recipe(quickstart, ["phase2.lr.cycle_shape=swa"])  # SWAP's workers may ask for it
    assert (swap.phase2.lr.cycle_shape, swap.phase2.lr.swa_lr) == ("swa", 0.05)


@pytest.mark.parametrize("sets, message", [
    (["phase2.lr.swa_lr=0.01"], "phase2.lr.swa_lr=0.01 is the constant rate of cycle_shape swa, but "
                                "phase2.lr.cycle_shape=restart decays every cycle to zero"),
    (["mode=swa", "phase2.lr.swa_lr=0.2"], "phase2.lr.swa_lr=0.2 exceeds phase2.lr.peak=0.1"),
    (["phase1.lr.cycle_shape=swa"], "phase1.lr.cycle_shape shapes phase 2's learning-rate cycles"),
    (["phase2.lr.cycle_shape=sawtooth"], "phase2.lr.cycle_shape: Input should be 'swa' or 'restart'"),
    (["mode=swa", "phase2.lr.swa_lr=0"], "phase2.lr.swa_lr: Input should be greater than 0"),
])
def test_cycle_shape_settings_that_cannot_work_are_one_line(sets, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sgd_baselines_ignore_sampling_settings_they_do_not_read():
    load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", ["mode=sgd", "phase2.samples_per_worker=2"])


@pytest.mark.slow
@needs_fashion
def test_swa_is_one_data_parallel_model_whose_cycle_end_samples_phase3_averages(tmp_path, data_cache):
    """Table 4's SWA rows through SWAP's code: phase 1 for its whole budget (no τ), then one model data-parallel
    over both processes with a cyclic LR; phase 3 averages its samples with equal weight and recomputes BN."""
    recipe = tiny_recipe(tmp_path, data_cache, mode="swa", phase1={"max_epochs": 2, "stop_train_accuracy": None},
                         phase2={"epochs": 2, "samples_per_worker": 2, "lr": {"peak": 0.05, "cycles": 2}})
    out = tmp_path / "run"
    result = launch(2, recipe, out, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SWA (after averaging)" in result.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["mode"] == "swa" and r["phase1"]["epochs"] == 2 and not r["phase1"]["reached_tau"]
    assert [w["index"] for w in r["workers"]] == [0] and r["phase2"]["processes_per_worker"] == 2
    # mode: swa runs the SWA paper's schedule unless told otherwise: α1 = 0.05 down to α2 = 0.025 over the first
    # cycle, then α2 (each epoch's row holds the LR of its last step; 21 steps per epoch).
    assert r["recipe"]["phase2"]["lr"]["cycle_shape"] == "swa"
    assert [h["lr"] for h in r["phase2"]["history"]] == pytest.approx([0.025 + 0.025 * 0.5 / 21, 0.025])
    # P = 2, W = 1: one group of both processes is plain data-parallel small batch. Its members end
    # bitwise equal; gradients are all-reduced inside the group (here: everyone), none "between workers": one per
    # step (one DDP bucket), two per epoch (epoch sums, the leader's BN buffers), one for the resume decision.
    records = [json.loads((out / "ranks" / f"rank{k}.json").read_text())["phase2"][0] for k in range(2)]
    assert [(x["worker"], x["member"]) for x in records] == [(0, 0), (0, 1)]
    assert records[0]["params"] == records[1]["params"]
    steps, epochs = r["phase2"]["steps_per_worker"], r["phase2"]["epochs"]
    assert r["collectives"]["phase2"]["calls"] == 0
    assert r["collectives"]["phase2_in_group"]["calls"] == steps + 2 * epochs + 1
    # The per-worker batch of 100 is split 50/50: 21 steps per epoch over the 2048 samples, as one process would.
    assert steps == 21 * epochs
    assert r["phase3"]["selection"]["models"] == ["w0s0", "w0s1"] and r["phase3"]["averaged_models"] == 2
    first, last = (out / "checkpoints" / name for name in ("p2-w0-sample0", "p2-w0-end"))
    steps_per_epoch = 21  # 2048 samples in batches of 100
    assert json.loads((first / "manifest.json").read_text())["step"] == steps_per_epoch  # end of cycle 1
    assert json.loads((last / "manifest.json").read_text())["step"] == 2 * steps_per_epoch
    a, b = (load_file(p / "model.safetensors") for p in (first, last))
    final = load_file(out / "model.safetensors")
    for name, value in final.items():
        if value.dtype.is_floating_point and "running" not in name:  # BN statistics are recomputed by phase 3
            assert torch.equal(value, (a[name] + b[name]) / 2), name
    assert any(not torch.equal(a[n], b[n]) for n in a if a[n].dtype.is_floating_point)  # two different samples


def test_a_sampled_recipe_reloads_from_the_run_directory(tmp_path):
    """recipe.yaml in a run directory is what `average`, `--from-phase1` and reuse checks read back."""
    from swap_accel.recipe import dump_recipe

    recipe = load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", [
        "mode=swa", "phase2.epochs=8", "phase2.lr.cycles=4", "phase2.samples_per_worker=3",
        "phase2.lr.warmup_epochs=0.5"])
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "recipe.yaml") == recipe


def test_a_saved_models_flat_state_matches_the_modules_with_non_persistent_buffers():
    """Resume, `average` and the soup read samples from disk as `flat_state_of`; a float buffer that no state dict
    holds (timm's swin attention masks) comes from the module itself, so every model keeps its full length."""
    from swap_accel.parallel.distributed import flat_state, flat_state_of

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    module[1].register_buffer("mask", torch.full((4,), 7.0), persistent=False)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    assert "1.mask" not in saved
    assert torch.equal(flat_state_of(saved, module, "cpu"), flat_state(module))
