"""The suite itself: under CI a missing data set fails the run instead of turning integration tests into skips."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from launching import ROOT

pytestmark = pytest.mark.slow


def _pytest(tmp_path, **env) -> subprocess.CompletedProcess:
    # One quick test that needs no data; the guard runs at session start, before any test.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           "tests/test_units.py::test_linear_warmup_then_decay_to_zero"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "SWAP_ACCEL_TEST_FASHION_MNIST": str(tmp_path), **env})


def test_ci_fails_when_the_embedded_data_set_is_missing(tmp_path):
    under_ci = _pytest(tmp_path, CI="true")
    assert under_ci.returncode != 0
    assert f"CI=true but Fashion-MNIST is missing from {tmp_path}" in under_ci.stdout + under_ci.stderr
    elsewhere = _pytest(tmp_path, CI="")
    assert elsewhere.returncode == 0, elsewhere.stdout[-2000:]
