"""Reference com.microsoft ``GatherBlockQuantized``: rows of a block-quantized table, dequantized.

Why: the kernel is what a quantized embedding (and a tied table it shares with ``MatMulNBits``)
runs on, so ``validate --reference`` and ``to_reference`` must be able to check and replace it
like the MatMul kernels. Supported form (what ort-wq writes, and the onnxruntime-genai builder's):
``data`` uint8 ``[V, D_packed]`` holding ``bits`` 4 or 8 codes packed along the last axis (low
nibble first), ``quantize_axis`` the last axis, ``gather_axis`` 0, ``scales[V, D / block_size]``,
optional uint8 ``zero_points`` packed the same way (absent: ``2**(bits - 1)``); indices int32 or
int64, negative ones counted from the end. Output ``(q - zp) * scale`` for the gathered rows, in
the scales' dtype (computed in float32, rounded once). Rows are unpacked only when gathered, so
a large vocabulary costs what is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import ReferenceInputError

__all__ = ["gather_block_quantized", "evaluate_gather_block_quantized"]


def _unpack(rows: np.ndarray, bits: int) -> np.ndarray:
    """Codes of uint8 rows ``[R, P]`` packed along the last axis: ``[R, P * 8 / bits]``."""
    if bits == 8:
        return rows
    lo, hi = rows & 0x0F, rows >> 4
    return np.stack([lo, hi], axis=-1).reshape(rows.shape[0], -1)


def gather_block_quantized(
    data: np.ndarray, indices: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None, *,
    bits: int = 4, block_size: int = 128, quantize_axis: int = 1, gather_axis: int = 0,
) -> np.ndarray:
    """``dequantize(data)[indices]`` for a 2-D table; returns float32 ``[*indices.shape, D]``."""
    data, scales, indices = np.asarray(data), np.asarray(scales), np.asarray(indices)
    if bits not in (4, 8):
        raise ReferenceInputError(f"bits={bits} is not supported; use 4 or 8")
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ReferenceInputError(f"data is {data.dtype} {list(data.shape)}; the reference op takes uint8 [V, D_packed]")
    if gather_axis != 0 or quantize_axis not in (1, -1):
        raise ReferenceInputError(f"gather_axis={gather_axis}, quantize_axis={quantize_axis}: only 0 and 1 are supported")
    if block_size < 16 or block_size & (block_size - 1):
        raise ReferenceInputError(f"block_size={block_size} is not a power of two >= 16")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ReferenceInputError(f"indices are {indices.dtype}, not int32/int64")
    v, width = data.shape[0], data.shape[1] * 8 // bits
    kb = -(-width // block_size)
    if scales.shape != (v, kb):
        raise ReferenceInputError(f"scales have shape {list(scales.shape)} but data {list(data.shape)} with "
                                  f"bits={bits}, block_size={block_size} needs [{v}, {kb}]")
    zp_width = -(-kb * bits // 8)
    if zero_points is not None:
        zero_points = np.asarray(zero_points)
        if zero_points.dtype != np.uint8 or zero_points.shape != (v, zp_width):
            raise ReferenceInputError(f"zero points are {zero_points.dtype} {list(zero_points.shape)}; "
                                      f"need uint8 [{v}, {zp_width}]")
    flat = indices.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -v or flat.max() >= v):
        raise ReferenceInputError(f"an index is outside [-{v}, {v - 1}]")
    flat = np.where(flat < 0, flat + v, flat)
    q = _unpack(data[flat], bits).astype(np.float32)  # [R, width]
    if zero_points is None:
        zp = np.full((flat.size, kb), 1 << (bits - 1), dtype=np.float32)
    else:
        zp = _unpack(zero_points[flat], bits)[:, :kb].astype(np.float32)
    pad = kb * block_size - width
    if pad:
        q = np.concatenate([q, np.zeros((q.shape[0], pad), np.float32)], axis=1)
    w = (q.reshape(-1, kb, block_size) - zp[..., None]) * scales[flat].astype(np.float32)[..., None]
    return w.reshape(flat.size, -1)[:, :width].reshape(*indices.shape, width)


def evaluate_gather_block_quantized(inputs: Sequence[np.ndarray | None], attributes: Mapping[str, Any]) -> np.ndarray:
    """Evaluate a GatherBlockQuantized node from its ONNX inputs ``(data, indices, scales[, zero_points])``."""
    inputs = list(inputs) + [None] * (4 - len(inputs))
    data, indices, scales, zp = inputs[:4]
    if data is None or indices is None or scales is None:
        raise ReferenceInputError("data, indices and scales are required inputs")
    y = gather_block_quantized(
        data, indices, scales, zp, bits=int(attributes.get("bits", 4)), block_size=int(attributes.get("block_size", 128)),
        quantize_axis=int(attributes.get("quantize_axis", 1)), gather_axis=int(attributes.get("gather_axis", 0)),
    )
    return y.astype(np.asarray(scales).dtype, copy=False)
