"""The course-wide progress-bar switch.

Set the environment variable `MINILDM_PROGRESS=0` to turn every progress bar of minildm off
(CI does, so executed notebooks stay clean); `tqdm`'s own `TQDM_DISABLE` is ignored by
`tqdm.auto` inside a Jupyter kernel, which is why the course has its own switch.
"""

import os

from tqdm.auto import tqdm


def enabled() -> bool:
    """True unless MINILDM_PROGRESS is "0", "false", "off" or "no"."""
    return os.environ.get("MINILDM_PROGRESS", "1").strip().lower() not in ("0", "false", "off", "no")


def progress(iterable=None, **kwargs):
    """`tqdm.auto.tqdm(iterable, **kwargs)`, disabled when the course-wide switch is off."""
    kwargs["disable"] = kwargs.get("disable", False) or not enabled()  # the switch wins over disable=False
    return tqdm(iterable, **kwargs)
