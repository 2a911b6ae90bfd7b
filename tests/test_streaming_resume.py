"""Exact resume on the streaming path (the ImageNet recipe's): JPEGs decoded by DataLoader workers with timm's train
transform, under a progressive schedule as the ImageNet recipe's (paper Figure 5): image size, batch and learning rate
change between stages, 32 -> 48 px in phase 1 (the first stage reading pre-resized copies) and 48 -> 64 px in phase
2. SIGKILL a 2-process run mid-epoch in phase 1, and mid-epoch in phase 2 where the one worker is a group of both
processes, rerun the same command, and the weights equal the uninterrupted run's bit for bit: each image's
augmentation is a pure function of (the process's augmentation seed, the epoch, the image), not of which DataLoader
worker decodes it or where in the epoch a resumed launch starts, and each epoch's stage is a function of the epoch."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from launching import ENV, ROOT, checkpoints, free_port, kill_when, start, tensors_equal, train_command

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 24, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small ImageNet-shaped folder: root/{train,test}/class*/img*.jpg, JPEGs of a few sizes."""
    from benchmarks.loader import photo_like

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                photo_like(rng, 40 + 8 * (i % 3), 36 + 4 * (c % 2)).save(root / split / f"class{c}" / f"{i}.jpg",
                                                                          quality=90)
    return root


def _recipe(tmp, root, **checkpoint) -> os.PathLike:
    recipe = {
        "name": "streaming", "seed": 0,
        "model": {"name": "test_resnet"},  # timm's smallest ResNet
        "data": {"source": "imagefolder", "root": str(root), "in_memory": False, "image_size": 64,
                 "num_workers": 2, "cache_dir": str(tmp / "cache")},
        # 240 images. Phase 1: 5 steps at 32 px read from copies resized to a 32 px shorter side, then 3 per epoch
        # at 48 px from the full images (steps 6-8, 9-11).
        "phase1": {"global_batch_size": 48, "max_epochs": 3, "stop_train_accuracy": 0.99,
                   "stages": [{"until_epoch": 1, "image_size": 32, "read_resized": 32, "lr": [0.1, 0.2]},
                              {"until_epoch": 3, "image_size": 48, "min_scale": 0.35, "global_batch_size": 80,
                               "lr": [0.2, 0.02]}]},
        # The worker (both processes): 10 steps at 48 px (1-10), then 6 at 64 px (11-16).
        "phase2": {"workers": 1, "per_worker_batch_size": 24, "epochs": 2,
                   "stages": [{"until_epoch": 1, "image_size": 48, "lr": [0.05, 0.03]},
                              {"until_epoch": 2, "image_size": 64, "per_worker_batch_size": 40, "lr": [0.03, 0.0]}]},
        "eval": {"batch_size": 40, "bn_samples": 240, "bn_batch_size": 120},
        "checkpoint": {"every_steps": 7, "keep": 4, **checkpoint},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder):
    tmp = tmp_path_factory.mktemp("streaming-reference")
    out = tmp / "run"
    done = subprocess.run(train_command(_recipe(tmp, folder), out, "--num_processes", "2", "--main_process_port",
                                        str(free_port())), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **ENV}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.mark.parametrize("phase", [1, 2])
def test_streaming_sigkill_mid_epoch_and_rerun_gives_the_uninterrupted_weights(reference, folder, tmp_path, phase):
    out = tmp_path / "run"
    cmd = train_command(_recipe(tmp_path, folder), out, "--num_processes", "2", "--main_process_port",
                        str(free_port()))

    def reached(pattern: str, step: int) -> bool:
        return any(int(p.name.rsplit("step", 1)[1]) >= step for p in checkpoints(out, pattern))

    # Checkpoints every 7 steps: phase 1's step 7 is mid-way through its second epoch (steps 6-8), the first at
    # 48 px; the worker's step 14 through its second (steps 11-16), the first at 64 px.
    kill_when(start(cmd, tmp_path / "killed.log"),
              (lambda: reached("p1-step*", 7)) if phase == 1 else (lambda: reached("p2-w0-step*", 14)))
    assert not (out / "results.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())["resumed_from"]
    if phase == 1:
        assert resumed["phase1_step"], resumed
    else:
        assert resumed["phase1_end"] and resumed["workers"]["0"]["step"], resumed
    assert tensors_equal(out / "model.safetensors", reference / "model.safetensors") == []
    assert tensors_equal(out / "workers" / "worker0.safetensors", reference / "workers" / "worker0.safetensors") == []


def test_streaming_progressive_schedule_trains_each_stage_as_the_recipe_says(reference):
    """The uninterrupted run's epochs followed the stages: image size and batch per epoch as listed, the learning
    rate continuous within a stage and ending each epoch where the stage's line says."""
    results = json.loads((reference / "results.json").read_text())
    phase1, phase2 = results["phase1"]["history"], results["phase2"]["history"]
    assert [(r["image_size"], r["batch_size"], r["step"]) for r in phase1] == [(32, 48, 5), (48, 80, 8), (48, 80, 11)]
    assert [(r["image_size"], r["batch_size"], r["step"]) for r in phase2] == [(48, 24, 10), (64, 40, 16)]
    # The last step of each epoch sits at the middle of its slice: epoch + (steps - 0.5) / steps of the stage.
    assert phase1[0]["lr"] == pytest.approx(0.1 + 0.1 * 4.5 / 5)
    assert phase1[2]["lr"] == pytest.approx(0.2 - 0.18 * (1 + 2.5 / 3) / 2)
    assert phase2[1]["lr"] == pytest.approx(0.03 * (1 - 5.5 / 6))
