"""Progress of one long solve (GPTQ on a large weight), shown under the "quantizing" bar.

The transform turns reporting on for the weight a worker is quantizing (:func:`reporting`);
an algorithm asks for a bar with :func:`steps`, which is ``None`` unless reporting is on and
the work is large enough to be worth watching.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
MIN_ELEMENTS = 1 << 22  # weights below 4M elements finish in a few seconds: no bar of their own


@contextmanager
def reporting(label: str, enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`steps` shows bars labelled ``label`` (when ``enabled``)."""
    before = getattr(_local, "label", None)
    _local.label = label if enabled else None
    try:
        yield
    finally:
        _local.label = before


def steps(total: int, elements: int, unit: str = "row") -> Any:
    """A tqdm bar over ``total`` steps for a solve over ``elements`` weights, or ``None``."""
    label = getattr(_local, "label", None)
    if label is None or elements < MIN_ELEMENTS:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"  solving {label}", unit=unit, leave=False, dynamic_ncols=True)
