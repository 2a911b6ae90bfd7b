"""benchmarks/loader.py's plumbing: generated ImageNet-like JPEGs through StreamingSource's decode and timm train
transform at the three sizes of the published schedule, full and pre-resized, and the cores per GPU that follow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT

pytestmark = pytest.mark.slow


def test_loader_dry_run_measures_every_size_and_derives_cores_per_gpu(tmp_path):
    out = tmp_path / "loader.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
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
