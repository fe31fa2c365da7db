"""RTN+ ("rtn-clip"): round to nearest with a per-group clip-ratio search. No calibration.

For every group (``block_size`` consecutive K values of one output column) the range is shrunk
by each ratio of a grid (1.0 down to ``min_ratio``; symmetric grids also try ratios slightly
above 1 so a positive maximum can be hit exactly) and the ratio with the smallest squared
reconstruction error of that group is kept. Ratio 1 is the round-to-nearest range, so no group
reconstructs worse than min/max rounding (asymmetric integer zero points: range widened to
include 0, see :mod:`._common`).

Float zero points: honoured when called with ``spec.float_zero_points`` (asymmetric groups then
map ``[min, max]`` exactly), but the algorithm is registered without ``float_zero_points`` so
the transform asks it for uint8 zero points: on MiniLM (4-bit asym) float zero points lowered
the per-layer error but did not consistently raise the end-to-end cosine (block 32: 0.9715 vs
0.9754, block 128: 0.9439 vs 0.9566); with an integer zero point 0 stays exactly representable,
and the near-zero majority of the weights gets no common offset.
"""

from __future__ import annotations

import numpy as np

from ._common import check_weight, clip_ratios, finalize, group_view, out_dtype, search_clip
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register


@register("rtn-clip", options={"grid": OptionSpec(int, min=1), "min_ratio": OptionSpec(float, min=0, min_open=True, max=1)})
def rtn_clip(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> QuantizedWeight:
    """Round to nearest with the per-group clip ratio minimising the group's MSE.

    ``grid`` steps from ratio 1.0 to ``min_ratio`` (``grid=0``: min/max only). ``stats`` is ignored.
    """
    w = check_weight(w, spec)
    k = w.shape[0]
    dtype = out_dtype(w)
    x, mask = group_view(w, spec.block_size)
    scale, zp = search_clip(x, mask, spec, dtype, clip_ratios(spec, grid, min_ratio))
    return finalize(x, scale, zp, spec, k, dtype)
