"""benchmarks/gpu_speed.py's plumbing on CPU: `--dry-run` times the tuned loop and swap_accel's phase-1 and phase-2
loops, interleaved, for both models, and counts each step's FLOPs; the GPU numbers need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT

pytestmark = pytest.mark.slow


def test_gpu_speed_dry_run_times_both_loops_for_both_models(tmp_path):
    out = tmp_path / "gpu_speed.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["records"]] == ["resnet9", "resnet50"] and report["rounds"] == 2
    for record in report["records"]:
        for phase in ("phase1", "phase2"):
            p = record[phase]
            assert p["tuned_images_per_s"] > 0 and p["swap_accel_images_per_s"] > 0
            assert p["ratio"] == pytest.approx(p["swap_accel_images_per_s"] / p["tuned_images_per_s"])
            assert p["tuned_spread"][0] <= p["tuned_images_per_s"] <= p["tuned_spread"][1]
            assert p["peak_share_tuned"] is None  # no bf16 peak for a CPU
    # ResNet-50 at 64 px costs more FLOPs per image than the width-8 ResNet-9 at 32 px, as counted.
    assert report["records"][1]["phase1"]["flops_per_image"] > report["records"][0]["phase1"]["flops_per_image"] > 0
