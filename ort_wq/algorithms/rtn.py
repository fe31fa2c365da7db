"""Round-to-nearest, min/max range per block: onnxruntime's (MLAS's) numbers, or the utilities'.

Grids (``spec.sym_grid`` chooses the symmetric one; asymmetric blocks always use the MLAS rule):

- symmetric, ``"mlas"`` (default): ``scale = e / -2^(b-1)`` with ``e`` the block's signed
  extreme (the value of largest magnitude; the minimum on a tie), codes ``[-2^(b-1), 2^(b-1)-1]``
  stored as ``q + 2^(b-1)`` (the kernel's default zero point). The largest-magnitude weight is
  exact (code ``-2^(b-1)``); the scale is negative when that weight is positive.
- symmetric, ``"inc"``: the seed utilities' ``quant_tensor(..., "sym", "uint")``:
  ``scale = 2 max|w| / (2^b - 1)``, so a positive extreme saturates at ``(2^(b-1)-1)/(2^(b-1)-1/2)``
  of its value.
- asymmetric (integer zero points): the range is widened to include 0, ``scale = (max - min) /
  (2^b - 1)``, ``zp = round(-min / scale)``: ``zp`` always lies in ``[0, 2^b-1]``, so no block
  saturates (``quant_tensor``'s ``asym`` clips the zero point of blocks whose range excludes 0).

The MLAS grid reproduces ``onnxruntime.capi._pybind_state.quantize_matmul_{2,4,8}bits`` (the C++
quantizer behind ``MatMulNBitsQuantizer``) bit for bit, in its float32 arithmetic: codes are
``clamp(roundf(w * (1 / scale) + zp), 0, 2^b - 1)`` (round half away from zero, reciprocal
first), the asymmetric zero point is computed from the unrounded scale, and float16 weights get
float16 scales before the codes are computed (``tests/test_ort_oracle.py``). One deliberate
difference: where ``max - min`` overflows float32 (finite weights near ±3.4e38) the span is
taken in float64, so the scale stays finite (MLAS would store inf).

:func:`rtn_reference` is the plain path (whole padded, transposed weight; ``quant_tensor`` for the
``"inc"`` grid). :func:`rtn_fast` computes the same expressions, element for element, on the
weight's own ``[K, N]`` layout viewed as ``[k_blocks, block, N]``: no transposed copy of the float
weight, min/max over contiguous rows, slabs of K blocks at a time (bounded temporaries;
memory-mapped weights are read once, in order). Only the uint8 codes are transposed. The two
agree bit for bit for every grid (``tests/test_fast_path.py``).
"""

from __future__ import annotations

import numpy as np

from ..utility import pad_tensor, quant_range, quant_tensor
from .base import LayerStats, QuantizedWeight, QuantSpec, register

# float values per slab: bounds the float temporaries to a few tens of MB
_SLAB_VALUES = 1 << 21


def _inc(spec: QuantSpec) -> bool:
    return spec.symmetric and spec.sym_grid == "inc"


def mlas_params(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(stored scale, scale as float32 for the codes, zero point float32)`` from block min/max.

    ``lo``/``hi`` are float32 (the block's own values, padding excluded or harmless: zeros never
    change the signed extreme, and the asymmetric range includes 0 anyway).
    """
    maxq = (1 << spec.bits) - 1
    mid = 1 << (spec.bits - 1)
    with np.errstate(over="ignore"):
        if spec.symmetric:
            ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            scale_f = ext / np.float32(-mid)
            zp = np.full(scale_f.shape, float(mid), dtype=np.float32)
        else:
            lo = np.minimum(lo, np.float32(0.0))
            hi = np.maximum(hi, np.float32(0.0))
            span = hi - lo
            scale_f = span / np.float32(maxq)
            wide = ~np.isfinite(span)  # only for |w| near the float32 maximum: span in float64
            if np.any(wide):
                wide_scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / maxq).astype(np.float32)
                scale_f = np.where(wide, wide_scale, scale_f)
            safe = np.where(scale_f != 0, scale_f, np.float32(1.0))
            zfp = np.where(scale_f != 0, np.float32(0.0) - lo / safe, lo)
            # roundf (half away from zero; zfp >= 0 here)
            zp = np.where(zfp - np.floor(zfp) >= 0.5, np.floor(zfp) + 1, np.floor(zfp))
            zp = np.clip(zp, 0, maxq).astype(np.float32)
    stored = scale_f.astype(dtype)
    return stored, stored.astype(np.float32), zp


def mlas_codes(x: np.ndarray, scale32: np.ndarray, zp: np.ndarray, maxq: int) -> np.ndarray:
    """``clamp(roundf(x * (1/scale) + zp), 0, maxq)`` in float32, as uint8; params broadcast over axis ``-1`` of x's block axis."""
    with np.errstate(divide="ignore"):
        recip = np.where(scale32 != 0, np.float32(1.0) / np.where(scale32 != 0, scale32, np.float32(1.0)), np.float32(0.0))
    v = np.multiply(x, recip.astype(np.float32))
    v += zp
    f = np.floor(v)
    v -= f
    v = np.greater_equal(v, np.float32(0.5), out=np.empty(v.shape, dtype=bool))
    f += v
    np.clip(f, 0, maxq, out=f)
    return f.astype(np.uint8)


def _finish(q: np.ndarray, k: int) -> np.ndarray:
    n, kb, bs = q.shape
    if kb * bs > k:
        q.reshape(n, -1)[:, k:] = 0
    return q


def rtn_reference(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """The plain path: the whole padded, transposed weight at once (``quant_tensor`` for ``"inc"``)."""
    k, n = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    if _inc(spec):
        q, scale, _ = quant_tensor(pad_tensor(w, bs, kb).T, spec.bits, bs, "sym", "uint")
        q8 = _finish(q.astype(np.uint8).reshape(n, kb, bs), k)
        scale_dtype = np.float16 if scale.dtype == np.float16 else np.float32
        return QuantizedWeight(q8, scale.reshape(n, kb).astype(scale_dtype), None, spec.bits, k)
    dtype = np.float16 if w.dtype == np.float16 else np.float32
    x = pad_tensor(np.asarray(w).astype(np.float32), bs, kb).T.reshape(n, kb, bs)
    valid = (np.arange(kb * bs) < k).reshape(kb, bs)
    lo = np.where(valid, x, np.float32(np.inf)).min(axis=-1)
    hi = np.where(valid, x, np.float32(-np.inf)).max(axis=-1)
    stored, s32, zp = mlas_params(lo, hi, spec, dtype)
    q = _finish(mlas_codes(x, s32[..., None], zp[..., None], (1 << spec.bits) - 1), k)
    zero_point = None if spec.symmetric else zp.astype(np.uint8)
    return QuantizedWeight(q, stored, zero_point, spec.bits, k)


def _slab_inc(w3: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, None]:
    """``quant_tensor``'s symmetric numbers on a float32 slab ``[kb, bs, N]``."""
    minq, maxq = quant_range(spec.bits, "sym", "uint")
    max_range = np.maximum(np.abs(w3.min(axis=1)), np.abs(w3.max(axis=1)))
    scale = np.where(max_range > 0, max_range.astype(np.float64) * 2.0 / (maxq - minq), 1.0)
    zp = float(1 << (spec.bits - 1))
    q = np.divide(w3, scale[:, None, :])
    q += zp
    np.round(q, out=q)
    np.clip(q, minq, maxq, out=q)
    return q.astype(np.uint8), scale, None


def _slab_mlas(w3: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    stored, s32, zp = mlas_params(w3.min(axis=1), w3.max(axis=1), spec, np.float32)
    q = mlas_codes(w3, s32[:, None, :], zp[:, None, :], (1 << spec.bits) - 1)
    return q, stored, None if spec.symmetric else zp.astype(np.uint8)


def _quantize_slabs(slabs, n: int, k: int, spec: QuantSpec) -> QuantizedWeight:
    """Fill codes ``[N, kb, bs]``, scales and zero points ``[N, kb]`` from ``(rows, blocks, w3)``
    slabs: ``w3`` a float32 ``[blocks, bs, rows]`` view of the zero-padded weight, ``rows`` and
    ``blocks`` the slices of the outputs it fills."""
    bs = spec.block_size
    kb = -(-k // bs)
    slab = _slab_inc if _inc(spec) else _slab_mlas
    q = np.empty((n, kb, bs), dtype=np.uint8)
    scale = np.empty((n, kb), dtype=np.float32)
    zero_point = None if spec.symmetric else np.empty((n, kb), dtype=np.uint8)
    for rows, blocks, w3 in slabs:
        qs, ss, zs = slab(w3, spec)
        q[rows, blocks] = qs.transpose(2, 0, 1)
        scale[rows, blocks] = ss.T
        if zero_point is not None:
            zero_point[rows, blocks] = zs.T
    return QuantizedWeight(_finish(q, k), scale, zero_point, spec.bits, k)


def _column_slabs(w: np.ndarray, bs: int):
    """Slabs of ``W[K, N]`` as stored: K blocks at a time, every column (min/max over contiguous rows)."""
    k, n = w.shape
    kb = -(-k // bs)
    step = max(1, _SLAB_VALUES // max(1, bs * n))
    for b0 in range(0, kb, step):
        b1 = min(kb, b0 + step)
        rows = w[b0 * bs : min(k, b1 * bs)]
        if rows.shape[0] < (b1 - b0) * bs:  # the last block: zero padding (never changes the range)
            rows = np.concatenate([rows, np.zeros(((b1 - b0) * bs - rows.shape[0], n), np.float32)])
        yield slice(None), slice(b0, b1), np.ascontiguousarray(rows).reshape(b1 - b0, bs, n)


def _row_slabs(wt: np.ndarray, bs: int):
    """Slabs of a weight stored transposed, ``wt = W.T`` ``[N, K]`` (a Gather table, a ``transB``
    Gemm weight): its blocks are contiguous along rows, so chunks of rows are viewed as
    ``[kb, bs, rows]``; no transposed copy of the float weight is made."""
    n, k = wt.shape
    kb = -(-k // bs)
    step = max(1, _SLAB_VALUES // max(1, kb * bs))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = wt[r0:r1]
        if kb * bs > k:  # the last block: zero padding (never changes the range)
            padded = np.zeros((r1 - r0, kb * bs), dtype=np.float32)
            padded[:, :k] = rows
            rows = padded
        yield slice(r0, r1), slice(None), rows.reshape(r1 - r0, kb, bs).transpose(1, 2, 0)


def rtn_fast(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest on ``W[K, N]`` float32, bit-identical to :func:`rtn_reference`; a weight
    stored transposed (``W.T`` C-contiguous) is read in its own layout."""
    if w.dtype != np.float32:
        return rtn_reference(w, spec)
    k, n = w.shape
    if not w.flags.c_contiguous and w.T.flags.c_contiguous:
        return _quantize_slabs(_row_slabs(w.T, spec.block_size), n, k, spec)
    return _quantize_slabs(_column_slabs(w, spec.block_size), n, k, spec)


@register("rtn")
def rtn(w: np.ndarray, spec: QuantSpec, stats: LayerStats | None = None) -> QuantizedWeight:
    """Round to nearest, min/max range per block (no calibration); grids in the module doc."""
    return rtn_fast(w, spec)
