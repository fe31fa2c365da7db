"""Numerical edge cases of the range computations, and the search objectives."""

from __future__ import annotations

import numpy as np
import pytest

from ort_wq.algorithms import LayerStats, QuantSpec, get_algorithm

BIG = np.float32(3.0e38)
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow on the way either


def huge_weight() -> np.ndarray:
    """Finite float32 weights near the float32 maximum: ``max - min`` overflows in float32."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (64, 8)).astype(np.float32) * BIG
    w[0, :] = BIG
    w[1, :] = -BIG
    return w


@pytest.mark.parametrize("name", ["rtn", "rtn-clip", "hqq", "imatrix"])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, 32, False),
                                  QuantSpec(4, 32, True, sym_grid="inc"),
                                  QuantSpec(4, 32, False, float_zero_points=True)], ids=str)
def test_ranges_near_float32_max_stay_finite(name, spec):
    w = huge_weight()
    fn, needs = get_algorithm(name)
    stats = None
    if needs:
        stats = LayerStats(64)
        stats.update(np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32))
    qw = fn(w, spec, stats)
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale != 0)
    if qw.zero_point is not None:
        assert np.all(np.isfinite(qw.zero_point.astype(np.float32)))
    deq = (qw.q.astype(np.float64) - qw.zero_point_array()[..., None]) * qw.scale.astype(np.float64)[..., None]
    deq = deq.reshape(8, -1)[:, :64].T
    assert np.all(np.isfinite(deq))
    # within one quantization step of the true values (at most a clip of the range, never garbage)
    step = np.abs(qw.scale.astype(np.float64)).max()
    assert np.max(np.abs(deq - w.astype(np.float64))) <= 0.6 * (2**spec.bits - 1) * step
    assert np.max(np.abs(deq - w.astype(np.float64))) / np.float64(BIG) < 0.5
