"""Helpers shared by the micro-benchmark scripts in loadtest/ (run as `python loadtest/x.py`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Time without the cyclic GC: its passes cost by total heap size, whatever is timed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
