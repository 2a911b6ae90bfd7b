"""Session fixtures shared by the test modules, and the CI guard on the embedded data set."""

import os
from pathlib import Path

import pytest
from launching import FASHION


def pytest_sessionstart(session):
    """Under CI (CI=true) the embedded data set must be installed: without it most integration tests skip
    (`needs_fashion`) and the run would pass having tested little. A developer's machine may still skip them."""
    if os.environ.get("CI") == "true" and not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.exit(f"CI=true but Fashion-MNIST is missing from {FASHION}: the integration tests would be skipped; "
                    "install it (bash .ci/setup, or apt-get install dataset-fashion-mnist)", returncode=1)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
