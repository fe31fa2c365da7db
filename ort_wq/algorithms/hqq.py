"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free, in numpy.

Per group, HQQ minimises the sparsity-promoting ``lp`` (``p < 1``) reconstruction loss
``|| W - (Q - z) s ||_p^p`` by half-quadratic splitting: an auxiliary error ``W_e`` is split off
with the generalised soft-threshold (the ``lp`` proximal step), then the parameters get the
closed-form least-squares update against ``W - W_e``; ``beta`` grows by ``kappa`` each iteration.

What is optimised depends on what the format can store:

- asymmetric, float zero points (``spec.float_zero_points``, MatMulNBits 2/4-bit): the zero
  point, free (HQQ's own setting), plus -- our extension, on by default -- the scale, both by
  the joint least-squares fit of ``W - W_e`` on the codes.
- asymmetric, integer zero points: the same, with the zero point rounded and clipped to
  ``[0, 2^b-1]`` after every update (projected HQQ). The scale update is what makes this work:
  a zero-point-only update (``optimize_scale=False``) almost always rounds back to where it was.
- symmetric: the zero point is fixed by the kernel (``2^(b-1)``), so only the scale is
  optimised (least squares ``s = <W - W_e, Q - z> / ||Q - z||^2``).

Zero points: integers (uint8) unless asked for (``zero_points="float"`` / ``--zero-points float``).
Float zero points gain accuracy (SmolLM2 2-layer, 4-bit block 128 asym, KL of the logits to
fp32: 0.113 float vs 0.167 uint8; rtn 0.180) but onnxruntime's CPU MatMulNBits has no prepacked
kernel for them: at M = 1 (one decoded token) a call takes 22-600x as long
(``benchmarks/bench_zero_points.py``; 576 x 1536 block 32: 1.6 ms vs 0.07 ms), so decoding
becomes many times slower.

The searches keep, per group, the best iterate under rtn-clip's objective for the weight
(:func:`.rtn_clip.search_objective`): the magnitude-weighted squared error (``objective=
"magnitude"``, :mod:`._importance`: ``(1 + w^2 / sigma2) e^2``) rather than the plain squared
error (``"mse"``), which lets HQQ trade an output head's largest weights for its many small ones
(SmolLM2 2-layer, block 128 sym, KL: 0.463 with ``"mse"``, 0.139 with ``"magnitude"``, rtn
0.154); on output heads rtn-clip's head weighting (vocabulary energy and the input norm's
gain), from rtn-clip's head search, and its guard applied to the final iterates (a group that
reconstructs worse than rtn's range under either proxy alone gets rtn's range). Measured on
SmolLM2-135M (perplexity / KL to fp32 on 8 x 256 tokens, fp32 28.36, every MatMul 4-bit,
``benchmarks/bench_algorithms.py``): block 128 sym 45.53 / 0.646 (rtn 48.39 / 0.722; the head
by vocabulary energy alone 45.92 / 0.642; before the refit and the head weighting 47.46 /
0.713), block 32 sym 36.03 / 0.366 (rtn 37.91 / 0.405), block 128 asym 40.40 / 0.526 (rtn
40.25 / 0.565; without the guard 42.05 / 0.555); the rest in ``benchmarks/README.md``.

Differences from the reference implementation (documented choices):

- The proximal step works in units of the group's initial quantization step (``W / s0``), so
  ``beta`` means the same for every weight magnitude (the reference applies ``beta=10`` to raw
  weights, where the threshold is relative to the weights' absolute size: for typical
  transformer weights it never fires and the method reduces to alternating least squares).
- Symmetric runs and output heads start from rtn-clip's search (``init="auto"``).
- Instead of stopping the whole tensor when the mean error stops improving, every group keeps
  its own best iterate under the magnitude-weighted squared error, among the iterates that clip
  no weight past half a step (the start -- min/max, or the clip search -- is iterate 0, so no
  group ends worse than its start).
"""

from __future__ import annotations

import numpy as np

from ._common import (
    check_weight,
    finalize,
    group_error,
    group_norm,
    group_view,
    masked_minmax,
    maxq_of,
    minmax_params,
    out_dtype,
    quantize,
    round_scale,
    round_zp,
    run_chunks,
)
from ._importance import OBJECTIVES
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register
from .rtn_clip import clip_search, guard, search_objective


def _shrink_lp(d: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft threshold: ``sign(d) * relu(|d| - |d|^(p-1) / beta)``."""
    a = np.abs(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        if p == 1.0:
            t = a - 1.0 / beta
        else:
            t = a - np.power(a, p - 1.0) / beta
    np.maximum(t, 0.0, out=t)
    t[~np.isfinite(t)] = 0.0
    return np.copysign(t, d)


def _hqq_chunk(x, mask, spec, dtype, iters, lp_norm, beta, kappa, optimize_scale, start, weights):
    maxq = maxq_of(spec.bits)
    lo, hi = masked_minmax(x, mask)
    norm = group_norm(lo, hi)
    wc = None if weights is None else weights(x, 0, 0)
    if start is None:
        s, z = minmax_params(lo, hi, spec, 1.0, dtype)
    else:
        s, z = start
    best_err = group_error(x, s, z, maxq, mask, None, wc, norm)
    best_s, best_z = s, z
    # work in units of the initial step: x / s0 (s0 > 0 always)
    s0 = s.copy()
    xn = x / s0[..., None]
    sn = np.ones_like(s)
    m = 1.0 if mask is None else mask
    count = float(x.shape[-1]) if mask is None else np.maximum(mask.sum(-1), 1.0)
    b = beta
    for _ in range(iters):
        q = quantize(xn, sn, z, maxq)
        qc = q - z[..., None]
        e = _shrink_lp(xn - qc * sn[..., None], b, lp_norm) * m
        target = (xn - e) * m
        if spec.symmetric:
            den = np.einsum("...i,...i->...", qc * m, qc)
            num = np.einsum("...i,...i->...", target, qc)
            sn = np.where(den > 0, num / np.where(den > 0, den, 1.0), sn)
            sn = np.where(sn > 0, sn, 1.0)
        else:
            qm = q * m
            if optimize_scale:
                # joint least squares: target ~ a * q + c  (a = s, c = -s z)
                mq = qm.sum(-1) / count
                mt = target.sum(-1) / count
                var = np.einsum("...i,...i->...", qm, q) / count - mq * mq
                cov = np.einsum("...i,...i->...", qm, target) / count - mq * mt
                a = np.where(var > 1e-12, cov / np.where(var > 1e-12, var, 1.0), sn)
                a = np.where(a > 0, a, sn)
                sn, c = a, mt - a * mq
                z = -c / sn
            else:
                z = (qm - target / sn[..., None] * m).sum(-1) / count
        b *= kappa
        s = round_scale(sn * s0, dtype)
        z = round_zp(z, spec, dtype)
        sn = s / s0
        err = group_error(x, s, z, maxq, mask, None, wc, norm, no_saturation=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


@register("hqq", input_gain=True, options={
    "iters": OptionSpec(int, min=1), "lp_norm": OptionSpec(float, min=0, min_open=True, max=1),
    "beta": OptionSpec(float, min=0, min_open=True), "kappa": OptionSpec(float, min=1),
    "optimize_scale": OptionSpec(bool), "init": OptionSpec(str, choices=("auto", "minmax", "clip")),
    "objective": OptionSpec(str, choices=OBJECTIVES), "head_rule": OptionSpec(bool)})
def hqq(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = True,
    init: str = "auto",
    objective: str = "magnitude",
    head_rule: bool = True,
    input_gain: np.ndarray | None = None,
) -> QuantizedWeight:
    """Half-quadratic optimisation of each group's scale / zero point (see the module doc).

    ``init``: the starting point -- ``"minmax"`` (HQQ's), ``"clip"`` (the rtn-clip search) or
    ``"auto"``: clip search when symmetric (only the scale is free there, and the fit started
    from min/max ends worse than the grid) and on output heads, min/max otherwise (measured
    better for asymmetric). The iterates are judged by rtn-clip's objective for the weight
    (:func:`.rtn_clip.search_objective`: an output head by its input norm's gain, ``input_gain``,
    set by the transform, or else by the vocabulary's channel energy).

    Float zero points only when ``spec.float_zero_points`` and not ``spec.symmetric``. ``stats``
    is ignored.
    """
    w = check_weight(w, spec)
    k = w.shape[0]
    dtype = out_dtype(w)
    if init not in ("auto", "minmax", "clip"):
        raise ValueError(f"init={init!r}: use 'auto', 'minmax' or 'clip'")
    x, mask = group_view(w, spec.block_size)
    notes: list[str] = []
    goal = search_objective(w, spec, objective, head_rule, input_gain)
    weights = goal.weights
    if init == "auto":
        init = "clip" if spec.symmetric or goal.note else "minmax"
    if init == "minmax":
        start = None
    else:
        s0, z0, notes = clip_search(x, mask, spec, dtype, goal)
        start = (s0, z0)
    n, kb, bs = x.shape
    scale = np.empty((n, kb), dtype=np.float32)
    zp = np.empty((n, kb), dtype=np.float32)

    def one(c0: int, c1: int) -> None:
        st = None if start is None else (start[0][c0:c1], start[1][c0:c1])
        scale[c0:c1], zp[c0:c1] = _hqq_chunk(
            x[c0:c1], mask, spec, dtype, iters, lp_norm, beta, kappa, optimize_scale, st, weights
        )

    run_chunks(one, n, kb * bs)
    if goal.guards:  # the iterates may leave what the start's guards allowed
        notes = [goal.note, *guard(x, mask, spec, dtype, scale, zp, goal)]
    result = finalize(x, scale, zp, spec, k, dtype)
    result.notes.extend(notes)
    return result

