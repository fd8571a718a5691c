"""Shared test fixtures: the reference data of the original implementations, plotting backend.

Tests that read tests/reference (through the `reference_dir` fixture) are marked `reference`. They never
skip: a missing fixture is an error, and a reference test that is skipped anyway (by a skip mark, an
importorskip, ...) is reported as a failure, so the parity checks cannot silently drop out of CI.
"""

import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("MINILDM_PROGRESS", "0")
# One thread: the tiny models of the tests run faster, and results do not depend on the core count.
torch.set_num_threads(1)

# The fixtures produced by running the original code (provenance in tests/reference/README.md).
REFERENCE = Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of reference fixtures (part of the repository: its absence is an error, not a skip)."""
    if not (REFERENCE / "index.json").is_file():
        pytest.fail(f"reference fixtures missing: {REFERENCE / 'index.json'} not found (they are part of the "
                    "repository; restore tests/reference)", pytrace=False)
    return REFERENCE


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: reads tests/reference (set automatically); a skip of it fails the run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "reference_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reference)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped `reference` test is turned into a failure (an xfail is left alone)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("reference"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a reference (parity/manifest) test must not skip; it was skipped: {reason}"
