"""RTN+ ("rtn-clip"): round to nearest with a per-group clip-ratio search. No calibration.

For every group (``block_size`` consecutive K values of one output column) the range is shrunk
by each ratio of a grid (1.0 down to ``min_ratio``; the ``"inc"`` symmetric grid also tries
ratios slightly above 1 so a positive maximum can be hit exactly) and the ratio with the
smallest error of that group is kept. Ratio 1 is the round-to-nearest range, so no group
reconstructs worse than min/max rounding under the measured error (asymmetric integer zero
points: range widened to include 0, see :mod:`._common`).

What is measured, chosen on a real LLM (SmolLM2-135M, block 128 sym, perplexity, fp32 28.35,
rtn 48.39):

- ``objective="magnitude"`` (default): squared errors weighted by ``1 + w^2 / sigma2``
  (:mod:`._importance`), and (``saturate=False``) no candidate that clips a weight by more than
  half of its step. The plain squared error (``"mse"``) trades an output head's few large
  weights -- the ones that make its top logits -- for its many small ones (SmolLM2 2-layer, KL
  of the logits: 0.423 with ``"mse"``, 0.137 with ``"magnitude"``, rtn 0.154).
- output heads (``head_rule``, :func:`._importance.looks_like_output_head`): rtn's range is kept.
  The search gains on the 30 layers (35.70 vs rtn's 37.03 with the head left fp32) but loses on
  the head (36.47 vs 35.99 with only the head quantized); no weight-space error found here
  predicts the head's logit error without activation statistics (``imatrix`` has them).

Float zero points: honoured when called with ``spec.float_zero_points`` (asymmetric groups then
map ``[min, max]`` exactly), but the algorithm is registered without ``float_zero_points`` so
the transform asks it for uint8 zero points: on MiniLM (4-bit asym) float zero points lowered
the per-layer error but did not consistently raise the end-to-end cosine (block 32: 0.9715 vs
0.9754, block 128: 0.9439 vs 0.9566); with an integer zero point 0 stays exactly representable,
and the near-zero majority of the weights gets no common offset.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    check_weight,
    clip_ratios,
    default_min_ratio,
    finalize,
    group_view,
    minmax_result,
    out_dtype,
    search_clip,
)
from ._importance import HEAD_NOTE, OBJECTIVES, looks_like_output_head, objective_weights
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register


@register("rtn-clip", options={
    "grid": OptionSpec(int, min=1), "min_ratio": OptionSpec(float, min=0, min_open=True, max=1),
    "objective": OptionSpec(str, choices=OBJECTIVES), "saturate": OptionSpec(bool), "refine": OptionSpec(bool),
    "head_rule": OptionSpec(bool)})
def rtn_clip(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    grid: int = 20,
    min_ratio: float | None = None,
    objective: str = "magnitude",
    saturate: bool = False,
    refine: bool = False,
    head_rule: bool = True,
) -> QuantizedWeight:
    """Round to nearest with the per-group clip ratio minimising the group's weighted error.

    ``grid`` steps from ratio 1.0 to ``min_ratio`` (``grid=0``: min/max only; default 0.5
    symmetric, 0.97 asymmetric, see :func:`._common.default_min_ratio`); ``objective``
    ``"magnitude"`` or ``"mse"``; ``saturate=True`` allows clipping past half a step; ``refine``
    adds imatrix's weighted least-squares refit of each candidate; ``head_rule=False`` searches
    output heads too. ``stats`` is ignored.
    """
    w = check_weight(w, spec)
    k = w.shape[0]
    if head_rule and looks_like_output_head(*w.shape):
        return minmax_result(w, spec, HEAD_NOTE)
    dtype = out_dtype(w)
    x, mask = group_view(w, spec.block_size)
    weights = objective_weights(objective)
    ratios = clip_ratios(spec, grid, default_min_ratio(spec) if min_ratio is None else float(min_ratio))
    if refine:
        from .imatrix import weighted_search

        scale, zp = weighted_search(x, mask, spec, dtype, weights or (lambda xc, c0, c1: np.ones_like(xc)),
                                    list(ratios), True)
    else:
        scale, zp = search_clip(x, mask, spec, dtype, ratios, weights=weights, no_saturation=not saturate)
    return finalize(x, scale, zp, spec, k, dtype)
