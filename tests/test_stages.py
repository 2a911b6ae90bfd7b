"""Schedules over epochs (paper section 5.2, Figure 5): the recipe's stages, the schedule the phases follow, the
ImageNet recipes' published numbers, and the streaming source's per-stage image size."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from swap_accel.algorithm.schedules import EpochSchedule, make_schedule
from swap_accel.data.loading import load_data, prepare_data
from swap_accel.recipe import LRConfig, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STREAMING = "data: {source: imagefolder, root: /nonexistent, in_memory: false}\n"
BASE = "phase1: {global_batch_size: 64, max_epochs: 4, stop_train_accuracy: 0.9,\n" \
       "         stages: [{until_epoch: 2, lr: [0.1, 0.2]}, {until_epoch: 4, global_batch_size: 32, lr: 0.05}]}\n" \
       "phase2: {per_worker_batch_size: 16, epochs: 2,\n" \
       "         stages: [{until_epoch: 1, lr: 0.02}, {until_epoch: 2, per_worker_batch_size: 8, lr: [0.02, 0.0]}]}\n"


def _load(tmp_path, text, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize("text, fragment", [
    (BASE.replace("until_epoch: 4, global", "until_epoch: 3, global"),
     "phase1.stages end at epoch 3 but the phase trains 4 epochs; make the last stage's until_epoch 4"),
    (BASE.replace("until_epoch: 4, global", "until_epoch: 2, global"),
     "phase1.stages[1].until_epoch=2 does not come after 2; list the stages in epoch order"),
    (BASE.replace("stop_train_accuracy: 0.9,", "stop_train_accuracy: 0.9, lr: {peak: 0.1},"),
     "phase1: give the learning rate as phase1.lr (peak, warm-up, decay) or as phase1.stages (piecewise), not both"),
    (BASE.replace("global_batch_size: 32", "per_worker_batch_size: 32"),
     "phase1.stages[1].per_worker_batch_size belongs to the other phase; use global_batch_size"),
    (BASE.replace("until_epoch: 2, per_worker", "until_epoch: 2, image_size: 64, per_worker"),
     "phase2.stages[1] sets image_size/min_scale/read_resized, but in-memory data trains at its native size"),
    (BASE.replace("lr: 0.05", "lr: [0, 0]"), "not all 0"),
    (BASE + "mode: swa\n", "mode 'swa' samples a cyclic learning rate"),
    ("phase1: {global_batch_size: 64, max_epochs: 4, stop_train_accuracy: 0.9}\n"
     "phase2: {per_worker_batch_size: 16, epochs: 2, lr: {peak: 0.1}}\n",
     "phase1: give the learning rate as phase1.lr (peak, warm-up, decay) or as phase1.stages (piecewise), one"),
])
def test_bad_stages_are_one_line_naming_the_key_and_the_fix(tmp_path, text, fragment):
    with pytest.raises(RecipeError) as err:
        _load(tmp_path, text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_every_stage_batch_must_split_over_the_processes_and_fit_the_data(tmp_path):
    recipe = _load(tmp_path, BASE, ["phase2.workers=1"])
    recipe.check_processes(2)  # 64 and 32 over 2 processes; 16 and 8 over a worker of 2
    with pytest.raises(RecipeError, match=r"phase1.stages\[1\].global_batch_size=32 is not divisible by 3 processes"):
        _load(tmp_path, BASE.replace("global_batch_size: 64", "global_batch_size: 66")).check_processes(3)
    with pytest.raises(RecipeError, match=r"phase2.stages\[1\].per_worker_batch_size=6 is not divisible by the 4 "
                                          r"processes of a worker"):
        _load(tmp_path, BASE.replace("per_worker_batch_size: 8", "per_worker_batch_size: 6"),
              ["phase2.workers=1"]).check_processes(4)
    with pytest.raises(RecipeError, match=r"phase1.stages\[1\].global_batch_size=32 exceeds the 20 training"):
        _load(tmp_path, BASE.replace("global_batch_size: 64", "global_batch_size: 16")).check_data(20)


def test_stages_inherit_and_the_rate_is_linear_within_each_stage_from_the_middle_of_each_step(tmp_path):
    phase1 = _load(tmp_path, STREAMING + BASE.replace("lr: [0.1, 0.2]}", "lr: [0.1, 0.2], image_size: 48}")).phase1
    schedule = EpochSchedule(phase1.stages, phase1.lr, epochs=4, batch_size=64, batch_key="global_batch_size",
                             steps_for=lambda batch: 256 // batch)
    assert [(s.start_epoch, s.end_epoch, s.batch_size, s.image_size) for s in schedule.stages] == [
        (0, 2, 64, 48), (2, 4, 32, 48)]
    assert [schedule.steps(e) for e in range(4)] == [4, 4, 8, 8]
    assert [schedule.lr(0, 0, i) for i in range(4)] == pytest.approx([0.1 + 0.1 * (i + 0.5) / 8 for i in range(4)])
    assert schedule.lr(7, 1, 3) == pytest.approx(0.1 + 0.1 * 7.5 / 8)
    assert schedule.lr(8, 2, 0) == 0.05 and schedule.describe(2, (48, 48)) == {"batch_size": 32, "image_size": 48}


def test_without_stages_the_rate_is_make_schedules_bit_for_bit():
    cfg = LRConfig(peak=0.4, warmup_epochs=1)
    schedule = EpochSchedule([], cfg, epochs=3, batch_size=50, batch_key="global_batch_size",
                             steps_for=lambda batch: 1000 // batch)
    by_step = make_schedule(cfg, epochs=3, steps_per_epoch=20)
    assert [schedule.lr(s, s // 20, s % 20) for s in range(60)] == [by_step(s) for s in range(60)]
    assert schedule.describe(0, (28, 28)) == {} and schedule.stage(2).batch_size == 50


def _per_epoch(phase, key: str, offset: int = 0) -> list[tuple]:
    """((schedule epoch, batch, image size, crop scale, copy read), (rate at the epoch's start, at its end)) for every
    epoch of a phase, so that two stage lists cutting one schedule differently compare equal."""
    schedule = EpochSchedule(phase.stages, None, epochs=phase.stages[-1].until_epoch, batch_size=getattr(phase, key),
                             batch_key=key, steps_for=lambda batch: 1)
    return [((epoch + offset, s.batch_size, s.image_size, s.min_scale, s.read_resized),
             (round(schedule.lr(0, epoch, -0.5), 9), round(schedule.lr(0, epoch, 0.5), 9)))
            for epoch in range(phase.stages[-1].until_epoch) for s in [schedule.stage(epoch)]]


def test_imagenet_recipes_are_the_published_schedule_doubled_for_phase_1_and_original_for_phase_2():
    """recipes/imagenet.yaml's phase 1 is epochs 0-22 of the large-batch baseline's schedule and its phase 2 epochs
    22-28 of the small-batch baseline's; large batch is small batch with batch sizes and rates doubled (paper
    section 5.2, Figure 5); the small-batch schedule is the published one (imagenet18_old train.py, one_machine)."""
    swap, small, large = (load_recipe(RECIPES / f"{n}.yaml") for n in ("imagenet", "imagenet_small_batch",
                                                                       "imagenet_large_batch"))
    small.check_processes(8)
    large.check_processes(16)
    swap.check_processes(16)
    small_rows, large_rows = (_per_epoch(r.phase1, "global_batch_size") for r in (small, large))
    assert [(e, 2 * b, *rest) for (e, b, *rest), _ in small_rows] == [settings for settings, _ in large_rows]
    assert [2 * r for _, rates in small_rows for r in rates] == pytest.approx([r for _, rates in large_rows
                                                                             for r in rates])
    assert _per_epoch(swap.phase1, "global_batch_size") == large_rows[:22] and swap.phase1.max_epochs == 22
    assert _per_epoch(swap.phase2, "per_worker_batch_size", offset=22) == small_rows[22:]
    assert swap.phase2.epochs == 6 and swap.phase2.workers == 2
    # The published per-GPU batches on 8 GPUs (512 at 128 px, 224 at 224 px, 128 at 288 px), the pre-resized copies
    # it read (trndir -sz/160 and -sz/352), its crop scales and its rates.
    settings = [s for s, _ in small_rows]
    assert settings[0] == (0, 4096, 128, None, 160) and settings[12] == (12, 4096, 128, None, 160)
    assert settings[13] == (13, 1792, 224, 0.087, 352) and settings[24] == (24, 1792, 224, 0.087, 352)
    assert settings[25] == (25, 1024, 288, 0.5, None) and settings[27] == (27, 1024, 288, 0.5, None)
    rates = [r for _, r in small_rows]
    assert (rates[0][0], rates[6][1], rates[7][1], rates[13][0], rates[21][1], rates[24][1], rates[27][1]) == (
        1.0, 2.0, pytest.approx(2.0 - 1.75 / 6), 0.4375, 0.04375, 0.004375, 0.00025)
    assert swap.resized_sides == [160, 352]


def test_streaming_source_trains_each_stage_at_its_size_and_evaluates_at_data_image_size(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                PIL.Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.jpg")
    recipe = _load(tmp_path, BASE.replace("data:", "") + f"data: {{source: imagefolder, root: {root}, in_memory: "
                   f"false, image_size: 40, num_workers: 0, cache_dir: {tmp_path / 'cache'}}}\n")
    source = load_data(recipe.data, torch.device("cpu"), split="train")
    staged = source.for_stage(24, 0.5)
    assert source.for_stage(None, None) is source and source.for_stage(24, 0.5) is staged
    generator = torch.Generator().manual_seed(0)
    (x, _), = staged.batches(torch.arange(6), 6, augment=True, generator=generator)
    (x_plain, _), = source.batches(torch.arange(6), 6, augment=True, generator=generator)
    (x_eval, _), = staged.batches(torch.arange(6), 6, augment=False, generator=None)
    assert x.shape[-2:] == (24, 24) and x_plain.shape[-2:] == (40, 40) and x_eval.shape[-2:] == (40, 40)
    assert staged.image_size == (24, 24) and source.image_size == (40, 40)


def test_a_stage_reads_copies_resized_once_to_its_shorter_side_in_the_splits_row_order(tmp_path):
    """read_resized: the training split copied once with every image's shorter side resized (never enlarged), the
    rows (and so every order's and subset's indices) as in the split; the stage's view reads it, evaluation not."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i, (h, w) in enumerate([(40, 52), (48, 36), (20, 24)]):
                PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.jpg")
    text = BASE.replace("lr: [0.1, 0.2]}", "lr: [0.1, 0.2], image_size: 16, read_resized: 30}") + \
        f"data: {{source: imagefolder, root: {root}, in_memory: false, image_size: 24, num_workers: 0, " \
        f"train_subset: 5, cache_dir: {tmp_path / 'cache'}}}\n"
    recipe = _load(tmp_path, text)
    assert recipe.resized_sides == [30]
    prepare_data(recipe.data, resized=recipe.resized_sides)
    (built,) = (tmp_path / "cache" / "resized").glob("*-30px")
    mtime = built.stat().st_mtime_ns
    source = load_data(recipe.data, torch.device("cpu"), split="train", resized=recipe.resized_sides)
    assert built.stat().st_mtime_ns == mtime  # built once, read after
    staged = source.for_stage(16, None, 30)
    full, copy = source._train.rows, staged._train.rows
    assert len(copy) == len(full) == 5 and copy["label"] == full["label"]
    assert [min(im.size) for im in copy["image"]] == [min(30, min(im.size)) for im in full["image"]]
    assert sorted({min(im.size) for im in copy["image"]}) == [20, 30]  # 40x52 and 48x36 resized, 20x24 kept
    (x, _), = staged.batches(torch.arange(5), 5, augment=True, generator=torch.Generator().manual_seed(0))
    assert x.shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="no copy resized to 99 px"):
        source.for_stage(16, None, 99)


def test_figure_1_draws_a_staged_schedule_from_the_recorded_recipe():
    from swap_accel.monitoring.figure import _lr_curve

    stages = [{"until_epoch": 1, "lr": [0.2, 0.4]}, {"until_epoch": 3, "lr": [0.1, 0.0], "global_batch_size": 8}]
    xs, ys = _lr_curve({"lr": None, "stages": stages}, 3, 2, 0, 10.0)  # phase 1 stopped (τ) after 2 of 3 epochs
    assert xs[0] == pytest.approx(10.025) and xs[-1] == pytest.approx(11.975)
    assert ys[0] == pytest.approx(0.2 + 0.2 * 0.025) and ys[-1] == pytest.approx(0.1 * (1 - 0.975 / 2))
