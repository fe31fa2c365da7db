"""Shared pieces of the weight-level algorithms: group views, parameter grids, the final format.

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


def default_min_ratio(spec: QuantSpec) -> float:
    """The clip searches' smallest ratio: 0.5 symmetric, 0.97 asymmetric.

    Measured on SmolLM2-135M (block 128 asym, perplexity; rtn 40.25): 0.5 gives 40.95, 0.97 gives
    40.16 (asymmetric blocks already fit both ends; shrinking them costs more than it saves).
    """
    return 0.5 if spec.symmetric else 0.97


def clip_ratios(spec: QuantSpec, grid: int, min_ratio: float) -> np.ndarray:
    """The clip-ratio grid: ``1.0`` (the RTN range) down to ``min_ratio`` in ``grid`` steps.

    The ``"inc"`` symmetric grid also gets ratios slightly above 1, up to the one that makes the
    largest positive value exactly representable (``q - zp = 2^(b-1) - 1``): its RTN scale
    ``amax / (2^(b-1) - 1/2)`` rounds a positive maximum down by half a step. (The ``"mlas"``
    grid is exact at the extreme at ratio 1.)
    """
    # quadratic spacing: fine steps near 1 (what 8-bit needs), coarse ones far out (2-bit)
    ratios = list(1.0 - (1.0 - min_ratio) * (np.arange(grid + 1) / grid) ** 2) if grid > 0 else [1.0]
    if spec.symmetric and spec.sym_grid == "inc" and spec.bits > 1:
        half = sym_zero(spec.bits)
        top = (half - 0.5) / (half - 1.0)
        ratios += list(np.linspace(1.0, top, 4)[1:])
    return np.asarray(ratios, dtype=np.float64)


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


def search_clip(
    x: np.ndarray,
    mask: np.ndarray | None,
    spec: QuantSpec,
    dtype,
    ratios: np.ndarray,
    hblocks: np.ndarray | None = None,
    weights: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    no_saturation: bool = False,
    refit: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the clip ratio of ``ratios`` with the lowest error; returns ``(scale, zp)`` [N, kb].

    ``x`` is the group view ``[N, kb, bs]``. The error is the group's squared reconstruction
    error; with ``weights`` (``weights(x[c0:c1], c0, c1)`` -> per-element importance broadcast to
    that chunk, see :mod:`._importance`) the weighted one; with ``hblocks`` (``[kb, bs, bs]``,
    the diagonal blocks of the input Hessian) the group's share of the output error
    ``e^T H_gg e``. Ratio 1 (the RTN range) is always in the grid, so no group gets worse than
    the min/max range under the measured error. ``no_saturation``: other ratios only where no
    weight is clipped beyond half a step (so no weight's error exceeds half of rtn's step).
    ``refit(x_chunk, weights_chunk, scale, zp) -> (scale, zp)``: with ``weights``, each ratio but
    the first also tries the parameters refitted from its own (padding carries no weight).
    """
    maxq = maxq_of(spec.bits)
    n, kb, bs = x.shape
    scale = np.empty((n, kb), dtype=np.float32)
    zp = np.empty((n, kb), dtype=np.float32)

    def one(c0: int, c1: int) -> None:
        xc = x[c0:c1]
        lo, hi = masked_minmax(xc, mask)
        norm = group_norm(lo, hi)
        wc = None if weights is None else weights(xc, c0, c1)
        best_err = None
        for i, r in enumerate(ratios):
            s, z = minmax_params(lo, hi, spec, float(r), dtype)
            cands = [(s, z)]
            if refit is not None and wc is not None and i > 0:
                cands.append(refit(xc, wc if mask is None else wc * mask, s, z))
            for s, z in cands:
                err = group_error(xc, s, z, maxq, mask, hblocks, wc, norm, no_saturation and i > 0)
                if best_err is None:
                    best_err, best_s, best_z = err, s, z
                else:
                    better = err < best_err
                    best_err = np.where(better, err, best_err)
                    best_s = np.where(better, s, best_s)
                    best_z = np.where(better, z, best_z)
        scale[c0:c1] = best_s
        zp[c0:c1] = best_z

    run_chunks(one, n, kb * bs)
    return scale, zp


def keep_unless_worse(
    x: np.ndarray,
    mask: np.ndarray | None,
    spec: QuantSpec,
    dtype,
    scale: np.ndarray,
    zp: np.ndarray,
    guards: tuple[Callable[[np.ndarray, int, int], np.ndarray], ...],
) -> float:
    """Per group, put rtn's min/max parameters back (in place) where ``(scale, zp)`` reconstruct
    worse than them under any of ``guards`` (importance builders, as ``search_clip``'s
    ``weights``); returns the share of groups that kept theirs (1.0 with no guards)."""
    if not guards:
        return 1.0
    maxq = maxq_of(spec.bits)
    n, kb, bs = x.shape
    kept = np.zeros((n, kb), dtype=bool)

    def one(c0: int, c1: int) -> None:
        xc = x[c0:c1]
        lo, hi = masked_minmax(xc, mask)
        norm = group_norm(lo, hi)
        s0, z0 = minmax_params(lo, hi, spec, 1.0, dtype)
        s, z = scale[c0:c1], zp[c0:c1]
        ok = np.ones(s.shape, dtype=bool)
        for guard in guards:
            wc = guard(xc, c0, c1)
            ok &= group_error(xc, s, z, maxq, mask, None, wc, norm) <= group_error(xc, s0, z0, maxq, mask, None, wc, norm)
        scale[c0:c1] = np.where(ok, s, s0)
        zp[c0:c1] = np.where(ok, z, z0)
        kept[c0:c1] = ok

    run_chunks(one, n, kb * bs)
    return float(kept.mean()) if kept.size else 1.0


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
