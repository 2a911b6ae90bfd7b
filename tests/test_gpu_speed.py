"""The GPU measurements' plumbing on CPU, through the one command a GPU machine runs: `DRY_RUN=1 bash
benchmarks/on_gpu.sh` runs each step's `--dry-run` under its cap and writes its JSON. `gpu_defaults` resolves `auto`
and compares the fused SGD with the default one; `gpu_speed` times the tuned loop and swap_accel's phase-1 and phase-2
loops, interleaved, for both models, and counts each step's FLOPs; `stacked_workers` times one worker against stacked
workers; `loader` decodes generated ImageNet-like JPEGs through StreamingSource's decode and timm train transform at
the three sizes of the published schedule, full and pre-resized. The GPU numbers need a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import ROOT, kill

pytestmark = pytest.mark.slow
STEPS = ["defaults", "speed", "stacked", "loader"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """benchmarks/on_gpu.sh with DRY_RUN=1, run once for the module: the folder its steps wrote. Past the sum of its
    steps' caps the script and everything it started are killed, so nothing runs on after the test."""
    out = tmp_path_factory.mktemp("on_gpu")
    env = {k: v for k, v in os.environ.items() if k not in ("STEPS", "BUDGET_MINUTES")}
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "on_gpu.sh")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**env, "DRY_RUN": "1", "OUT": str(out),
                                                            "PY": sys.executable})
    try:
        proc.wait(timeout=2 * (30 + 270 + 150 + 120) + 120)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise
    assert (out / "on_gpu.log").exists(), proc.returncode
    assert proc.returncode == 0, (out / "on_gpu.log").read_text()[-4000:]
    return out


def _report(dry_run: Path, name: str) -> dict:
    return json.loads((dry_run / f"{name}.json").read_text())


def test_on_gpu_runs_every_step_to_a_clean_exit_in_its_log(dry_run):
    log = (dry_run / "on_gpu.log").read_text()
    assert "dry run: every step's --dry-run" in log, log[:500]
    assert any(line.startswith("torch ") and " pydantic " in line for line in log.splitlines()), log[:2000]
    for name in STEPS:
        assert f"== {name}: exit 0 after" in log, log[-3000:]
    assert "== table1" not in log  # not a default step


def test_gpu_speed_dry_run_times_both_loops_for_both_models(dry_run):
    report = _report(dry_run, "gpu_speed")
    assert [r["model"] for r in report["records"]] == ["resnet9", "resnet50"] and report["rounds"] == 2
    for record in report["records"]:
        # swap_accel's side runs with what `auto` gives this CPU: fp32 in NCHW, as a recipe that sets nothing.
        assert record["bf16"] is False and record["channels_last"] is False and record["compiled"] == "eager"
        for phase in ("phase1", "phase2"):
            p = record[phase]
            tuned = p["tuned"]
            for loop in ("tuned", "defaults", "compiled"):
                q = p[loop]
                assert q["images_per_s"] > 0 and q["first_epoch_seconds"] > 0
                assert q["ratio"] == pytest.approx(q["images_per_s"] / tuned["images_per_s"])
                assert q["peak_share"] is None  # no bf16 peak for a CPU
            # The median-epoch rate lies within the per-round spread (with 2 rounds: between the two).
            assert tuned["spread"][0] <= tuned["images_per_s"] * (1 + 1e-9)
            assert tuned["images_per_s"] <= tuned["spread"][1] * (1 + 1e-9)
            # The payback follows from the same clocks: compile seconds over the seconds a compiled step saves.
            steps = report["steps"]
            saved = steps * p["batch"] * (1 / p["defaults"]["images_per_s"] - 1 / p["compiled"]["images_per_s"])
            assert p["compile_seconds"] >= 0
            if saved > 0:
                assert p["payback_steps"] == pytest.approx(p["compile_seconds"] / (saved / steps))
            else:
                assert p["payback_steps"] is None
    # ResNet-50 at 32 px costs more FLOPs per image than the width-8 ResNet-9 at 32 px, as counted.
    assert report["records"][1]["phase1"]["flops_per_image"] > report["records"][0]["phase1"]["flops_per_image"] > 0
    assert "| compile s (payback steps) |" in report["table"]
    # cuDNN's algorithm search is for CUDA only: neither swap_accel nor the tuned loop turns it on here.
    assert report["cudnn_benchmark"] is False and report["swap_accel_cudnn_benchmark"] is False


def test_stacked_workers_dry_run_times_one_worker_and_stacked_workers_interleaved(dry_run):
    """benchmarks/stacked_workers.py on CPU: one worker's epoch and K stacked workers' epoch through swap_accel's own
    phase-2 loops, alternated, for the quickstart and CIFAR-shape models; the GPU ratio (target <= 3 for 8 workers)
    needs a GPU."""
    report = _report(dry_run, "stacked_workers")
    assert [r["model"] for r in report["records"]] == ["quickstart", "cifar"] and report["rounds"] == 2
    for r in report["records"]:
        assert r["workers"] == 2 and r["one_worker_spread"][0] <= r["one_worker_seconds"] <= r["one_worker_spread"][1]
        assert r["stacked_over_one"] == pytest.approx(r["stacked_seconds"] / r["one_worker_seconds"])
        # K workers' images in the stacked epoch, one worker's in the other: the rates follow from the same clocks.
        images = r["steps_per_epoch"] * r["per_worker_batch_size"]
        assert r["stacked_images_per_s"] == pytest.approx(2 * images / r["stacked_seconds"], rel=0.2)
    assert "| stacked / one" in report["table"]


def test_gpu_defaults_dry_run_resolves_auto_to_the_cpu_defaults(dry_run):
    """benchmarks/gpu_defaults.py on CPU: a recipe that sets neither key trains in fp32 and NCHW here; on a GPU the
    same script checks that resolving `auto` leaves no CUDA context."""
    report = _report(dry_run, "gpu_defaults")
    assert (report["mixed_precision"], report["channels_last"], report["capability"]) == ("no", False, None)
    assert report["no_context_created"] is True and report["torch"]
    assert report["cudnn_benchmark"] is False  # swap_accel's accelerator turns it on for CUDA only
    sgd = report["fused_sgd"]  # the CPU's fused kernel here; CUDA's on a GPU
    assert sgd["fused"] is True and sgd["agrees"] is True and sgd["steps"] == 20, sgd


def test_loader_dry_run_measures_every_size_and_derives_cores_per_gpu(dry_run):
    report = _report(dry_run, "loader_gpu")  # the cited GPU figure stands in for the step here
    assert [r["size"] for r in report["rows"]] == [128, 224, 288]
    # Photo-like JPEGs, not noise: tens of KB at quality 90 (ImageNet's are ~110 KB).
    assert 20 < report["mean_jpeg_kb"] < 400
    for r in report["rows"]:
        assert r["full_jpeg"] > 0 and r["pre_resized"] > 0
        assert r["cores_per_gpu"] == pytest.approx(r["gpu"] / r["full_jpeg"])
    # Without a GPU the step's speed is the cited figure, scaled by pixels, and the JSON says whose it is.
    assert "DeepLearningExamples" in report["cited_gpu"]["source"]
    assert report["rows"][1]["gpu"] == pytest.approx(report["cited_gpu"]["images_per_s_224"])
    assert report["rows"][0]["gpu"] == pytest.approx(report["rows"][2]["gpu"] * (288 / 128) ** 2)
