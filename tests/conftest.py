"""Session fixtures shared by the test modules, and the CI guard on the embedded data set."""

import os
from pathlib import Path

import pytest
import torch
from launching import FASHION

# The suite runs in two test processes (pyproject's addopts: xdist, whole files each). Files in the order they
# start, longest first (sequential --durations on the 2-core machine: 220, 185, 115, 85, 75 s, ...), so the two
# processes end close together instead of one finishing a long file alone; files not named follow.
LONGEST_FIRST = ["test_resume.py", "test_topology.py", "test_swap_multiprocess.py", "test_streaming_resume.py",
                 "test_cli.py", "test_landscape.py", "test_transition.py", "test_monitoring.py", "test_gpu_check.py",
                 "test_precision.py", "test_faults.py", "test_soup.py", "test_gpu_speed.py", "test_provenance.py"]


def pytest_configure(config):
    """One thread per test process, inherited by the runs it launches: two test processes share the 2 cores, and
    the runs of both would otherwise ask for more threads than there are cores. Compared runs
    already set their thread count (launching.ENV)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # A stable sort by file: each file's own order (module fixtures, parametrizations) is kept.
    position = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: position.get(item.path.name, len(position)))


def pytest_sessionstart(session):
    """Under CI (CI=true) the embedded data set must be installed: without it most integration tests skip
    (`needs_fashion`) and the run would pass having tested little. A developer's machine may still skip them."""
    if os.environ.get("CI") == "true" and not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.exit(f"CI=true but Fashion-MNIST is missing from {FASHION}: the integration tests would be skipped; "
                    "install it (bash .ci/setup, or apt-get install dataset-fashion-mnist)", returncode=1)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
