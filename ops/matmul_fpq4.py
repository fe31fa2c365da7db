"""Reference com.microsoft ``MatMulFpQ4``: blob checks, dequantization and a float32 matmul.

The blob holds, for each output column and each block of 32 K values, an fp32 scale, a uint8
zero point (``blk_quant_type != 0``; type 0 has none and uses 8) and 16 bytes of 4-bit values
(see :mod:`ort_wq.packing`). Like onnxruntime, any ``blk_quant_type`` other than 0 means the
21-byte records with zero point. The blob size is checked against ``B_shape`` before anything is
read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ort_wq.packing import FPQ4_BLOCK_SIZE, unpack_fpq4_blob

from ._cache import CACHE, WeightCache, fingerprint
from ._errors import ReferenceInputError

__all__ = ["fpq4_shape", "dequantize_fpq4", "matmul_fpq4", "evaluate_matmul_fpq4"]


def fpq4_shape(b_shape: np.ndarray) -> tuple[int, int]:
    """``(K, N)`` from the ``B_shape`` input, checked to be two positive integers."""
    shape = np.asarray(b_shape).reshape(-1)
    if shape.size != 2 or not np.issubdtype(shape.dtype, np.integer) or (shape < 1).any():
        raise ReferenceInputError(f"B_shape must be two positive integers [K, N], got {shape.tolist()}")
    return int(shape[0]), int(shape[1])


def dequantize_fpq4(blob: np.ndarray, b_shape: np.ndarray, blk_quant_type: int = 1) -> np.ndarray:
    """The transposed float32 weight ``W.T`` (``[N, K]``, C-contiguous) of a MatMulFpQ4 node."""
    k, n = fpq4_shape(b_shape)
    blob = np.asarray(blob)
    if blob.dtype != np.uint8:
        raise ReferenceInputError(f"B must be a uint8 blob, got {blob.dtype}")
    try:
        q, scale, zp = unpack_fpq4_blob(blob, k, n, 0 if blk_quant_type == 0 else 1)
    except ValueError as exc:
        raise ReferenceInputError(str(exc)) from None
    w = q.astype(np.float32)
    w -= zp.astype(np.float32)[..., None]
    w *= scale[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k])


def matmul_fpq4(
    a: np.ndarray,
    blob: np.ndarray,
    b_shape: np.ndarray,
    *,
    blk_quant_type: int = 1,
    cache: WeightCache | None = CACHE,
) -> np.ndarray:
    """``A @ W`` in float32 for ``A`` of shape ``[..., K]``; returns float32 ``[..., N]``."""
    k, n = fpq4_shape(b_shape)
    a = np.asarray(a)
    if a.ndim < 1 or a.shape[-1] != k:
        shape = list(a.shape)
        raise ReferenceInputError(f"A has shape {shape} but B_shape is [{k}, {n}]: its last dimension must be {k}")

    def compute() -> np.ndarray:
        return dequantize_fpq4(blob, b_shape, blk_quant_type)

    if cache is None:
        wt = compute()
    else:
        key = ("MatMulFpQ4", k, n, blk_quant_type == 0, FPQ4_BLOCK_SIZE, fingerprint(blob))
        wt = cache.get(key, compute)
    return np.ascontiguousarray(np.matmul(a.astype(np.float32, copy=False), wt.T), dtype=np.float32)


def evaluate_matmul_fpq4(
    inputs: Sequence[np.ndarray | None], attributes: Mapping[str, Any], cache: WeightCache | None = CACHE
) -> np.ndarray:
    """Evaluate a MatMulFpQ4 node from its ONNX inputs ``(A, B, B_shape)``; ``blk_quant_type`` defaults to 1."""
    if len(inputs) < 3 or any(x is None for x in inputs[:3]):
        raise ReferenceInputError("A, B and B_shape are required inputs")
    a, blob, b_shape = inputs[:3]
    return matmul_fpq4(a, blob, b_shape, blk_quant_type=int(attributes.get("blk_quant_type", 1)), cache=cache)
