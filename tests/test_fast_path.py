"""The transform's parallel, chunked round-to-nearest writes exactly the bytes of the utility path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ort_wq import WeightOnlyConfig, make_matmul_weight_only_node, pad_tensor, quant_tensor, quantize

from .helpers import matmul_node
from .models import matmul_model


@pytest.mark.parametrize("bits, bs, sym", [(4, 32, True), (4, 128, False), (8, 64, False), (2, 16, True)])
def test_bit_identical_to_utilities(bits, bs, sym):
    k, n = 520, 4100  # > one chunk of columns, K not a multiple of the block
    model, w = matmul_model(k=k, n=n, seed=bits + bs)
    q = quantize(model, WeightOnlyConfig(bits=bits, block_size=bs, symmetric=sym, accuracy_level=0, threads=2))
    got = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    node = q.graph.node[0]

    kb = -(-k // bs)
    qw, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, "sym" if sym else "asym", "uint")
    ref_node, ref_inits = make_matmul_weight_only_node(matmul_node(), (k, n), bits, bs, kb, qw, scale, None if sym else zp)
    ref = {i.name: onnx.numpy_helper.to_array(i) for i in ref_inits}
    assert len(node.input) == len(ref_node.input)
    for mine, theirs in zip(node.input[1:], ref_node.input[1:]):
        assert got[mine].dtype == ref[theirs].dtype
        np.testing.assert_array_equal(got[mine], ref[theirs])
    assert {a.name: a.i for a in node.attribute if a.name != "accuracy_level"} == {
        a.name: a.i for a in ref_node.attribute if a.name != "accuracy_level"}


@pytest.mark.parametrize("bits, bs, sym", [(4, 32, False), (4, 128, True), (8, 64, False)])
def test_transposed_weights_are_quantized_in_their_own_layout(bits, bs, sym):
    """A Gather table / transB weight is read as stored ([N, K]), bit-identical to the reference path."""
    from ort_wq.algorithms.base import QuantSpec
    from ort_wq.algorithms.rtn import rtn_fast, rtn_reference

    n, k = 3000, 200  # several row chunks, K not a multiple of the block
    table = np.random.default_rng(bits + bs).standard_normal((n, k)).astype(np.float32)
    spec = QuantSpec(bits=bits, block_size=bs, symmetric=sym)
    fast = rtn_fast(table.T, spec)  # a transposed view: no copy is made
    ref = rtn_reference(np.ascontiguousarray(table.T), spec)
    np.testing.assert_array_equal(fast.q, ref.q)
    np.testing.assert_array_equal(fast.scale, ref.scale)
    if not sym:
        np.testing.assert_array_equal(fast.zero_point, ref.zero_point)
