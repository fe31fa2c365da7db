"""GPTQ (Frantar et al., 2022) in numpy, for ``W[K, N]`` with ``Y = X @ W``.

The rows of ``W`` (input channels, K) are quantized one at a time; each row's quantization
error is spread over the rows not yet quantized through the upper Cholesky factor ``U`` of
``H^-1`` (``H = X^T X`` over the calibration rows, ``stats.hessian``): within a column block of
``block`` rows immediately, to the later blocks lazily, once per block (one matrix product).
Every step is vectorised over the N output channels.

- Dampening: ``damp * mean(diag(H))`` is added to the diagonal (default 1%); if the Cholesky
  factorisation still fails the dampening is multiplied by 10 (up to 4 times).
- Dead inputs (``H[k, k] == 0``, channel never active in calibration): ``H[k, k] = 1`` as GPTQ
  does, so the factorisation exists; their rows have no coupling in ``H`` so their error does not
  propagate. Unlike the reference, their weights are *not* zeroed (they are quantized as they
  are): calibration says nothing about them, and zeroing would change the model for inputs that
  do use the channel.
- Groups: the kernel's blocks are ``block_size`` consecutive K rows. Without act-order the
  scale/zero point of a group is computed when its first row is reached, from the rows as
  updated so far (exact for power-of-two block sizes: a group then lies inside one column block
  of 128, or starts at one). Optionally with the clip search of rtn-clip (``clip_search``, on by
  default: the grid minimises the group's squared error of the updated rows).
- Act-order (``act_order=True``, off by default): rows are processed by decreasing ``H[k, k]``;
  since the kernel has no ``g_idx``, groups stay the contiguous K blocks, so their parameters
  are computed up front from the original weight ("static groups").
"""

from __future__ import annotations

import numpy as np

from ._common import (
    check_weight,
    clip_ratios,
    finalize,
    maxq_of,
    minmax_params,
    out_dtype,
    require_stats,
    search_clip,
)
from .base import LayerStats, QuantizedWeight, QuantSpec, register


def hinv_upper(h: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``H^-1 = U^T U``) and the dampening used."""
    h = np.array(h, dtype=np.float64, copy=True)
    k = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        raise ValueError("the Hessian has a non-positive or non-finite diagonal")
    d = damp * mean_diag
    eye = np.eye(k)
    for _ in range(5):
        try:
            lower = np.linalg.cholesky(h + d * eye)
            linv = np.linalg.solve(lower, eye)  # lower triangular
            hinv = linv.T @ linv
            return np.linalg.cholesky(hinv).T, d
        except np.linalg.LinAlgError:
            d = d * 10.0 if d > 0 else 1e-6 * mean_diag
    raise ValueError("GPTQ: the dampened Hessian is not positive definite (even with 10^4 x dampening)")


def _group_params(rows: np.ndarray, spec: QuantSpec, dtype, ratios) -> tuple[np.ndarray, np.ndarray]:
    """Scale / zp ``[N]`` of one group from its rows ``[g, N]``."""
    x = np.ascontiguousarray(rows.T)[:, None, :]
    if ratios is None:
        s, z = minmax_params(x.min(axis=-1), x.max(axis=-1), spec, 1.0, dtype)
    else:
        s, z = search_clip(x, None, spec, dtype, ratios)
    return s[:, 0], z[:, 0]


@register("gptq", needs_calibration=True)
def gptq(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    clip_search: bool = True,
) -> QuantizedWeight:
    """GPTQ with group-aware scales (see the module doc). ``stats.hessian`` is required."""
    w = check_weight(w, spec)
    k, n = w.shape
    stats = require_stats(stats, "gptq", k)
    h = stats.hessian
    bs = spec.block_size
    kb = -(-k // bs)
    dtype = out_dtype(w)
    maxq = maxq_of(spec.bits)
    ratios = clip_ratios(spec, 20, 0.5) if clip_search else None
    block = max(1, int(block))

    dead = int(np.count_nonzero(np.diag(h) == 0))

    wf = np.array(w, dtype=np.float32, copy=True)  # [K, N], updated in place
    scale = np.zeros((kb, n), dtype=np.float32)
    zp = np.zeros((kb, n), dtype=np.float32)
    codes = np.zeros((kb * bs, n), dtype=np.float32)

    if act_order:
        for g in range(kb):
            scale[g], zp[g] = _group_params(wf[g * bs : min(k, (g + 1) * bs)], spec, dtype, ratios)
        perm = np.argsort(-np.diag(h), kind="stable")
        wf = wf[perm]
        u, used_damp = hinv_upper(h[np.ix_(perm, perm)], damp)
    else:
        perm = np.arange(k)
        u, used_damp = hinv_upper(h, damp)
    u = u.astype(np.float32)

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wf[i1:i2]  # view: updated in place
        u1 = u[i1:i2, i1:i2]
        err1 = np.empty((i2 - i1, n), dtype=np.float32)
        for i in range(i2 - i1):
            row = perm[i1 + i]
            g = row // bs
            if not act_order and row % bs == 0:
                g_end = min(k, row + bs)
                rows = wf[row:g_end]  # rows in this block are current; later blocks got the lazy updates
                scale[g], zp[g] = _group_params(rows, spec, dtype, ratios)
            s, z = scale[g], zp[g]
            x = w1[i]
            q = np.clip(np.rint(x / s + z), 0, maxq)
            codes[row] = q
            e = (x - (q - z) * s) / u1[i, i]
            err1[i] = e
            if i + 1 < i2 - i1:
                w1[i + 1 :] -= np.outer(u1[i, i + 1 :], e)
        if i2 < k:
            wf[i2:] -= u[i1:i2, i2:].T @ err1

    q = codes.T.reshape(n, kb, bs)
    result = finalize(None, scale.T, zp.T, spec, k, dtype, q=q)
    result.notes.append(f"gptq: damp={used_damp:.3g}, act_order={act_order}, clip_search={clip_search}")
    if dead:
        result.notes.append(f"gptq: {dead} dead input channel(s) (zero Hessian diagonal)")
    return result
