"""The library's numbers against the independent oracle of ``tests/oracle.py``.

The oracle is first checked on cases small enough to verify by hand; then ``quant_tensor`` and
the written models (MatMulNBits, MatMulFpQ4, QDQ, GatherBlockQuantized) are held against it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import WeightOnlyConfig, quant_tensor, quantize

from .helpers import run_model
from .models import init, make_model, matmul_model, vi
from .oracle import (
    dequant_fpq4,
    dequant_gather_table,
    dequant_linear,
    dequant_nbits,
    dequantized_model,
    onnxruntime_groups,
    quantize_groups,
    unpack_lsb_first,
)

# -- the oracle on hand-checked cases ---------------------------------------------------------


def test_oracle_hand_cases():
    q, s, z = quantize_groups([0, 1, 2, 3], bits=2, group=4, scheme="asym", dtype="uint")
    assert q.tolist() == [[0, 1, 2, 3]] and s.item() == 1 and z.item() == 0
    # sym int 4-bit: scale 2/15; -1/s = -7.5 rounds (half to even) to -8, 1/s = 7.5 -> 8 clipped to 7
    q, s, z = quantize_groups([-1, 0, 0.5, 1], bits=4, group=4, scheme="sym", dtype="int")
    assert q.tolist() == [[-8, 0, 4, 7]] and s.item() == pytest.approx(2 / 15) and z.item() == 0
    q, s, z = quantize_groups([-1, 0, 0.5, 1], bits=4, group=4, scheme="sym", dtype="uint")
    assert q.tolist() == [[0, 8, 12, 15]] and z.item() == 8
    q, s, z = quantize_groups([2, 2, 2, 2], bits=4, group=4, scheme="asym", dtype="uint")  # zero range
    assert s.item() == 1 and z.item() == 0 and q.tolist() == [[2, 2, 2, 2]]
    q, s, z = quantize_groups([-3, 1, 2, 3, 0, 0, 0, 6], bits=2, group=4, scheme="asym", dtype="uint")
    assert s[:, 0].tolist() == [2, 2] and z[:, 0].tolist() == [2, 0] and q.tolist() == [[0, 2, 3, 3], [0, 0, 0, 3]]


def test_oracle_unpacking_hand_cases():
    assert unpack_lsb_first(np.array([0x21], np.uint8), 4, 2).tolist() == [1, 2]
    assert unpack_lsb_first(np.array([0b11100100], np.uint8), 2, 4).tolist() == [0, 1, 2, 3]
    # MatMulNBits K=3, N=1, 4-bit block 16: codes 1, 2, 3 with zero point 8 (default), scale 0.5
    b = np.zeros((1, 1, 8), np.uint8)
    b[0, 0, 0], b[0, 0, 1] = 0x21, 0x03
    w = dequant_nbits(b, np.array([0.5]), None, k=3, n=1, bits=4, block_size=16)
    assert w[:, 0].tolist() == [-3.5, -3.0, -2.5]
    zp = np.array([[0x31]], np.uint8)  # two blocks: zero points 1 and 3 (low nibble first)
    b2 = np.full((1, 2, 8), 0x44, np.uint8)
    w2 = dequant_nbits(b2, np.array([[1.0, 2.0]]), zp, k=32, n=1, bits=4, block_size=16)
    assert set(w2[:16, 0]) == {3.0} and set(w2[16:, 0]) == {2.0}
    # MatMulFpQ4 record (type 1): scale 2, zp 1, byte[l] = q[l] | q[l+16] << 4 with q[l]=3, q[l+16]=5
    rec = np.concatenate([np.frombuffer(np.float32(2).tobytes(), np.uint8), [1], np.full(16, 0x53, np.uint8)])
    w3 = dequant_fpq4(rec.astype(np.uint8), [20, 1], 1)
    assert w3[:16, 0].tolist() == [4.0] * 16 and w3[16:, 0].tolist() == [8.0] * 4
    # DequantizeLinear blocked along axis 0, block 2
    x = np.array([[1], [2], [3], [4]], np.int8)
    assert dequant_linear(x, np.array([[1.0], [10.0]]), np.array([[1], [2]], np.int8), 0, 2)[:, 0].tolist() == [0, 1, 10, 20]
    # GatherBlockQuantized table [2, 4] packed 4-bit along the last axis, blocks of 2, default zero point 8
    data = np.array([[0x98, 0xBA], [0x88, 0x88]], np.uint8)
    t = dequant_gather_table(data, np.array([[1.0, 2.0], [3.0, 3.0]]), None, bits=4, block_size=2, quantize_axis=1)
    assert t.tolist() == [[0, 1, 4, 6], [0, 0, 0, 0]]


# -- quant_tensor and the written models against the oracle ----------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme, dtype", [("sym", "int"), ("sym", "uint"), ("asym", "int"), ("asym", "uint")])
def test_quant_tensor_matches_oracle(bits, scheme, dtype):
    rng = np.random.default_rng(bits)
    data = rng.standard_normal((6, 64)).astype(np.float32) * rng.uniform(0.01, 10, (6, 1)).astype(np.float32)
    data[0, :32] = 0.25  # a constant group
    q, s, z = quant_tensor(data, bits, 32, scheme, dtype)
    oq, os_, oz = quantize_groups(data, bits, 32, scheme, dtype)
    np.testing.assert_allclose(s, os_, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z, np.float64), oz)
    np.testing.assert_array_equal(q, oq)


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _oracle_rtn(w, bits, bs, sym):
    """What rtn should store for ``W[K, N]``: onnxruntime's rule on the padded ``W.T``, dequantized (float64)."""
    k, n = w.shape
    kb = -(-k // bs)
    padded = np.zeros((kb * bs, n), dtype=np.float32)
    padded[:k] = w
    q, s, z = onnxruntime_groups(padded.T, bits, bs, sym)
    stored = s.astype(w.dtype).astype(np.float64)
    return ((q - z) * stored).reshape(n, -1)[:, :k].T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k, bs", [(1, 16), (40, 32), (128, 64), (96, -1)])
def test_written_nbits_weights_match_oracle(bits, sym, k, bs):
    model, w = matmul_model(k=k, n=24, seed=k)
    q = quantize(model, WeightOnlyConfig(bits=bits, block_size=bs, symmetric=sym, accuracy_level=0, min_k=1))
    (node,) = q.graph.node
    assert node.op_type == "MatMulNBits"
    a, inits = _attrs(node), _inits(q)
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    got = dequant_nbits(inits[node.input[1]], inits[node.input[2]], zp, a["K"], a["N"], a["bits"], a["block_size"])
    assert (a["K"], a["N"], a["bits"]) == (k, 24, bits)
    np.testing.assert_allclose(got, _oracle_rtn(w, bits, a["block_size"], sym), rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(run_model(q, {"x": x})[0], run_model(dequantized_model(q)[0], {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_written_fpq4_and_qdq_weights_match_oracle():
    model, w = matmul_model(k=72, n=16, seed=3)
    x = np.random.default_rng(2).standard_normal((3, 72)).astype(np.float32)
    for fmt, sym, bits in (("fpq4", False, 4), ("fpq4", True, 4), ("qdq", True, 4), ("qdq", False, 8)):
        q = quantize(model, WeightOnlyConfig(format=fmt, bits=bits, block_size=32, symmetric=sym, accuracy_level=0))
        deq, replaced = dequantized_model(q)
        assert replaced == (["MatMulFpQ4"] if fmt == "fpq4" else ["DequantizeLinear"])
        weights = [v for v in _inits(deq).values() if v.ndim == 2]
        want = _oracle_rtn(w, bits, 32, sym)
        assert any(v.shape == want.shape and np.allclose(v, want, rtol=1e-6, atol=1e-7) for v in weights), fmt
        if fmt == "qdq":
            np.testing.assert_allclose(run_model(q, {"x": x})[0], run_model(deq, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_written_gather_table_matches_oracle():
    rng = np.random.default_rng(5)
    table = rng.standard_normal((50, 40)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        [vi("ids", ["B", 3], TensorProto.INT64)], [vi("y", ["B", 3, 40])], [init("E", table)],
    )
    q = quantize(model, WeightOnlyConfig(bits=4, block_size=32, symmetric=False, min_k=1))
    deq, replaced = dequantized_model(q)
    if replaced != ["GatherBlockQuantized"]:
        pytest.skip("Gather tables are not quantized by this version")
    ids = np.array([[0, 49, 7], [3, 3, -1]], np.int64)
    got = run_model(q, {"ids": ids})[0]
    np.testing.assert_allclose(got, run_model(deq, {"ids": ids})[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, _oracle_rtn(table.T, 4, 32, False).T[ids], rtol=1e-5, atol=1e-6)

