"""The GPU speed benchmarks' plumbing on CPU: `benchmarks/gpu_speed.py --dry-run` times the tuned loop and
swap_accel's phase-1 and phase-2 loops, interleaved, for both models, and counts each step's FLOPs;
`benchmarks/stacked_workers.py --dry-run` times one worker against stacked workers. The GPU numbers need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT

pytestmark = pytest.mark.slow


def _dry_run(benchmark: str, tmp_path) -> dict:
    """`python -m benchmarks.<benchmark> --dry-run` in a fresh interpreter; the JSON it wrote."""
    out = tmp_path / f"{benchmark}.json"
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_speed_dry_run_times_both_loops_for_both_models(tmp_path):
    report = _dry_run("gpu_speed", tmp_path)
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


def test_stacked_workers_dry_run_times_one_worker_and_stacked_workers_interleaved(tmp_path):
    """benchmarks/stacked_workers.py on CPU: one worker's epoch and K stacked workers' epoch through swap_accel's own
    phase-2 loops, alternated, for the quickstart and CIFAR-shape models; the GPU ratio (target <= 3 for 8 workers)
    needs a GPU."""
    report = _dry_run("stacked_workers", tmp_path)
    assert [r["model"] for r in report["records"]] == ["quickstart", "cifar"] and report["rounds"] == 2
    for r in report["records"]:
        assert r["workers"] == 2 and r["one_worker_spread"][0] <= r["one_worker_seconds"] <= r["one_worker_spread"][1]
        assert r["stacked_over_one"] == pytest.approx(r["stacked_seconds"] / r["one_worker_seconds"])
        # K workers' images in the stacked epoch, one worker's in the other: the rates follow from the same clocks.
        images = r["steps_per_epoch"] * r["per_worker_batch_size"]
        assert r["stacked_images_per_s"] == pytest.approx(2 * images / r["stacked_seconds"], rel=0.2)
    assert "| stacked / one" in report["table"]


def test_gpu_defaults_dry_run_resolves_auto_to_the_cpu_defaults(tmp_path):
    """benchmarks/gpu_defaults.py on CPU: a recipe that sets neither key trains in fp32 and NCHW here; on a GPU the
    same script checks that resolving `auto` leaves no CUDA context."""
    report = _dry_run("gpu_defaults", tmp_path)
    assert (report["mixed_precision"], report["channels_last"], report["capability"]) == ("no", False, None)
    assert report["no_context_created"] is True and report["torch"]
    sgd = report["fused_sgd"]  # the CPU's fused kernel here; CUDA's on a GPU
    assert sgd["fused"] is True and sgd["agrees"] is True and sgd["steps"] == 20, sgd
