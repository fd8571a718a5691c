"""Shared test fixtures: the reference data of the original implementations, plotting backend."""

import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("MINILDM_PROGRESS", "0")
# One thread: the tiny models of the tests run faster, and results do not depend on the core count.
torch.set_num_threads(1)

# ../shared/reference next to the repository, or wherever MINILDM_REFERENCE points.
REFERENCE = Path(os.environ.get("MINILDM_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of reference fixtures; tests that need it skip (with the reason) where it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (set MINILDM_REFERENCE to the shared/reference folder)")
    return REFERENCE
