"""Reference com.microsoft ``MatMulNBits``: input checks, dequantization and a float32 matmul.

``Y = A @ W (+ bias)`` with ``W[k, n] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]``,
the same float32 dequantization the CPU kernel performs at ``accuracy_level`` 0. Unpacking uses
:mod:`ort_wq.packing`, so the layouts are the ones checked against onnxruntime in the packing tests.
Every shape is checked against ``K``, ``N``, ``bits`` and ``block_size`` first: a mismatch raises
:class:`ReferenceInputError` with a message that says which input is wrong and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ort_wq.packing import NBITS_SUPPORTED_BITS, unpack_nbits_weight, unpack_nbits_zero_points

from ._cache import CACHE, WeightCache, fingerprint
from ._errors import ReferenceInputError

__all__ = ["check_nbits_attributes", "dequantize_nbits", "matmul_nbits", "evaluate_matmul_nbits"]


def check_nbits_attributes(K: int, N: int, bits: int, block_size: int) -> int:
    """Validate the attributes; returns ``k_blocks = ceil(K / block_size)``."""
    if bits not in NBITS_SUPPORTED_BITS:
        raise ReferenceInputError(f"bits={bits} is not supported; use one of {NBITS_SUPPORTED_BITS}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ReferenceInputError(f"block_size={block_size} is not a power of two >= 16")
    if K < 1 or N < 1:
        raise ReferenceInputError(f"K={K} and N={N} must be positive")
    return -(-K // block_size)


def _check_shapes(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int, bits: int, block_size: int
) -> int:
    kb = check_nbits_attributes(K, N, bits, block_size)
    want_b = (N, kb, block_size * bits // 8)
    where = f"K={K}, N={N}, bits={bits}, block_size={block_size}"
    if b.dtype != np.uint8 or b.shape != want_b:
        raise ReferenceInputError(f"B is {b.dtype} {list(b.shape)} but {where} need uint8 {list(want_b)}")
    if scales.size != N * kb or scales.ndim not in (1, 2) or (scales.ndim == 2 and scales.shape != (N, kb)):
        raise ReferenceInputError(f"scales have shape {list(scales.shape)} but {where} need [{N}, {kb}]")
    if zero_points is None:
        return kb
    if zero_points.dtype == np.uint8:
        per_row = -(-kb * bits // 8)
        if zero_points.size != N * per_row or (zero_points.ndim == 2 and zero_points.shape != (N, per_row)):
            flat = zero_points.ndim == 1 and zero_points.size == -(-N * kb * bits // 8)
            hint = " (zero points packed flat across rows; pack each row separately)" if flat else ""
            raise ReferenceInputError(
                f"packed zero points have shape {list(zero_points.shape)} but {where} need uint8 [{N}, {per_row}]{hint}"
            )
    elif np.issubdtype(zero_points.dtype, np.floating):
        if zero_points.size != N * kb or (zero_points.ndim == 2 and zero_points.shape != (N, kb)):
            shape = list(zero_points.shape)
            raise ReferenceInputError(f"float zero points have shape {shape} but {where} need [{N}, {kb}]")
    else:
        raise ReferenceInputError(f"zero points must be uint8 (packed) or float, got {zero_points.dtype}")
    return kb


def dequantize_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    K: int,
    N: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The transposed float32 weight ``W.T`` (``[N, K]``, C-contiguous) of a MatMulNBits node.

    A missing ``zero_points`` means the kernel default ``2**(bits - 1)``.
    """
    b, scales = np.asarray(b), np.asarray(scales)
    zero_points = None if zero_points is None else np.asarray(zero_points)
    kb = _check_shapes(b, scales, zero_points, K, N, bits, block_size)
    w = unpack_nbits_weight(b, bits, block_size).astype(np.float32)  # [N, kb, block_size]
    if zero_points is None:
        w -= np.float32(1 << (bits - 1))
    elif zero_points.dtype == np.uint8:
        w -= unpack_nbits_zero_points(zero_points.reshape(N, -1), bits, kb).astype(np.float32)[..., None]
    else:
        w -= zero_points.reshape(N, kb).astype(np.float32)[..., None]
    w *= scales.reshape(N, kb).astype(np.float32)[..., None]
    return np.ascontiguousarray(w.reshape(N, kb * block_size)[:, :K])


def matmul_nbits(
    a: np.ndarray,
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    bits: int = 4,
    block_size: int,
    cache: WeightCache | None = CACHE,
) -> np.ndarray:
    """``A @ W (+ bias)`` in float32 for ``A`` of shape ``[..., K]``; returns float32 ``[..., N]``.

    The dequantized weight is taken from ``cache`` (keyed by the packed bytes) when given.
    """
    a = np.asarray(a)
    if a.ndim < 1 or a.shape[-1] != K:
        raise ReferenceInputError(f"A has shape {list(a.shape)} but K={K}: its last dimension must be K")
    if bias is not None and np.shape(bias) != (N,):
        raise ReferenceInputError(f"bias has shape {list(np.shape(bias))} but N={N} needs [{N}]")

    def compute() -> np.ndarray:
        return dequantize_nbits(b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size)

    if cache is None:
        wt = compute()
    else:
        key = ("MatMulNBits", K, N, bits, block_size, fingerprint(b), fingerprint(scales), fingerprint(zero_points))
        wt = cache.get(key, compute)
    y = np.matmul(a.astype(np.float32, copy=False), wt.T)
    if bias is not None:
        y += np.asarray(bias, dtype=np.float32)
    return np.ascontiguousarray(y, dtype=np.float32)


def evaluate_matmul_nbits(
    inputs: Sequence[np.ndarray | None], attributes: Mapping[str, Any], cache: WeightCache | None = CACHE
) -> np.ndarray:
    """Evaluate a MatMulNBits node from its ONNX inputs ``(A, B, scales[, zero_points, g_idx, bias])``.

    Missing optional inputs are ``None``; the result has ``A``'s dtype (float16 is computed in
    float32 and rounded once, as the CPU kernel does). Attribute ``bits`` defaults to 4.
    """
    inputs = list(inputs) + [None] * (6 - len(inputs))
    a, b, scales, zp, g_idx, bias = inputs[:6]
    if a is None or b is None or scales is None:
        raise ReferenceInputError("A, B and scales are required inputs")
    if g_idx is not None:
        raise ReferenceInputError("g_idx (act-order) is not supported by the reference op")
    try:
        K, N, block_size = (int(attributes[name]) for name in ("K", "N", "block_size"))
    except KeyError as exc:
        raise ReferenceInputError(f"attribute {exc.args[0]!r} is required") from None
    bits = int(attributes.get("bits", 4))
    y = matmul_nbits(a, b, scales, zp, bias, K=K, N=N, bits=bits, block_size=block_size, cache=cache)
    return y.astype(np.asarray(a).dtype, copy=False)
