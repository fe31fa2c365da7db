"""GPTQ (Frantar et al., 2022) in numpy, for ``W[K, N]`` with ``Y = X @ W``.

The rows of ``W`` (input channels, K) are quantized one at a time; each row's quantization
error is spread over the rows not yet quantized through the upper Cholesky factor ``U`` of
``H^-1`` (``H = X^T X`` over the calibration rows, ``stats.hessian``): within a column block of
``block`` rows immediately (two-level: inside sub-blocks of 32 rows row by row, to the rest of
the column block once per sub-block), to the later blocks lazily, once per block (one matrix
product). Lazy batching only reorders the arithmetic: the codes are those of the row-by-row
update (checked against the textbook OBS form in the tests).
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
- Act-order (``act_order=True``, the default): rows are processed by decreasing ``H[k, k]``;
  since the kernel has no ``g_idx``, groups stay the contiguous K blocks, so their parameters
  are computed up front from the original weight ("static groups", with the clip search when
  ``clip_search``). The clip ratio of a static group minimises the group's share of the output
  error, ``e^T H_gg e`` with ``H_gg`` the group's diagonal block of ``X^T X``
  (``group_objective="output"``, the default), not its weight error ``|e|^2``
  (``"weight"``): GPTQ then compensates the rounding within that range. Full SmolLM2-135M,
  block 128 sym, 8 x 256 calibration tokens, perplexity on the 2048 dev tokens (fp32 28.35):
  34.41 -> **30.14** (KL to fp32 0.243 -> 0.174), same time. Measured on MiniLM (4-bit, mean cosine to fp32): 0.9897 vs 0.9887 without
  act-order at block 32, 0.9857 vs 0.9825 at block 128; ``act_order=False`` is the classic
  sequential-groups GPTQ.

Scale: ``H`` is factorised in place in one float32 ``K x K`` array (the permuted copy of
``X^T X``, the only one made): a left-looking blocked Cholesky of the reversed ``H`` and a
blocked triangular inverse, matrix products between blocks of 512 and LAPACK only on blocks of
<= 128, on one BLAS thread (weights run in parallel). On an 11008 x 1024 down projection
calibrated on 4096 rows (``benchmarks/bench_gptq_llm.py``, 2 shared cores): 33 s and 1.5 GB
peak RSS against onnxruntime's GPTQ's 135 s and 4.6 GB in the same run (0.25x, 0.33x); before:
6.9 GB (a float64 ``H`` copied four times) and 0.38x the time.

Float zero points: honoured when called with ``spec.float_zero_points`` (asymmetric groups then
map ``[min, max]`` exactly), but the algorithm is registered without ``float_zero_points`` so
the transform asks it for uint8 zero points: on MiniLM (4-bit asym) float zero points lowered
the per-layer error but did not consistently raise the end-to-end cosine (block 32: 0.9910 vs
0.9921, block 128: 0.9871 vs 0.9873); with an integer zero point 0 stays exactly representable,
and the near-zero majority of the weights gets no common offset.
"""

from __future__ import annotations

import numpy as np

from . import _progress
from ._blas import one_blas_thread
from ._common import (
    check_weight,
    finalize,
    group_view,
    hessian_blocks,
    masked_minmax,
    maxq_of,
    minmax_params,
    out_dtype,
    require_stats,
)
from ._search import clip_ratios, search_clip
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register


# rows per inner step of the two-level lazy batching inside a column block: the same result as
# updating the whole column block after every row, with a quarter of the memory traffic
_SUB_BLOCK = 32


# rows/columns per block of the in-place Cholesky factorisation and triangular inverse; the
# diagonal blocks recurse with a quarter of it down to _LAPACK_MAX, the size handed to LAPACK
# (OpenBLAS's threaded potrf/getri are up to 100x slower than one thread on a busy machine above
# ~128; the matrix products between blocks do the bulk of the work)
_FACTOR_BLOCK = 512
_LAPACK_MAX = 128


def _cholesky_inplace(a: np.ndarray, b: int = _FACTOR_BLOCK) -> None:
    """Overwrite the symmetric ``a`` with its lower Cholesky factor ``L`` (upper part zeroed).

    Left-looking by column blocks: one block column at a time is updated with the finished
    columns (one matrix product), factorised on its diagonal block and solved below it. Memory:
    ``a`` itself plus one block column. ``np.linalg.LinAlgError`` if ``a`` is not positive definite.
    """
    k = a.shape[0]
    if k <= _LAPACK_MAX:
        a[...] = np.linalg.cholesky(a)
        return
    for j0 in range(0, k, b):
        j1 = min(j0 + b, k)
        if j0:
            a[j0:, j0:j1] -= a[j0:, :j0] @ a[j0:j1, :j0].T
        _cholesky_inplace(a[j0:j1, j0:j1], max(_LAPACK_MAX, b // 4))
        if j1 < k:
            l_inv = a[j0:j1, j0:j1].copy()
            _lower_inv_inplace(l_inv, max(_LAPACK_MAX, b // 4))
            a[j1:, j0:j1] = a[j1:, j0:j1] @ l_inv.T
            a[j0:j1, j1:] = 0.0


def _lower_inv_inplace(a: np.ndarray, b: int = _FACTOR_BLOCK) -> None:
    """Overwrite the lower-triangular ``a`` with its inverse, block column by block column from
    the last: ``[[D, 0], [B, T]]^-1 = [[D^-1, 0], [-T^-1 B D^-1, T^-1]]`` with ``T^-1`` already in
    place; ``T^-1 (B D^-1)`` is taken block row by block row over ``T``'s lower part only."""
    k = a.shape[0]
    if k <= _LAPACK_MAX:
        a[...] = np.tril(np.linalg.inv(a))
        return
    for j0 in reversed(range(0, k, b)):
        j1 = min(j0 + b, k)
        d_inv = a[j0:j1, j0:j1].copy()
        _lower_inv_inplace(d_inv, max(_LAPACK_MAX, b // 4))
        if j1 < k:
            p = a[j1:, j0:j1] @ d_inv
            for r0 in range(j1, k, b):
                r1 = min(r0 + b, k)
                a[r0:r1, j0:j1] = -(a[r0:r1, j1:r1] @ p[: r1 - j1])
        a[j0:j1, j0:j1] = d_inv


def hinv_upper(xtx: np.ndarray, damp: float, perm: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``H^-1 = U^T U``), float32, and ``d / mean(diag(H))``.

    ``H = xtx[perm][:, perm]`` (any positive scale of ``X^T X``: GPTQ is invariant to it). With
    ``J`` the order reversal, ``chol(J H J) = L`` gives ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and
    ``J L^-1 J`` is upper triangular: one factorisation and one triangular inverse, both in
    place in a single float32 ``K x K`` array (the only copy of ``H`` made here).
    """
    k = xtx.shape[0]
    order = (np.arange(k) if perm is None else np.asarray(perm))[::-1]
    diag = np.asarray(np.diagonal(xtx), dtype=np.float64)[order]
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = float(np.mean(diag))
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        raise ValueError("the Hessian has a non-positive or non-finite diagonal")
    d = damp * mean_diag
    idx = np.arange(k)
    for _ in range(5):
        work = np.asarray(xtx, dtype=np.float32)[np.ix_(order, order)]  # a new C-contiguous array
        work[idx, idx] = diag + d
        try:
            _cholesky_inplace(work)
        except np.linalg.LinAlgError:
            del work
            d = d * 10.0 if d > 0 else 1e-6 * mean_diag
            continue
        _lower_inv_inplace(work)
        return work[::-1, ::-1], d / mean_diag
    raise ValueError("GPTQ: the dampened Hessian is not positive definite (even with 10^4 x dampening)")


def _group_params(rows: np.ndarray, spec: QuantSpec, dtype, ratios) -> tuple[np.ndarray, np.ndarray]:
    """Scale / zp ``[N]`` of one group from its rows ``[g, N]``."""
    x = np.ascontiguousarray(rows.T)[:, None, :]
    if ratios is None:
        s, z = minmax_params(x.min(axis=-1), x.max(axis=-1), spec, 1.0, dtype)
    else:
        s, z = search_clip(x, None, spec, dtype, ratios)
    return s[:, 0], z[:, 0]


@register("gptq", needs_calibration=True, compensates=True, options={
    "damp": OptionSpec(float, min=0), "act_order": OptionSpec(bool), "block": OptionSpec(int, min=1),
    "clip_search": OptionSpec(bool), "group_objective": OptionSpec(str, choices=("weight", "output"))})
@one_blas_thread
def gptq(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
    clip_search: bool = True,
    group_objective: str = "output",
) -> QuantizedWeight:
    """GPTQ with group-aware scales (see the module doc). ``stats.hessian`` is required.

    Runs on one BLAS thread (:mod:`._blas`): the transform quantizes weights in parallel."""
    w = check_weight(w, spec)
    k, n = w.shape
    stats = require_stats(stats, "gptq", k)
    stats.hessian  # noqa: B018 - raises when nothing was accumulated
    xtx = stats.xtx  # X^T X itself: GPTQ is invariant to the 1 / rows scale of the mean
    bs = spec.block_size
    kb = -(-k // bs)
    dtype = out_dtype(w)
    maxq = maxq_of(spec.bits)
    ratios = clip_ratios(spec, 20, 0.5) if clip_search else None
    block = max(1, int(block))

    dead = int(np.count_nonzero(np.diagonal(xtx) == 0))

    wf = np.array(w, dtype=np.float32, copy=True)  # [K, N], updated in place
    scale = np.zeros((kb, n), dtype=np.float32)
    zp = np.zeros((kb, n), dtype=np.float32)
    codes = np.zeros((kb * bs, n), dtype=np.float32)

    if act_order:  # static groups from the original weight: every group in one vectorised pass
        x, mask = group_view(wf, bs)
        if ratios is None:
            s, z = minmax_params(*masked_minmax(x, mask), spec, 1.0, dtype)
        else:
            hb = hessian_blocks(xtx, k, bs) if group_objective == "output" else None
            s, z = search_clip(x, mask, spec, dtype, ratios, hblocks=hb)
            del hb
        scale[:], zp[:] = s.T, z.T
        del x, s, z
        perm = np.argsort(-np.diagonal(xtx), kind="stable")
        wf = wf[perm]
        u, used_damp = hinv_upper(xtx, damp, perm)
    else:
        perm = np.arange(k)
        u, used_damp = hinv_upper(xtx, damp)

    sub = min(_SUB_BLOCK, block)
    bar = _progress.steps(k, k * n)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wf[i1:i2]  # view: updated in place
        u1 = u[i1:i2, i1:i2]
        err1 = np.empty((i2 - i1, n), dtype=np.float32)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                row = perm[i1 + i]
                g = row // bs
                if not act_order and row % bs == 0:
                    # rows of the current sub-block are current; later rows have every update of
                    # the finished (sub-)blocks: exact whenever the group starts a sub-block or
                    # lies inside one (always, for power-of-two sizes)
                    scale[g], zp[g] = _group_params(wf[row : min(k, row + bs)], spec, dtype, ratios)
                s, z = scale[g], zp[g]
                x = w1[i]
                q = np.clip(np.rint(x / s + z), 0, maxq)
                codes[row] = q
                e = (x - (q - z) * s) / u1[i, i]
                err1[i] = e
                if i + 1 < j2:
                    w1[i + 1 : j2] -= np.outer(u1[i, i + 1 : j2], e)
            if j2 < i2 - i1:  # lazy update of the rest of the column block
                w1[j2:] -= u1[j1:j2, j2:].T @ err1[j1:j2]
        if i2 < k:  # lazy update of the later column blocks
            wf[i2:] -= u[i1:i2, i2:].T @ err1
        if bar is not None:
            bar.update(i2 - i1)
    if bar is not None:
        bar.close()

    q = codes.T.reshape(n, kb, bs)
    result = finalize(None, scale.T, zp.T, spec, k, dtype, q=q)
    result.notes.append(f"gptq: damp={used_damp:.3g}, act_order={act_order}, clip_search={clip_search}")
    if dead:
        result.notes.append(f"gptq: {dead} dead input channel(s) (zero Hessian diagonal)")
    return result
