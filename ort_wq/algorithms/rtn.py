"""Round-to-nearest: exactly the numbers of ``quant_tensor``, computed where the data lies.

``quant_tensor(pad_tensor(W).T, bits, block, "sym"|"asym", "uint")`` groups ``block`` consecutive
K values of one output column. :func:`rtn_reference` calls it as is. :func:`rtn_fast` computes
the same float64 expressions, element for element, on the weight's own ``[K, N]`` layout viewed
as ``[k_blocks, block, N]``: no transposed copy of the float weight, min/max over contiguous
rows, slabs of K blocks at a time (bounded temporaries; memory-mapped weights are read once, in
order). Only the uint8 codes are transposed. The two agree bit for bit (``tests/test_fast_path.py``).
"""

from __future__ import annotations

import numpy as np

from ..utility import pad_tensor, quant_range, quant_tensor
from .base import LayerStats, QuantizedWeight, QuantSpec, register

# float values per slab: bounds the float64 temporaries to a few tens of MB
_SLAB_VALUES = 1 << 21


def rtn_reference(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """The reference path: one ``quant_tensor`` call over the whole padded, transposed weight."""
    k, n = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    q, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, spec.bits, bs, "sym" if spec.symmetric else "asym", "uint")
    q8 = q.astype(np.uint8).reshape(n, kb, bs)
    if kb * bs > k:
        q8.reshape(n, -1)[:, k:] = 0
    scale_dtype = np.float16 if scale.dtype == np.float16 else np.float32
    zero_point = None if spec.symmetric else zp.reshape(n, kb).astype(np.uint8)
    return QuantizedWeight(q8, scale.reshape(n, kb).astype(scale_dtype), zero_point, spec.bits, k)


def _slab(w3: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes ``[kb, bs, N]`` (uint8), scales and zero points ``[kb, N]`` of a float32 slab ``[kb, bs, N]``."""
    minq, maxq = quant_range(spec.bits, "sym" if spec.symmetric else "asym", "uint")
    rmin = w3.min(axis=1)
    rmax = w3.max(axis=1)
    if spec.symmetric:
        max_range = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = np.where(max_range > 0, max_range.astype(np.float64) * 2.0 / (maxq - minq), 1.0)
        zp = np.full(scale.shape, float(1 << (spec.bits - 1)))
    else:
        span = (rmax - rmin).astype(np.float64)
        scale = np.where(rmin != rmax, span / (maxq - minq), 1.0)
        zp = np.clip(np.round((0.0 - rmin) / scale), 0, maxq).astype(np.uint8).astype(np.float64)
    q = np.divide(w3, scale[:, None, :])
    q += zp[:, None, :]
    np.round(q, out=q)
    np.clip(q, minq, maxq, out=q)
    return q.astype(np.uint8), scale, None if spec.symmetric else zp.astype(np.uint8)


def _outputs(n: int, kb: int, bs: int, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Empty codes ``[N, kb, bs]``, scales and zero points ``[N, kb]`` to be filled slab by slab."""
    zero_point = None if spec.symmetric else np.empty((n, kb), dtype=np.uint8)
    return np.empty((n, kb, bs), dtype=np.uint8), np.empty((n, kb), dtype=np.float32), zero_point


def _result(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, spec: QuantSpec, k: int) -> QuantizedWeight:
    n, kb, bs = q.shape
    if kb * bs > k:
        q.reshape(n, -1)[:, k:] = 0
    return QuantizedWeight(q, scale, zero_point, spec.bits, k)


def _rtn_rows(wt: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """:func:`rtn_fast` for a weight stored transposed, ``wt = W.T`` ``[N, K]`` (a Gather table, a
    ``transB`` Gemm weight): its blocks are contiguous along rows, so chunks of rows are viewed as
    ``[kb, bs, rows]`` slabs; no transposed copy of the float weight is made."""
    n, k = wt.shape
    bs = spec.block_size
    kb = -(-k // bs)
    q, scale, zero_point = _outputs(n, kb, bs, spec)
    step = max(1, _SLAB_VALUES // max(1, kb * bs))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = wt[r0:r1]
        if kb * bs > k:  # the last block: zero padding, as pad_tensor does
            padded = np.zeros((r1 - r0, kb * bs), dtype=np.float32)
            padded[:, :k] = rows
            rows = padded
        qs, ss, zs = _slab(rows.reshape(r1 - r0, kb, bs).transpose(1, 2, 0), spec)
        q[r0:r1] = qs.transpose(2, 0, 1)
        scale[r0:r1] = ss.T
        if zero_point is not None:
            zero_point[r0:r1] = zs.T
    return _result(q, scale, zero_point, spec, k)


def rtn_fast(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest on ``W[K, N]`` float32, bit-identical to :func:`rtn_reference`."""
    if w.dtype != np.float32:
        return rtn_reference(w, spec)
    if not w.flags.c_contiguous and w.T.flags.c_contiguous:
        return _rtn_rows(w.T, spec)
    k, n = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    q, scale, zero_point = _outputs(n, kb, bs, spec)
    step = max(1, _SLAB_VALUES // max(1, bs * n))
    for b0 in range(0, kb, step):
        b1 = min(kb, b0 + step)
        rows = w[b0 * bs : min(k, b1 * bs)]
        if rows.shape[0] < (b1 - b0) * bs:  # the last block: zero padding, as pad_tensor does
            rows = np.concatenate([rows, np.zeros(((b1 - b0) * bs - rows.shape[0], n), np.float32)])
        qs, ss, zs = _slab(np.ascontiguousarray(rows).reshape(b1 - b0, bs, n), spec)
        q[:, b0:b1, :] = qs.transpose(2, 0, 1)
        scale[:, b0:b1] = ss.T
        if zero_point is not None:
            zero_point[:, b0:b1] = zs.T
    return _result(q, scale, zero_point, spec, k)


@register("rtn")
def rtn(w: np.ndarray, spec: QuantSpec, stats: LayerStats | None = None) -> QuantizedWeight:
    """Round to nearest, min/max range per block (no calibration)."""
    return rtn_fast(w, spec)
