"""fp16 end to end with real launches (issue 13): Accelerate's loss scaler in phase 1, one per phase-2 worker,
their skipped steps and scale growths, and their state surviving a SIGKILL bit for bit.

On this CPU machine fp16 runs through torch's CPU fp16 autocast and `GradScaler("cpu")` (precision.py), the same
code path as on a GPU. A first scale of 2^20 makes the first steps' fp16 gradients overflow for certain
(the loss gradient times 2^20 exceeds fp16's 65504), so skipped steps and back-offs really happen; a growth
interval of 2 makes growths happen within a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from launching import (
    ENV,
    ROOT,
    checkpoints,
    free_port,
    kill_when,
    needs_fashion,
    start,
    tensors_equal,
    tiny_recipe,
    train_command,
)

pytestmark = [needs_fashion, pytest.mark.slow]

INIT = 2.0**20


def _recipe(tmp, cache, **extra):
    return tiny_recipe(tmp, cache, mixed_precision="fp16", loss_scale={"init": INIT, "growth_interval": 2},
                       data={"train_subset": 768, "test_subset": 200},
                       # fp16 convolutions on a CPU are slow: ResNet-9 at width 4 (2.5x faster than 8, measured), 768
                       # images, 3 + 1 epochs in batches of 96 and 64 (24 phase-1 steps, 12 per worker) keep the three
                       # launches near a minute, and BN statistics from 256 images (per worker and in phase 3) keep
                       # evaluation off that clock.
                       model={"name": "resnet9", "kwargs": {"base_width": 4}},
                       eval={"bn_samples": 256, "bn_batch_size": 128},
                       phase1={"max_epochs": 3, "global_batch_size": 96, "micro_batch_size": 48},
                       phase2={"epochs": 1, "per_worker_batch_size": 64}, **extra)


def _scales(results: dict) -> list[dict]:
    return [results["phase1"]["loss_scale"]] + [w["loss_scale"] for w in results["workers"]]


def test_fp16_scalers_skip_overflowing_steps_and_resume_bitwise(tmp_path, data_cache):
    runs = {}
    for name in ("uninterrupted", "killed"):
        (tmp_path / name).mkdir()
        recipe = _recipe(tmp_path / name, data_cache, checkpoint={"every_steps": 4})
        out = tmp_path / name / "run"
        cmd = train_command(recipe, out, "--num_processes", "2", "--main_process_port", str(free_port()))
        if name == "killed":  # SIGKILL mid phase 2, after worker 1's scaler has skipped and grown (step 8)
            kill_when(start(cmd, tmp_path / "killed.log"),
                      lambda out=out: any(int(p.name.rsplit("step", 1)[1]) >= 8
                                          for p in checkpoints(out, "p2-w1-step*")))
            assert (checkpoints(out, "p2-w1-step*")[-1] / "scaler.pt").exists()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        runs[name] = (out, json.loads((out / "results.json").read_text()), done.stdout)

    out, results, stdout = runs["uninterrupted"]
    assert results["recipe"]["mixed_precision"] == "fp16" and "fp16 loss scale" in stdout
    steps = [results["phase1"]["steps"]] + [w["steps"] for w in results["workers"]]
    for scale, n in zip(_scales(results), steps, strict=True):
        # Each optimizer (phase 1's, and each worker's own from a fresh 2^20) backed off on overflow and grew
        # after clean steps; the final scale is exactly the first one halved per skip and doubled per growth.
        assert scale["skipped_steps"] >= 1 and scale["growths"] >= 1, scale
        assert scale["skipped_steps"] + scale["growths"] <= n
        assert scale["scale"] == INIT * 2.0 ** (scale["growths"] - scale["skipped_steps"]), scale
    assert results["test_acc"] > 0.5  # it trained: skipped steps are a handful, not the run

    # The resumed run restored each scaler (a fresh one would skip its first steps again): same counts, same weights.
    resumed_out, resumed, _ = runs["killed"]
    assert resumed["resumed_from"]["phase1_end"]
    assert _scales(resumed) == _scales(results)
    assert tensors_equal(resumed_out / "model.safetensors", out / "model.safetensors") == []
