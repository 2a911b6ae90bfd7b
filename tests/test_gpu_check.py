"""benchmarks/gpu_check.py's plumbing on CPU: `--dry-run` runs the quickstart recipe, tiny, through all
three phases with P = 1 (a real one-process gloo group) and W = 2 workers in turn (4 on a GPU), in fp32, bf16 and
fp16, with its guards installed, plus the CIFAR-shape phase-1 timing. The GPU-only judgements (host syncs under
CUDA's sync debug mode, the 1.03 overhead ratio) need a GPU; here every guard must have seen every step and
collective.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT, needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]


def test_gpu_check_dry_run_exercises_every_precision_and_guard(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all checks passed" in done.stdout and "dry run" in done.stdout and "images/s" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    records = {r["precision"]: r for r in report["records"]}
    assert set(records) == {"fp32", "bf16", "fp16"}
    for r in records.values():
        steps = json.loads((tmp_path / r["precision"] / "results.json").read_text())
        # Every phase-1 step and every step of the workers ran inside the sync-check window.
        assert r["workers"] == 2 and r["steps_checked"] == steps["phase1"]["steps"] + sum(
            w["steps"] for w in steps["workers"])
        assert r["guard_self_test"] and r["collectives_inspected"] > 0 and r["cpu_tensor_on_nccl"] == []
        assert r["host_sync_count"] == r["stderr_syncs"] == 0 and r["hand_step_ms"] > 0 and r["test_acc"] > 0.3
    assert records["fp16"]["loss_scale"] is not None and records["fp32"]["loss_scale"] is None
    assert report["cifar_shape"]["images_per_s"] > 0
