"""Shared pieces of the weight-level algorithms: group views, parameters and errors, the final format.

Conventions (see :class:`~ort_wq.algorithms.base.QuantizedWeight`):

- A *group* is ``block_size`` consecutive K values of one output column. Algorithms that work
  group-wise use the view ``x[N, k_blocks, block_size]`` of the zero-padded ``W.T``; the padded
  tail of the last block is excluded from every error and from every min/max (``mask``).
- Quantization is always the kernel's unsigned form: ``q = clip(rint(x / scale + zp), 0, 2^b-1)``
  and ``x ~ (q - zp) * scale``. Symmetric means ``zp = 2^(b-1)`` (the kernel default, no
  zero-point input) on the grid of ``spec.sym_grid``: ``"mlas"``, ``scale = ratio * e / -2^(b-1)``
  with ``e`` the group's signed extreme (negative scales allowed: the extreme is exact at ratio
  1), or ``"inc"``, ``scale = ratio * 2 max|x| / (2^b - 1)``.
- Ranges and spans are computed in float64 where float32 would overflow (finite weights near
  ±3.4e38), and errors are measured relative to each group's magnitude, so no search sees inf.
- Asymmetric with integer zero points keeps ``zp`` in ``[0, 2^b-1]``, so the representable range
  always contains 0: ranges are widened to include 0 (unlike ``quant_tensor``'s ``asym``, which
  clips the zero point of groups that do not cross 0 and then saturates them).
- Asymmetric with float zero points (``spec.float_zero_points``) maps ``[min, max]`` exactly.
- Scales are rounded to the output dtype (float16 for a float16 weight) *before* the codes are
  computed, so the codes are optimal for the scales that are stored. Float zero points likewise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .base import LayerStats, QuantizedWeight, QuantSpec

# elements of one column chunk of the group view: keeps float32 temporaries cache-sized
CHUNK_ELEMS = 1 << 18

_HALF_TINY = float(np.finfo(np.float16).smallest_normal)
_HALF_MAX = float(np.finfo(np.float16).max)


def maxq_of(bits: int) -> int:
    return (1 << bits) - 1


def sym_zero(bits: int) -> int:
    return 1 << (bits - 1)


def float_zp(spec: QuantSpec) -> bool:
    """Whether this spec produces float zero points (asymmetric and the target allows it)."""
    return (not spec.symmetric) and bool(spec.float_zero_points)


def out_dtype(w: np.ndarray) -> type:
    """Dtype of scales (and float zero points): float16 for a float16 weight, else float32."""
    return np.float16 if np.asarray(w).dtype == np.float16 else np.float32


def check_weight(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"weight must be a float array, got dtype {w.dtype}")
    if not isinstance(spec.bits, (int, np.integer)) or not 1 <= spec.bits <= 8:
        raise ValueError(f"bits={spec.bits!r} is not supported; use 1..8 (the kernel runs 2, 4, 8)")
    if not isinstance(spec.block_size, (int, np.integer)) or spec.block_size < 1:
        raise ValueError(f"block_size={spec.block_size!r} must be a positive integer")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or Inf")
    return w


def require_stats(stats: LayerStats | None, name: str, k: int) -> LayerStats:
    if stats is None:
        raise ValueError(f"{name} needs calibration data (LayerStats); got stats=None")
    if stats.k != k:
        raise ValueError(f"{name}: stats are for K={stats.k} but the weight has K={k}")
    return stats


def group_view(w: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x[N, kb, bs] float32, mask[kb, bs] float32 or None)`` of the zero-padded ``W.T``."""
    k, n = w.shape
    kb = -(-k // bs)
    x = np.zeros((n, kb * bs), dtype=np.float32)
    x[:, :k] = np.asarray(w, dtype=np.float32).T
    x = x.reshape(n, kb, bs)
    if kb * bs == k:
        return x, None
    mask = np.ones(kb * bs, dtype=np.float32)
    mask[k:] = 0.0
    return x, mask.reshape(kb, bs)


def masked_minmax(x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max over the last axis, padded positions excluded (a group is never all padding)."""
    if mask is None:
        return x.min(axis=-1), x.max(axis=-1)
    valid = mask > 0
    return np.where(valid, x, np.inf).min(axis=-1), np.where(valid, x, -np.inf).max(axis=-1)


def round_scale(scale: np.ndarray, dtype) -> np.ndarray:
    """Scales as stored (float16 magnitudes kept normal and finite, sign kept), as float32 for the math."""
    scale = np.asarray(scale, dtype=np.float32)
    if dtype == np.float16:
        mag = np.clip(np.abs(scale), _HALF_TINY, _HALF_MAX).astype(np.float16).astype(np.float32)
        scale = np.where(scale < 0, -mag, mag)
    return scale


def round_zp(zp: np.ndarray, spec: QuantSpec, dtype) -> np.ndarray:
    """Zero points as stored: kernel default (sym), integers in range, or floats in ``dtype``."""
    if spec.symmetric:
        return np.full(np.shape(zp), sym_zero(spec.bits), dtype=np.float32)
    if float_zp(spec):
        zp = np.asarray(zp, dtype=np.float32)
        if dtype == np.float16:
            zp = np.clip(zp, -_HALF_MAX, _HALF_MAX).astype(np.float16).astype(np.float32)
        return zp
    return np.clip(np.rint(zp), 0, maxq_of(spec.bits)).astype(np.float32)


def minmax_params(
    lo: np.ndarray, hi: np.ndarray, spec: QuantSpec, ratio: float, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of groups with range ``[lo, hi]`` shrunk by ``ratio`` (1 = RTN range).

    - symmetric, ``"mlas"`` grid: ``scale = ratio * e / -2^(b-1)``, ``e`` the signed extreme
      (the minimum on a tie): at ratio 1 the extreme is exact (code ``-2^(b-1)``), as in rtn.
    - symmetric, ``"inc"`` grid: ``scale = ratio * 2 * max(|lo|, |hi|) / (2^b - 1)``.
    - asymmetric, integer zp: range widened to include 0, both ends times ``ratio``.
    - asymmetric, float zp: ``[lo, hi]`` times ``ratio`` mapped exactly onto ``[0, 2^b-1]``.
    A group of range 0 gets scale 1. Spans are taken in float64 (no overflow near float32's max).
    """
    maxq = maxq_of(spec.bits)
    if spec.symmetric:
        if spec.sym_grid == "mlas":
            ext = np.where(np.abs(hi) > np.abs(lo), hi, lo).astype(np.float64) * ratio
            scale = np.where(ext != 0, ext / -sym_zero(spec.bits), 1.0)
        else:
            amax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) * ratio
            scale = np.where(amax > 0, amax * (2.0 / maxq), 1.0)
        scale = round_scale(scale, dtype)
        return scale, np.full(scale.shape, sym_zero(spec.bits), dtype=np.float32)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if not float_zp(spec):
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    lo, hi = lo * ratio, hi * ratio
    span = hi - lo
    scale = round_scale(np.where(span > 0, span / maxq, 1.0), dtype)
    zp = round_zp(-lo / scale, spec, dtype)
    return scale, zp


def quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, maxq: int) -> np.ndarray:
    """Float codes ``clip(rint(x / scale + zp), 0, maxq)``; scale/zp broadcast over the last axis."""
    q = x / scale[..., None]
    q += zp[..., None]
    np.rint(q, out=q)
    np.clip(q, 0, maxq, out=q)
    return q


def group_error(
    x: np.ndarray,
    scale: np.ndarray,
    zp: np.ndarray,
    maxq: int,
    mask: np.ndarray | None,
    hblocks: np.ndarray | None,
    weights: np.ndarray | None = None,
    norm: np.ndarray | None = None,
    no_saturation: bool = False,
) -> np.ndarray:
    """Per-group reconstruction error ``[..., kb]``.

    Sum of squares, ``sum(weights * e^2)`` with ``weights`` (broadcast to ``x``), or ``e^T H_gg e``
    with ``hblocks``. ``norm`` ``[..., kb]`` (> 0) divides each group's errors first (the caller
    passes the same one for every candidate, so comparisons are unchanged; squares stay finite).
    ``no_saturation``: groups where some weight is off by more than half a step of ``scale``
    (clipped, not just rounded) get ``inf``.
    """
    q = quantize(x, scale, zp, maxq)
    q -= zp[..., None]
    q *= scale[..., None]
    q -= x
    if norm is not None:
        q /= norm[..., None]
    if mask is not None:
        q *= mask
    if hblocks is None:
        if weights is None:
            err = np.einsum("...i,...i->...", q, q)
        else:
            qw = q * weights
            err = np.einsum("...i,...i->...", qw, q)
    else:
        # q: [Nc, kb, bs]; hblocks: [kb, bs, bs] -> e_g^T H_g e_g per (n, g)
        et = np.ascontiguousarray(q.transpose(1, 0, 2))  # contiguous: np.matmul runs BLAS per group
        err = np.einsum("gni,gni->ng", np.matmul(et, hblocks), et)
    if no_saturation:
        half = np.abs(scale) * np.float32(0.5 * (1 + 1e-4))
        if norm is not None:
            half = half / norm
        err = np.where(np.abs(q).max(axis=-1) > half, np.inf, err)
    return err


def group_norm(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A positive per-group magnitude (``max(|lo|, |hi|)``, 1 for all-zero groups) to measure errors in."""
    amax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float32)
    return np.where(amax > 0, amax, np.float32(1.0))


def column_chunks(n: int, per_column: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // max(1, per_column))
    return [(c, min(n, c + step)) for c in range(0, n, step)]


def _workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(8, os.cpu_count() or 1))


def run_chunks(fn: Callable[[int, int], None], n: int, per_column: int) -> None:
    """Call ``fn(c0, c1)`` for every column chunk, on a thread pool when there are several.

    The chunks are independent and numpy releases the GIL in its kernels; ``fn`` writes its own
    slice of preallocated outputs, so the result does not depend on the thread count.
    """
    chunks = column_chunks(n, per_column)
    workers = min(_workers(), len(chunks))
    if workers <= 1:
        for c in chunks:
            fn(*c)
        return
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(lambda c: fn(*c), chunks):
            pass


def hessian_blocks(h: np.ndarray, k: int, bs: int) -> np.ndarray:
    """Diagonal ``bs x bs`` blocks of ``H[K, K]`` as float32 ``[kb, bs, bs]`` (padding zero)."""
    kb = -(-k // bs)
    out = np.zeros((kb, bs, bs), dtype=np.float32)
    for g in range(kb):
        g0, g1 = g * bs, min(k, (g + 1) * bs)
        out[g, : g1 - g0, : g1 - g0] = h[g0:g1, g0:g1]
    return out


def finalize(
    x: np.ndarray | None,
    scale: np.ndarray,
    zp: np.ndarray,
    spec: QuantSpec,
    k: int,
    dtype,
    q: np.ndarray | None = None,
) -> QuantizedWeight:
    """The :class:`QuantizedWeight` for stored ``scale``/``zp`` ``[N, kb]``.

    Codes are recomputed from the group view ``x`` with the stored (already rounded) parameters,
    unless ``q`` (float or int ``[N, kb, bs]``) is given (GPTQ's codes depend on the order).
    """
    n, kb = scale.shape
    bs = spec.block_size
    maxq = maxq_of(spec.bits)
    scale = round_scale(scale, dtype)
    zpr = round_zp(zp, spec, dtype)
    if q is None:
        q = np.empty((n, kb, bs), dtype=np.uint8)

        def one(c0: int, c1: int) -> None:
            q[c0:c1] = quantize(x[c0:c1], scale[c0:c1], zpr[c0:c1], maxq)

        run_chunks(one, n, kb * bs)
    else:
        q = np.clip(np.rint(q), 0, maxq).astype(np.uint8).reshape(n, kb, bs)
    if kb * bs > k:
        q.reshape(n, -1)[:, k:] = 0
    if spec.symmetric:
        zero_point = None
    elif float_zp(spec):
        zero_point = zpr.astype(dtype)
    else:
        zero_point = zpr.astype(np.uint8)
    return QuantizedWeight(q, scale.astype(dtype), zero_point, spec.bits, k)


def minmax_result(w: np.ndarray, spec: QuantSpec, note: str = "") -> QuantizedWeight:
    """The min/max range as is: rtn's result (with float zero points, ``[min, max]`` mapped exactly)."""
    if float_zp(spec):
        dtype = out_dtype(w)
        x, mask = group_view(w, spec.block_size)
        scale, zp = minmax_params(*masked_minmax(x, mask), spec, 1.0, dtype)
        result = finalize(x, scale, zp, spec, w.shape[0], dtype)
    else:
        from .rtn import rtn_fast

        result = rtn_fast(np.asarray(w), spec)
    if note:
        result.notes.append(note)
    return result


def rtn_dequant(w: np.ndarray, spec: QuantSpec, dtype) -> np.ndarray:
    """Min/max round-to-nearest then dequantize: float32 ``[K, N]`` (the helpers' RTN, see module doc)."""
    k, n = w.shape
    x, mask = group_view(w, spec.block_size)
    lo, hi = masked_minmax(x, mask)
    s, z = minmax_params(lo, hi, spec, 1.0, dtype)
    q = quantize(x, s, z, maxq_of(spec.bits))
    q -= z[..., None]
    q *= s[..., None]
    return q.reshape(n, -1)[:, :k].T
