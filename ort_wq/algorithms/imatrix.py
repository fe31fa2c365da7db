"""imatrix: importance-weighted scale / zero-point search (llama.cpp's k-quants with an importance matrix).

Between rtn and gptq: it reads only the per-channel activation energy that calibration already
collects (``diag(X^T X) / rows``, the "importance matrix"), changes no code it does not have to
and propagates no error, so it costs a small multiple of rtn (one pass per candidate) and no
K x K algebra.

Per group (``block_size`` consecutive K values of one output column), with importance
``u_k = E[x_k^2] * sqrt(1 + w_k^2 / sigma2)`` (``sigma2``: the column's mean square weight; the
weighting of llama.cpp's ``quantize_row_*_impl``), minimise ``sum_k u_k (w_k - s (q_k - z))^2``:

1. candidates: the min/max parameters with the range scaled by each ratio of a grid around 1
   (as ``make_qx_quants`` tries ``iscale = -(nmax + 0.1 i) / max``); on the symmetric MLAS grid
   also the mirrored grid (the extreme exact at code ``2^(b-1) - 1`` instead of ``-2^(b-1)``);
2. codes by rounding to nearest, then the weighted least-squares refit of the parameters for
   those codes: ``s = sum u w c / sum u c^2`` (``c = q - z``, symmetric), or the joint fit of
   ``w ~ a q + b`` (asymmetric: ``s = a``, ``z = -b / a``, rounded to an integer unless float
   zero points are stored), then rounding again with the refitted parameters;
3. the candidate with the smallest weighted error is kept; the min/max range (rtn's parameters,
   up to a rounding tie; with float zero points the exact ``[min, max]`` map) is candidate 0, so no
   group ends worse than it under this error.

Without statistics for a weight (``stats=None`` is refused; the transform falls back to rtn
where no statistics were collected) use ``rtn-clip``, which runs the same weighting without the
activation term.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    check_weight,
    finalize,
    float_zp,
    group_view,
    maxq_of,
    out_dtype,
    quantize,
    require_stats,
    round_scale,
    round_zp,
    sym_zero,
)
from ._importance import activation_weighted
from ._search import search_clip
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register


def candidate_ratios(spec: QuantSpec, grid: int, span: float) -> list[float]:
    """Range ratios: 1 first, then ``grid`` steps over ``[1 - span, 1 + span / 4]`` (and mirrored ones)."""
    ratios = [1.0, *np.linspace(1.0 - span, 1.0 + span / 4, max(1, grid)).tolist()]
    if spec.symmetric and spec.sym_grid == "mlas" and spec.bits > 1:
        mid = sym_zero(spec.bits)
        flip = -mid / (mid - 1.0)
        ratios += [flip * r for r in np.linspace(1.0 - span / 2, 1.0, max(1, grid // 4)).tolist()]
    return ratios


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b, dtype=np.float64)  # float64 sums: no overflow near float32's max


def refit(x, wts, scale, zp, spec: QuantSpec, dtype, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares parameters for the codes of ``(scale, zp)``; falls back where degenerate."""
    q = quantize(x, scale, zp, maxq)
    if spec.symmetric:
        q -= zp[..., None]
        uq = wts * q
        num = _dot(uq, x)
        den = _dot(uq, q)
        ok = den > 0
        s = np.where(ok, num / np.where(ok, den, 1.0), scale)
        s = np.where(s != 0, s, scale)
        return round_scale(s, dtype), zp
    # joint fit of x ~ a q + b under weights
    sw = wts.sum(-1, dtype=np.float64)
    swq = _dot(wts, q)
    swx = _dot(wts, x)
    uq = wts * q
    swqq = _dot(uq, q)
    swqx = _dot(uq, x)
    det = sw * swqq - swq * swq
    ok = (det > 1e-12 * np.maximum(sw * swqq, 1e-30)) & (sw > 0)
    detv = np.where(ok, det, 1.0)
    a = (sw * swqx - swq * swx) / detv
    b = (swqq * swx - swq * swqx) / detv
    ok &= a > 0
    s = round_scale(np.where(ok, a, scale), dtype)
    z = round_zp(np.where(ok, -b / np.where(ok, s, 1.0), zp), spec, dtype)
    if not float_zp(spec):
        # the zero point was rounded: refit the scale alone for these codes and that zero point
        c = q - z[..., None]
        uc = wts * c
        den = _dot(uc, c)
        s1 = np.where(den > 0, _dot(uc, x) / np.where(den > 0, den, 1.0), 0.0)
        s = np.where(ok & (s1 > 0), round_scale(s1, dtype), s)
    return s, z


def weighted_search(x, mask, spec: QuantSpec, dtype, weights, ratios, refine: bool = True,
                    no_saturation: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the best candidate (ratio, then optional refit) under the weighted error; ``(scale, zp)``."""
    maxq = maxq_of(spec.bits)

    def fit(xc, wc, s, z):
        return refit(xc, wc, s, z, spec, dtype, maxq)

    return search_clip(x, mask, spec, dtype, ratios, weights=weights, refit=fit if refine else None,
                       no_saturation=no_saturation)


@register("imatrix", needs_calibration=True, statistics="diagonal", options={
    "grid": OptionSpec(int, min=1), "span": OptionSpec(float, min=0, min_open=True, max=0.99),
    "refine": OptionSpec(bool)})
def imatrix(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    grid: int = 12,
    span: float = 0.3,
    refine: bool = True,
) -> QuantizedWeight:
    """Importance-weighted parameter search (see the module doc). ``stats`` (activation energy) is required.

    ``grid``: ratio candidates over ``[1 - span, 1 + span/4]`` besides rtn's range; ``refine``:
    add the weighted least-squares refit of each candidate.
    """
    w = check_weight(w, spec)
    k = w.shape[0]
    stats = require_stats(stats, "imatrix", k)
    if not 0 < span < 1:
        raise ValueError(f"span={span!r} must lie in (0, 1)")
    dtype = out_dtype(w)
    x, mask = group_view(w, spec.block_size)
    weights = activation_weighted(stats, k, spec.block_size)
    scale, zp = weighted_search(x, mask, spec, dtype, weights, candidate_ratios(spec, int(grid), float(span)), refine)
    result = finalize(x, scale, zp, spec, k, dtype)
    result.notes.append(f"imatrix: grid={grid}, span={span}, refine={refine}")
    return result
