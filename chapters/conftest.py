"""nbval settings for the chapters: quiet progress bars, compare only what is deterministic.

Kernels inherit this process's environment, so MINILDM_PROGRESS=0 set here silences every
minildm progress bar in the notebooks (tqdm's own switch is ignored inside Jupyter kernels).
stderr (warnings carry /tmp/ipykernel_<pid> paths) and text/html (widget and table reprs)
are never compared; cells marked `# NBVAL_CHECK_OUTPUT` compare their text output.
"""

import os

os.environ["MINILDM_PROGRESS"] = "0"

SKIP_COMPARE = ("stderr", "text/html")


def pytest_collectstart(collector):
    if hasattr(collector, "skip_compare"):  # nbval's notebook collector (IPyNbFile)
        collector.skip_compare = tuple(collector.skip_compare) + SKIP_COMPARE
