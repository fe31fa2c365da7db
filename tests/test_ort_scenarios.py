"""onnxruntime's own weight-quantization test scenarios, run on ort-wq's output at their tolerances.

Ported from onnxruntime's ``test/python/quantization``: ``test_op_matmul_4bits.py`` (int4
symmetric and offset MatMul, QOperator and QDQ; int4 Gather), ``test_op_matmul_2bits.py`` (int2)
and ``test_op_matmulfpq4.py`` (MatMulFpQ4). Their weights are integers on the quantization grid
(symmetric: a cycle over ``[-2^(b-1), 2^(b-1)-1]`` skipping some values; offsets: ``0..2^b-1``),
inputs ``randint(-1, 2)``, and the quantized model must match the float model's outputs within
``rtol`` / ``atol`` (``assert_allclose``). Where their values are exact on onnxruntime's grid, the
utilities' symmetric grid (``sym_grid="inc"``) is not, and fails the same tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from ort_wq import WeightOnlyConfig, quantize

from .helpers import run_model
from .models import init, make_model, vi


def fill_data(shape, bits: int, symmetric: bool) -> np.ndarray:
    """The scenarios' weights (``fill_int4_data`` / ``fill_int2_data``), vectorised."""
    if symmetric:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
        skip = {0, -3, 3} if bits == 4 else {0}
        start = -2
        cycle = [v for v in range(start, hi) if v not in skip] + [v for v in range(lo, start) if v not in skip]
    else:
        cycle = list(range(2**bits))
    size = int(np.prod(shape))
    return np.resize(np.asarray(cycle, dtype=np.float64), size).reshape(shape)


def matmul_model(bits: int, symmetric: bool, k: int = 52, n: int = 288):
    w = fill_data((k, n), bits, symmetric).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["input", "W"], ["output"], name="MatMul_0")],
                       [vi("input", [-1, k])], [vi("output", [-1, n])], [init("W", w)])
    return model, w


def inputs(shape, low=-1, high=2, dtype=np.float32) -> np.ndarray:
    np.random.seed(13)
    return np.random.randint(low, high, shape).astype(dtype)


def _expected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_int4(symmetric, fmt):
    model, w = matmul_model(4, symmetric)
    q = quantize(model, WeightOnlyConfig(bits=4, block_size=32, symmetric=symmetric, format=fmt, accuracy_level=0))
    ops = [n.op_type for n in q.graph.node]
    assert ops == (["MatMulNBits"] if fmt == "nbits" else ["DequantizeLinear", "MatMul"])
    x = inputs((100, 52))
    (y,) = run_model(q, {"input": x})
    np.testing.assert_allclose(y, _expected(x, w), rtol=0.01, atol=0.05)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_int2(symmetric):
    model, w = matmul_model(2, symmetric)
    q = quantize(model, WeightOnlyConfig(bits=2, block_size=32, symmetric=symmetric, accuracy_level=0))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"]
    x = inputs((100, 52))
    (y,) = run_model(q, {"input": x})
    np.testing.assert_allclose(y, _expected(x, w), rtol=0.02, atol=0.1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_fpq4(symmetric):
    model, w = matmul_model(4, symmetric)
    q = quantize(model, WeightOnlyConfig(bits=4, block_size=32, symmetric=symmetric, format="fpq4"))
    assert [n.op_type for n in q.graph.node] == ["MatMulFpQ4"]
    x = inputs((100, 52))
    try:
        (y,) = run_model(q, {"input": x})
    except Exception as exc:  # as onnxruntime's own test: the kernel exists only on some CPUs
        if "not yet supported on this hardware platform" in str(exc):
            pytest.skip("MatMulFpQ4 has no kernel on this CPU")
        raise
    np.testing.assert_allclose(y, _expected(x, w), rtol=0.01, atol=0.05)


@pytest.mark.parametrize("symmetric, tdata, tind", [(True, np.float32, TensorProto.INT32),
                                                    (False, np.float16, TensorProto.INT64)])
def test_gather_int4(symmetric, tdata, tind):
    v, e = 545, 228
    table = fill_data((v, e), 4, symmetric).astype(tdata)
    elem = TensorProto.FLOAT if tdata == np.float32 else TensorProto.FLOAT16
    model = make_model([helper.make_node("Gather", ["W", "input"], ["output"], axis=0, name="Gather_0")],
                       [vi("input", [-1, 1000], tind)], [vi("output", [-1, 1000, e], elem)], [init("W", table)])
    q = quantize(model, WeightOnlyConfig(bits=4, block_size=32, symmetric=symmetric))
    assert "GatherBlockQuantized" in [n.op_type for n in q.graph.node]
    ids = inputs((100, 1000), -545, 535, np.int32 if tind == TensorProto.INT32 else np.int64)
    (y,) = run_model(q, {"input": ids})
    np.testing.assert_allclose(y.astype(np.float64), table[ids].astype(np.float64), rtol=0.2, atol=0.5)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_utilities_symmetric_grid_fails_these_tolerances(bits):
    """Why the default changed: ``2 max|w| / (2^b - 1)`` puts no integer weight on the grid."""
    model, w = matmul_model(bits, True)
    q = quantize(model, WeightOnlyConfig(bits=bits, block_size=32, symmetric=True, sym_grid="inc", accuracy_level=0))
    x = inputs((100, 52))
    (y,) = run_model(q, {"input": x})
    tol = dict(rtol=0.01, atol=0.05) if bits == 4 else dict(rtol=0.02, atol=0.1)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y, _expected(x, w), **tol)
