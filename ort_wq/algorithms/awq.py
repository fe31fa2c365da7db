"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling, then a clip search. Numpy.

With ``Y = X @ W`` (``W[K, N]``), AWQ quantizes ``diag(s) @ W`` and divides the activation by
``s`` (the graph side folds ``1 / s`` into the producer of ``X``). Channels with large
activations get ``s > 1``: their weights use more of the quantization grid.

- Scale search: ``s = a^alpha`` with ``a = stats.abs_mean`` (mean ``|X|`` per channel, floored
  at 1% of its mean so rarely-active channels are not scaled to nothing), normalised so
  ``max(s) * min(s) = 1``; ``alpha`` on the grid ``0, 1/grid, ..., (grid-1)/grid``. The error of a
  candidate is the output error on the calibration set, from the Hessian alone:
  ``trace(D^T H D)`` with ``D = W - diag(1/s) deq(Q(diag(s) W))``, ``H = stats.hessian``
  (no activations are stored). ``Q`` is plain min/max rounding (as in AWQ). ``alpha = 0`` is
  ``s = 1``, i.e. plain rounding, so the search never ends worse than rounding under this error.
  For ``N > max_search_columns`` the error is measured on evenly spaced output columns only.
- Clip search (AWQ's ``auto_clip``): per group, the clip ratio minimising the group's share of
  the output error ``e^T H'_gg e``, with ``H' = diag(1/s) H diag(1/s)`` the Hessian of the scaled
  input and ``H'_gg`` its diagonal block for the group's K range (AWQ measures each group with
  the input restricted to the group's channels, the same quantity).
- ``allow_input_scale=False`` (the producer cannot absorb ``1/s``): no scaling, clip search
  only; ``input_scale`` stays ``None`` and ``notes`` says so.

Float zero points: honoured when called with ``spec.float_zero_points`` (asymmetric groups then
map ``[min, max]`` exactly), but the algorithm is registered without ``float_zero_points`` so
the transform asks it for uint8 zero points: on MiniLM (4-bit asym) float zero points lowered
the per-layer error but did not consistently raise the end-to-end cosine (block 32: 0.9838 vs
0.9833, block 128: 0.9614 vs 0.9760; the FFN down-projections, fed by GELU outputs, lost most);
with an integer zero point 0 stays exactly representable, and the near-zero majority of the
weights gets no common offset.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    check_weight,
    finalize,
    group_view,
    hessian_blocks,
    masked_minmax,
    minmax_params,
    out_dtype,
    require_stats,
    rtn_dequant,
)
from ._search import clip_ratios, search_clip
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register

NOT_FOLDABLE_NOTE = "input scaling not foldable: clip search only"


def search_input_scale(
    w: np.ndarray,
    h: np.ndarray,
    abs_mean: np.ndarray,
    spec: QuantSpec,
    dtype,
    grid: int = 20,
    max_search_columns: int = 1024,
) -> tuple[np.ndarray, float, float, float]:
    """AWQ's grid search: ``(s[K] float32, alpha, err(alpha), err(alpha=0))`` (errors = trace(D^T H D))."""
    k, n = w.shape
    wf = np.asarray(w, dtype=np.float32)
    if n > max_search_columns:
        wf = np.ascontiguousarray(wf[:, np.linspace(0, n - 1, max_search_columns).round().astype(np.int64)])
    hf = np.asarray(h, dtype=np.float32)
    a = np.asarray(abs_mean, dtype=np.float64)
    if not np.all(np.isfinite(a)) or not np.any(a > 0):
        return np.ones(k, dtype=np.float32), 0.0, 0.0, 0.0
    a = np.maximum(a, 0.01 * float(np.mean(a)))
    best = (None, 0.0, np.inf)
    err0 = np.inf
    for i in range(max(1, grid)):
        alpha = i / max(1, grid)
        s = a**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        d = wf - rtn_dequant(wf * s[:, None], spec, dtype) / s[:, None]
        err = float(np.einsum("ij,ij->", hf @ d, d, dtype=np.float64))
        if i == 0:
            err0 = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], err0


@register("awq", needs_calibration=True, options={
    "allow_input_scale": OptionSpec(bool), "grid": OptionSpec(int, min=1), "clip": OptionSpec(bool), "clip_grid": OptionSpec(int, min=1),
    "min_ratio": OptionSpec(float, min=0, min_open=True, max=1), "max_search_columns": OptionSpec(int, min=1)})
def awq(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    allow_input_scale: bool = True,
    grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    min_ratio: float = 0.5,
    max_search_columns: int = 1024,
) -> QuantizedWeight:
    """AWQ: scale search (unless ``allow_input_scale=False``) then clip search (unless ``clip=False``).

    Returns ``input_scale`` ``[K]`` float32 (> 0): the result approximates ``diag(input_scale) @ W``
    and the activation must be divided by ``input_scale``. ``None`` when scaling is disabled.
    """
    w = check_weight(w, spec)
    k, n = w.shape
    stats = require_stats(stats, "awq", k)
    dtype = out_dtype(w)
    notes: list[str] = []
    if allow_input_scale:
        h = stats.hessian
        s, alpha, err, err0 = search_input_scale(w, h, stats.abs_mean, spec, dtype, grid, max_search_columns)
        notes.append(f"awq: alpha={alpha:.2f}, search error {err:.4g} vs {err0:.4g} unscaled")
        ws = np.asarray(w, dtype=np.float32) * s[:, None]
        hs = h / np.outer(s, s).astype(np.float64) if clip else None  # the fold does its own (clip=False)
    else:
        s = None
        notes.append(NOT_FOLDABLE_NOTE)
        ws = np.asarray(w, dtype=np.float32)
        hs = None
    hb = None
    if clip:
        hb = hessian_blocks(hs, k, spec.block_size) if hs is not None else stats.diagonal_blocks(spec.block_size)
    # in slabs of output columns: no padded float32 copy of a whole LLM head at once
    parts = []
    for c0 in range(0, n, _SLAB_COLUMNS):
        x, mask = group_view(ws[:, c0 : c0 + _SLAB_COLUMNS], spec.block_size)
        if clip:
            scale, zp = search_clip(x, mask, spec, dtype, clip_ratios(spec, clip_grid, min_ratio), hblocks=hb)
        else:
            lo, hi = masked_minmax(x, mask)
            scale, zp = minmax_params(lo, hi, spec, 1.0, dtype)
        parts.append(finalize(x, scale, zp, spec, k, dtype))
        del x
    result = parts[0] if len(parts) == 1 else _concat(parts)
    result.input_scale = s
    result.notes.extend(notes)
    return result


_SLAB_COLUMNS = 4096


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One result from results for consecutive slabs of output columns."""
    first = parts[0]
    zps = None if first.zero_point is None else np.concatenate([p.zero_point for p in parts])
    return QuantizedWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]), zps,
                           first.bits, first.k, notes=list(first.notes))
