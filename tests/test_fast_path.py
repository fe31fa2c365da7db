"""The transform's parallel, chunked round-to-nearest writes exactly the bytes of the plain paths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ort_wq import WeightOnlyConfig, make_matmul_weight_only_node, pad_tensor, quant_tensor, quantize
from ort_wq.algorithms.base import QuantSpec
from ort_wq.algorithms.rtn import rtn_fast, rtn_reference

from .helpers import matmul_node
from .models import matmul_model


@pytest.mark.parametrize("bits, bs", [(4, 32), (8, 64), (2, 16)])
def test_inc_grid_bit_identical_to_utilities(bits, bs):
    k, n = 520, 4100  # > one chunk of columns, K not a multiple of the block
    model, w = matmul_model(k=k, n=n, seed=bits + bs)
    cfg = WeightOnlyConfig(bits=bits, block_size=bs, symmetric=True, sym_grid="inc", accuracy_level=0, threads=2)
    q = quantize(model, cfg)
    got = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    node = q.graph.node[0]

    kb = -(-k // bs)
    qw, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, "sym", "uint")
    ref_node, ref_inits = make_matmul_weight_only_node(matmul_node(), (k, n), bits, bs, kb, qw, scale, None)
    ref = {i.name: onnx.numpy_helper.to_array(i) for i in ref_inits}
    assert len(node.input) == len(ref_node.input)
    for mine, theirs in zip(node.input[1:], ref_node.input[1:]):
        assert got[mine].dtype == ref[theirs].dtype
        np.testing.assert_array_equal(got[mine], ref[theirs])
    assert {a.name: a.i for a in node.attribute if a.name != "accuracy_level"} == {
        a.name: a.i for a in ref_node.attribute if a.name != "accuracy_level"}


@pytest.mark.parametrize("grid", ["mlas", "inc"])
@pytest.mark.parametrize("bits, bs, sym", [(4, 32, True), (4, 128, False), (8, 64, False), (2, 16, True), (8, 32, True)])
def test_fast_equals_reference(bits, bs, sym, grid):
    rng = np.random.default_rng(bits * bs)
    w = (rng.standard_normal((520, 4100)) * rng.uniform(0.01, 2.0, 4100)).astype(np.float32)
    w[:40, 7] = np.abs(w[:40, 7]) + 3.0  # a block whose range excludes 0
    w[:, 9] = 0.0
    spec = QuantSpec(bits=bits, block_size=bs, symmetric=sym, sym_grid=grid)
    a, b = rtn_fast(w, spec), rtn_reference(w, spec)
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale.view(np.uint32), b.scale.view(np.uint32))
    if sym:
        assert a.zero_point is None and b.zero_point is None
    else:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("grid", ["mlas", "inc"])
@pytest.mark.parametrize("bits, bs, sym", [(4, 32, False), (4, 128, True), (8, 64, False), (4, 32, True)])
def test_transposed_weights_are_quantized_in_their_own_layout(bits, bs, sym, grid):
    """A Gather table / transB weight is read as stored ([N, K]), bit-identical to the reference path."""
    n, k = 3000, 200  # several row chunks, K not a multiple of the block
    table = np.random.default_rng(bits + bs).standard_normal((n, k)).astype(np.float32)
    spec = QuantSpec(bits=bits, block_size=bs, symmetric=sym, sym_grid=grid)
    fast = rtn_fast(table.T, spec)  # a transposed view: no copy is made
    ref = rtn_reference(np.ascontiguousarray(table.T), spec)
    np.testing.assert_array_equal(fast.q, ref.q)
    np.testing.assert_array_equal(fast.scale, ref.scale)
    if not sym:
        np.testing.assert_array_equal(fast.zero_point, ref.zero_point)
