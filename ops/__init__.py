"""Reference implementations of com.microsoft ``MatMulNBits``, ``MatMulFpQ4`` and ``GatherBlockQuantized`` (``ort_wq.ops``).

Vectorised numpy, registered with onnxruntime as onnxruntime-extensions Python custom ops, so a
quantized graph runs (and can be checked) on any onnxruntime build:

- ``session_options()`` / ``register(so)``: unmodified models; com.microsoft ``MatMulFpQ4`` and
  float32 ``MatMulNBits`` nodes of one zero-point form (default: ort-wq's default output, uint8
  zero points) run the reference ops (process-wide once enabled); ``session_options(model=...)``
  names the nodes of other forms.
- ``to_reference(model)`` / ``reference_session(model)``: a copy whose quantized nodes point at
  the reference ops in their own domain (every MatMulNBits form, float16 too), so built-in and
  reference kernels can be compared in one process.

Run sessions with :func:`run` (or call :func:`raise_failures` after ``session.run``): an op body
never raises into onnxruntime, it records the failure and :func:`run` raises
:class:`ReferenceOpError` naming the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._cache import CACHE
from ._errors import OpFailure, ReferenceInputError, ReferenceOpError, raise_failures, run, take_failures
from .gather_block_quantized import evaluate_gather_block_quantized, gather_block_quantized
from .matmul_fpq4 import dequantize_fpq4, evaluate_matmul_fpq4, matmul_fpq4
from .matmul_nbits import dequantize_nbits, evaluate_matmul_nbits, matmul_nbits
from .registration import (
    REFERENCE_DOMAIN,
    contrib_override_active,
    nbits_variant,
    register,
    session_options,
    stats,
    unserved_nodes,
)
from .to_reference import (
    QUANTIZED_OPS,
    NodeProbe,
    inference_session,
    is_quantized_node,
    node_label,
    probe_quantized_nodes,
    reference_session,
    to_reference,
)

__all__ = [
    "REFERENCE_DOMAIN",
    "QUANTIZED_OPS",
    "OpFailure",
    "ReferenceInputError",
    "ReferenceOpError",
    "register",
    "session_options",
    "contrib_override_active",
    "unserved_nodes",
    "to_reference",
    "reference_session",
    "inference_session",
    "is_quantized_node",
    "node_label",
    "NodeProbe",
    "probe_quantized_nodes",
    "nbits_variant",
    "run",
    "raise_failures",
    "take_failures",
    "matmul_nbits",
    "matmul_fpq4",
    "gather_block_quantized",
    "dequantize_nbits",
    "dequantize_fpq4",
    "evaluate",
    "stats",
    "clear_cache",
    "set_cache_limit",
]


def evaluate(op_type: str, inputs: Sequence[np.ndarray | None], attributes: Mapping[str, Any]) -> np.ndarray:
    """Reference output of a ``MatMulNBits``, ``MatMulFpQ4`` or ``GatherBlockQuantized`` node from its ONNX
    inputs (``None`` for empty ones)."""
    if op_type == "MatMulNBits":
        return evaluate_matmul_nbits(inputs, attributes)
    if op_type == "GatherBlockQuantized":
        return evaluate_gather_block_quantized(inputs, attributes)
    if op_type == "MatMulFpQ4":
        return evaluate_matmul_fpq4(inputs, attributes)
    raise ValueError(f"op_type={op_type!r} has no reference implementation; use one of {QUANTIZED_OPS}")


def clear_cache() -> None:
    """Drop every cached dequantized weight."""
    CACHE.clear()


def set_cache_limit(max_bytes: int) -> None:
    """Bound the dequantized-weight cache (default 1 GiB, or ``ORT_WQ_REFERENCE_CACHE_MB``)."""
    CACHE.max_bytes = max_bytes
