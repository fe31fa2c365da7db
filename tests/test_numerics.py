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


def _problem(k=256, n=64, rows=400, seed=0):
    """Activations with a few high-energy channels, a weight with a few large entries."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 20.0
    w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
    w[rng.integers(0, k, 30), rng.integers(0, n, 30)] *= 8.0
    stats = LayerStats(k)
    stats.update(x)
    return x, w, stats


def _out_err(x, w, qw) -> float:
    return float(np.linalg.norm(x.astype(np.float64) @ (w.astype(np.float64) - qw.dequantize().astype(np.float64))))


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 128, True), QuantSpec(4, 32, False),
                                  QuantSpec(2, 32, False), QuantSpec(8, 64, True),
                                  QuantSpec(4, 32, False, float_zero_points=True)], ids=str)
def test_imatrix_beats_rtn_on_outputs_and_never_loses_a_group(spec):
    from ort_wq.algorithms._importance import activation_weighted

    x, w, stats = _problem(k=200)  # K not a multiple of 128: a padded last block
    rtn, _ = get_algorithm("rtn")
    imatrix, needs = get_algorithm("imatrix")
    assert needs
    base, qw = rtn(w, spec), imatrix(w, spec, stats)
    assert qw.q.shape == base.q.shape and qw.scale.dtype == np.float32
    assert (qw.zero_point is None) == spec.symmetric
    assert _out_err(x, w, qw) < 0.97 * _out_err(x, w, base)
    # per group, the weighted error it minimises is never above rtn's (rtn is candidate 0)
    bs, kb = spec.block_size, -(-200 // spec.block_size)
    wv = np.zeros((64, kb * bs), np.float32)
    wv[:, :200] = w.T
    imp = activation_weighted(stats, 200, bs)(wv.reshape(64, kb, bs), 0, 64).astype(np.float64)
    imp *= (np.arange(kb * bs) < 200).reshape(kb, bs)

    def per_group(q):
        d = np.zeros((kb * bs, 64))
        d[:200] = w - q.dequantize()
        return np.einsum("ngi,ngi->ng", imp, (d.T.reshape(64, kb, bs)) ** 2)

    if not spec.float_zero_points:  # (rtn has integer zero points; the float-zp start is min/max exact)
        assert np.all(per_group(qw) <= per_group(base) * (1 + 1e-4) + 1e-12)


def test_imatrix_needs_statistics():
    imatrix, _ = get_algorithm("imatrix")
    with pytest.raises(ValueError, match="needs calibration"):
        imatrix(np.ones((64, 4), np.float32), QuantSpec(4, 32, True), None)
    _, w, stats = _problem()
    with pytest.raises(ValueError, match="span"):
        imatrix(w, QuantSpec(4, 32, True), stats, span=1.5)


def _head_problem(k=64, n=8192, rows=512, seed=5):
    """A vocabulary head whose inputs point at its own columns (``h = a W[:, t] + noise``), a few
    input channels carrying most of the columns' energy (as in a real LLM's head)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n))
    w[rng.choice(k, 4, replace=False)] *= 6.0
    w = (0.02 * w).astype(np.float32)
    tokens = rng.integers(0, n, rows)
    h = 40.0 * w[:, tokens].T + 0.1 * rng.standard_normal((rows, k))
    return h.astype(np.float32), w


@pytest.mark.parametrize("name", ["rtn-clip", "hqq"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_calibration_free_searches_weight_output_heads_by_vocabulary_energy(name, sym):
    """A vocabulary-shaped weight (N >= 8192, N >= 6 K) is searched with the channel energy of its
    own columns as input energy: the logit error on hidden states aligned with the columns beats
    rtn's and the magnitude-only search's (which ignores that some channels carry far more)."""
    h, head = _head_problem()
    spec = QuantSpec(4, 32, sym)
    fn, _ = get_algorithm(name)
    rtn, _ = get_algorithm("rtn")
    qw = fn(head, spec, None)
    assert any("output-head" in note for note in qw.notes)
    base = _out_err(h, head, rtn(head, spec))
    plain = _out_err(h, head, fn(head, spec, None, head_rule=False))
    assert _out_err(h, head, qw) < 0.97 * min(base, plain), (_out_err(h, head, qw), base, plain)
    body = np.random.default_rng(6).standard_normal((256, 1024)).astype(np.float32)  # N = 4 K: not a head
    assert not any("output-head" in note for note in fn(body, spec, None).notes)
