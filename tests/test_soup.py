"""Greedy soup of workers: the selection rule on a model with a known score, then real
2-process runs: a training run whose phase 3 is a greedy soup (its weights are the mean of the kept workers'), and
`swap_accel average --selection greedy` leaving out a deliberately bad worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from launching import LAUNCH, ROOT, free_port, launch, needs_fashion, tiny_recipe
from safetensors.torch import load_file, save_file

from swap_accel.algorithm.soup import greedy_soup
from swap_accel.checkpointing.files import commit_checkpoint
from swap_accel.parallel.distributed import flat_state
from swap_accel.recipe import RecipeError, load_recipe

pytestmark = pytest.mark.slow


def test_greedy_keeps_workers_that_do_not_hurt_and_leaves_a_bad_one_out():
    """Score = minus the distance of the weights to a target: averaging the good workers, whose errors cancel,
    helps; the bad one, far away, hurts even as the second-best ingredient is tried after it."""
    module = torch.nn.Linear(4, 1, bias=False)
    target = torch.ones(4)

    def score() -> float:
        return -float((module.weight.detach().flatten() - target).norm())

    # Own distances 0.44, 0.44, 0.27: the third is tried first; the mean of all three is 0.04 from the target.
    good = [target + torch.tensor(d) for d in ([0.3, -0.3, 0.1, 0], [-0.3, 0.3, 0.1, 0], [0, 0, -0.25, 0.1])]
    bad = target + torch.tensor([3.0, 3.0, 3.0, 3.0])
    flats = [good[0], bad, good[1], good[2]]
    chosen = greedy_soup(module, flats, score)
    assert chosen["kept"] == [0, 2, 3] and 1 not in chosen["kept"]
    assert [c["model"] for c in chosen["curve"]] == [3, 0, 2, 1]  # best first (ties: lower index), bad last
    assert next(c for c in chosen["curve"] if c["model"] == 1)["kept"] is False
    torch.testing.assert_close(flat_state(module), (good[0] + good[1] + good[2]) / 3)
    assert chosen["holdout_acc"] == pytest.approx(score())
    # A near-equal worker that costs a hair of score: left out by the exact rule, kept within a tolerance.
    close = [target + torch.tensor([0.05, 0, 0, 0]), target + torch.tensor([0.1, 0.02, 0, 0])]
    assert greedy_soup(module, close, score)["kept"] == [0]  # their mean is 0.076 away, the first alone 0.05
    assert greedy_soup(module, close, score, tolerance=0.03)["kept"] == [0, 1]
    assert greedy_soup(module, [*close, bad], score, tolerance=0.03)["kept"] == [0, 1]  # not the bad one


def test_greedy_needs_held_out_images():
    with pytest.raises(RecipeError, match="data.holdout_samples"):
        load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", ["phase3.selection=greedy"])


@needs_fashion
def test_greedy_soup_in_phase3_and_average_leaves_a_bad_worker_out(tmp_path, data_cache):
    recipe = tiny_recipe(tmp_path, data_cache, data={"holdout_samples": 400}, phase3={"selection": "greedy"},
                         phase2={"epochs": 1}, checkpoint={"every_minutes": None})
    out = tmp_path / "run"
    done = launch(2, recipe, out, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    sel = r["phase3"]["selection"]
    assert sel["method"] == "greedy" and sel["kept"] and len(sel["individual_holdout_acc"]) == 2
    assert sel["holdout_acc"] == pytest.approx(r["holdout_acc"])  # the soup is the model that was saved
    # The saved model's parameters are exactly the mean of the kept workers' (BN statistics are recomputed).
    workers = [load_file(out / "workers" / f"worker{k}.safetensors") for k in range(2)]
    model = load_file(out / "model.safetensors")
    order = sorted(sel["kept"], key=lambda k: (-sel["individual_holdout_acc"][k], k))
    for name, tensor in model.items():
        if "running" in name or "num_batches" in name:
            continue
        expected = workers[order[0]][name].clone()
        for k in order[1:]:
            expected = expected + workers[k][name]
        torch.testing.assert_close(tensor, expected / len(order), rtol=0, atol=0)

    # A deliberately bad worker: worker 0's checkpoint with its weights scrambled (noise far above their scale).
    good = out / "checkpoints" / "p2-w0-end"
    staging = tmp_path / "bad" / ".staging"
    staging.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: (v + 2 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k else v)
               for k, v in load_file(good / "model.safetensors").items()}
    save_file(tensors, staging / "model.safetensors")
    manifest = json.loads((good / "manifest.json").read_text())
    info = {k: v for k, v in manifest.items() if k not in ("format", "files")} | {"worker": 7}
    commit_checkpoint(staging, tmp_path / "bad" / "p2-w7-end", ["model.safetensors"], info)
    soup = tmp_path / "soup"
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "swap_accel", "average", str(out),
           str(tmp_path / "bad" / "p2-w7-end"), "--recipe", str(out / "recipe.yaml"), "--out", str(soup),
           "--selection", "greedy"]
    averaged = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert averaged.returncode == 0, averaged.stderr[-3000:]
    s = json.loads((soup / "results.json").read_text())["phase3"]["selection"]
    assert 2 not in s["kept"], s  # the bad worker (third given) is left out ...
    assert s["individual_holdout_acc"][2] < min(s["individual_holdout_acc"][:2]) - 0.1  # ... and is really bad
    assert s["kept"] == sel["kept"]  # the two good ones are judged as in training's phase 3
    shutil.rmtree(tmp_path / "bad")
