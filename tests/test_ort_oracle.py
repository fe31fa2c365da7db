"""The MLAS-grid round-to-nearest against onnxruntime's own C++ quantizer, bit for bit.

``onnxruntime.capi._pybind_state.quantize_matmul_{2,4,8}bits`` is the quantizer behind
onnxruntime's ``MatMulNBitsQuantizer`` (default algorithm). It fills ``packed [N, kb, blob]``,
``scales [N, kb]`` and packed ``zero_points [N, ceil(kb * bits / 8)]`` from ``W [K, N]``. The
transform's output (codes, scales, zero points of the MatMulNBits node) must be the same.

Two places hold no information and are compared as such: the padded tail of a ragged last
block (the kernel ignores it; we write zeros, the C++ quantizer leaves whatever codes its packing
loop held) and the padding of the last zero-point byte.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.algorithms.base import QuantSpec
from ort_wq.algorithms.rtn import rtn_fast, rtn_reference
from ort_wq.packing import pack_nbits_weight, unpack_nbits_weight, unpack_nbits_zero_points

from .models import matmul_model

pybind = pytest.importorskip("onnxruntime.capi._pybind_state")


def ort_quantize(w: np.ndarray, bits: int, bs: int, sym: bool):
    k, n = w.shape
    kb = -(-k // bs)
    per_byte = 8 // bits
    packed = np.zeros((n, kb, bs * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=w.dtype)
    zp = np.zeros((n, -(-kb // per_byte)), dtype=np.uint8)
    fn = {2: pybind.quantize_matmul_2bits, 4: pybind.quantize_matmul_4bits, 8: pybind.quantize_matmul_8bits}[bits]
    fn(packed, np.ascontiguousarray(w), scales, zp, bs, n, k, sym)
    return packed, scales, unpack_nbits_zero_points(zp, bits, kb)


def assert_same_codes(q: np.ndarray, packed: np.ndarray, bits: int, k: int) -> None:
    """Our codes ``[N, kb, bs]`` against packed bytes: equal on the K real positions, zero after."""
    n, kb, bs = q.shape
    theirs = unpack_nbits_weight(packed, bits, bs).reshape(n, -1)
    ours = q.reshape(n, -1)
    np.testing.assert_array_equal(ours[:, :k], theirs[:, :k])
    assert not ours[:, k:].any()
    if k == kb * bs:
        np.testing.assert_array_equal(pack_nbits_weight(q, bits), packed)


def weights(k: int, n: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:, 0] = np.abs(w[:, 0])  # all positive: the asymmetric range must reach down to 0
    w[:, 1] = -np.abs(w[:, 1]) - 1.0  # all negative, away from 0
    w[:, 2] = 0.0  # all zero (scale -0.0 / 0.0)
    w[: k // 2, 3] = 0.25  # equal values (a tie between min and max)
    w[k // 2 :, 3] = -0.25
    w[5, 4] = 3.0  # one positive outlier: negative symmetric scale
    # exact halves: values that land on rounding ties of the symmetric grid
    w[:16, 5] = np.float32(-0.8) * np.arange(16, dtype=np.float32) / 16
    return w.astype(dtype)


SHAPES = [(64, 16), (96, 24), (200, 40), (576, 33), (130, 7)]  # ragged K: 200 / 32, 576 / 128, 130 / 16


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bs", [16, 32, 128])
def test_rtn_equals_onnxruntime_quantizer(bits, sym, bs):
    for i, (k, n) in enumerate(SHAPES):
        w = weights(k, n, seed=bits * 100 + bs + i)
        packed, scales, zp = ort_quantize(w, bits, bs, sym)
        spec = QuantSpec(bits=bits, block_size=bs, symmetric=sym)
        for qw in (rtn_fast(w, spec), rtn_reference(w, spec)):
            assert_same_codes(qw.q, packed, bits, k)
            assert qw.scale.dtype == scales.dtype
            np.testing.assert_array_equal(qw.scale.view(np.uint32), scales.view(np.uint32))  # bits: -0.0 too
            np.testing.assert_array_equal(qw.zero_point_array(), zp if not sym else np.full(zp.shape, 1 << (bits - 1)))


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_equals_onnxruntime_quantizer_float16(sym):
    w = weights(200, 24, seed=3, dtype=np.float16)
    packed, scales, zp = ort_quantize(w, 4, 32, sym)
    qw = rtn_fast(w, QuantSpec(bits=4, block_size=32, symmetric=sym))
    assert_same_codes(qw.q, packed, 4, 200)
    np.testing.assert_array_equal(qw.scale.view(np.uint16), scales.view(np.uint16))
    if not sym:
        np.testing.assert_array_equal(qw.zero_point, zp)


@pytest.mark.parametrize("sym", [True, False])
def test_transform_writes_onnxruntime_quantizer_bytes(sym):
    """The whole transform (chunked, threaded) writes the C++ quantizer's initializers."""
    k, n = 520, 300
    model, w = matmul_model(k=k, n=n, seed=11)
    q = quantize(model, WeightOnlyConfig(bits=4, block_size=32, symmetric=sym, accuracy_level=0, threads=2))
    node = q.graph.node[0]
    got = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    packed, scales, zp = ort_quantize(w, 4, 32, sym)
    assert_same_codes(unpack_nbits_weight(got[node.input[1]], 4, 32).reshape(n, -1, 32), packed, 4, k)
    np.testing.assert_array_equal(got[node.input[2]].reshape(scales.shape), scales)
    if sym:
        assert len(node.input) == 3
    else:
        np.testing.assert_array_equal(unpack_nbits_zero_points(got[node.input[3]], 4, scales.shape[1]), zp)
