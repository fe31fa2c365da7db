"""The per-group range search shared by rtn-clip, imatrix, hqq, awq and gptq's static groups.

Candidates are ranges shrunk by a grid of ratios (1 = rtn's min/max range, always first), each
optionally refitted; per group the candidate with the smallest error wins (:func:`search_clip`).
:func:`keep_unless_worse` puts rtn's range back where a result is worse under any of several
importances. Conventions (group view, masks, grids) are :mod:`._common`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._common import group_error, group_norm, masked_minmax, maxq_of, minmax_params, run_chunks, sym_zero
from .base import QuantSpec


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
