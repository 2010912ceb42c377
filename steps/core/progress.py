"""Progress bars for long loops: a tqdm bar on an interactive terminal, nothing elsewhere (a log file
or CI output gets the steps' own log lines instead of hundreds of carriage-return updates).

    for batch in progress(batches, desc="generate", unit="batch"):
        ...

``TUNELINE_PROGRESS=1`` forces bars on, ``0`` off. A finished bar is cleared (``leave=False``): the
step's summary line says what it did.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def interactive() -> bool:
    """Bars are shown: forced by TUNELINE_PROGRESS, else when stderr is a terminal."""
    forced = os.environ.get("TUNELINE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(iterable: Any = None, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, off unless ``interactive()`` (and not ``disable``), cleared when done."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=disable or not interactive(), **kwargs)
