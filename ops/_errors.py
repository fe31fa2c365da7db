"""Failures inside reference op bodies, held until the caller's ``run()`` returns.

A Python exception that escapes an onnxruntime-extensions op body aborts the whole process, so
the bodies catch everything, record an :class:`OpFailure` here and return zeros. The failure is
recorded against the thread that ran the op (onnxruntime runs a kernel on the thread that called
``run()`` in its default sequential mode) and :func:`run` raises it as a
:class:`ReferenceOpError` once ``session.run`` has returned.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OpFailure", "ReferenceInputError", "ReferenceOpError", "record", "take_failures", "raise_failures", "run"]

_MAX_PER_THREAD = 100


class ReferenceInputError(ValueError):
    """Inputs or attributes of a quantized node that do not fit together (shapes, sizes, values)."""


@dataclass(frozen=True)
class OpFailure:
    """One failed call of a reference op: which op, which node, and why.

    ``node`` is the node name when the op knows it (``to_reference`` copies); otherwise ``None``
    and ``detail`` describes the node by its attributes and input shapes.
    """

    op_type: str
    node: str | None
    message: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"node {self.node!r}" if self.node is not None else f"node {self.detail}".rstrip()
        return f"{self.op_type} {where}: {self.message}"


class ReferenceOpError(RuntimeError):
    """A reference op rejected its inputs or failed while onnxruntime ran the graph."""

    def __init__(self, failures: Sequence[OpFailure]) -> None:
        self.failures = tuple(failures)
        first = self.failures[0] if self.failures else OpFailure("?", None, "unknown failure")
        more = len(self.failures) - 1
        suffix = f" (and {more} more failure{'s' if more > 1 else ''})" if more > 0 else ""
        super().__init__(f"reference op failed: {first}{suffix}; its output was replaced by zeros")


_lock = threading.Lock()
_pending: dict[int, list[OpFailure]] = {}


def record(failure: OpFailure) -> None:
    """Remember ``failure`` for the current thread (bounded: the oldest are dropped past 100)."""
    with _lock:
        items = _pending.setdefault(threading.get_ident(), [])
        items.append(failure)
        del items[:-_MAX_PER_THREAD]


def take_failures(all_threads: bool = False) -> list[OpFailure]:
    """Return and forget the failures recorded on this thread (or on every thread)."""
    with _lock:
        if all_threads:
            out = [f for items in _pending.values() for f in items]
            _pending.clear()
            return out
        return _pending.pop(threading.get_ident(), [])


def raise_failures(all_threads: bool = False) -> None:
    """Raise :class:`ReferenceOpError` if a reference op failed since the last check.

    Call it after ``session.run`` when running a session yourself instead of through :func:`run`.
    """
    failures = take_failures(all_threads)
    if failures:
        raise ReferenceOpError(failures)


def run(
    session: Any,
    output_names: Sequence[str] | None,
    input_feed: Mapping[str, np.ndarray],
    run_options: Any = None,
) -> list[np.ndarray]:
    """``session.run(...)``, then raise :class:`ReferenceOpError` naming the node if a reference op failed.

    Failures left over from earlier unchecked runs on this thread are discarded first, so the
    error belongs to this call.
    """
    take_failures()
    outputs = session.run(output_names, input_feed, run_options)
    raise_failures()
    return outputs
