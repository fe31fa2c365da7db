"""Embedding tables and tied heads: GatherBlockQuantized on onnxruntime's kernel, one stored copy per tensor.

Every quantized node is run on onnxruntime and compared with an independent numpy dequantization
of the initializers that were written (nibbles unpacked here, not with ort_wq.packing).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import NodeOverride, WeightOnlyConfig, quantize
from ort_wq.cli import main

from .helpers import run_model
from .models import init, make_model, vi

MS = [helper.make_opsetid("com.microsoft", 1)]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = _inits(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = node.attribute[0]
            out[node.output[0]] = (numpy_helper.to_array(attr.t) if attr.name == "value"
                                   else np.array(helper.get_attribute_value(attr)))
    return out


def _nibbles(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes of uint8 rows packed along the last axis (low bits first)."""
    packed = packed.astype(np.uint16)
    if bits == 8:
        return packed
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def _table(model: onnx.ModelProto, node: onnx.NodeProto, k: int) -> np.ndarray:
    """The float table ``[V, K]`` a GatherBlockQuantized node reads, from the model's constants."""
    c = _consts(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    data_name = node.input[0]
    if data_name in producers and producers[data_name].op_type == "Reshape":
        reshape = producers[data_name]
        data = c[reshape.input[0]].reshape(c[reshape.input[1]])
    else:
        data = c[data_name]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, bs = attrs["bits"], attrs["block_size"]
    assert attrs["gather_axis"] == 0 and attrs["quantize_axis"] == 1
    scales = c[node.input[2]].astype(np.float64)
    v, kb = scales.shape
    q = _nibbles(data, bits).reshape(v, kb, bs).astype(np.float64)
    zp = _nibbles(c[node.input[3]], bits)[:, :kb] if len(node.input) > 3 and node.input[3] else np.full((v, kb), 1 << (bits - 1))
    return ((q - zp[..., None]) * scales[..., None]).reshape(v, -1)[:, :k]


def _matmulnbits_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """``W[K, N]`` of a MatMulNBits node, dequantized independently."""
    c = _consts(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    b = c[node.input[1]]
    kb = b.shape[1]
    q = _nibbles(b, bits).reshape(n, kb, bs).astype(np.float64)
    scales = c[node.input[2]].reshape(n, kb).astype(np.float64)
    zp = _nibbles(c[node.input[3]], bits)[:, :kb] if len(node.input) > 3 and node.input[3] else np.full((n, kb), 1 << (bits - 1))
    return ((q - zp[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T


def _gather_model(v, k, dtype=np.float32, idx=TensorProto.INT64, seed=0):
    e = np.random.default_rng(seed).standard_normal((v, k)).astype(dtype)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    m = make_model([helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
                   [vi("ids", ["B", "S"], idx)], [vi("y", ["B", "S", k], elem)], [init("E", e)])
    return m, e


def _ops(model):
    return [n.op_type for n in model.graph.node if n.op_type not in ("Constant",)]


@pytest.mark.parametrize("k", [256, 100])
@pytest.mark.parametrize("idx", [TensorProto.INT32, TensorProto.INT64])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_kernel(bits, block, sym, dtype, idx, k):
    v = 40
    m, e = _gather_model(v, k, dtype, idx, seed=bits + block + k)
    q, report = quantize(m, WeightOnlyConfig(bits=bits, block_size=block, symmetric=sym), return_report=True)
    assert _ops(q) == ["GatherBlockQuantized"] + (["Slice"] if k % block else [])
    assert [c.new_op for c in report.converted] == ["GatherBlockQuantized"]
    assert "E" not in _inits(q)  # the float table is gone
    node = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    table = _table(q, node, k)
    ids = np.array([[0, 5, -1], [v - 1, -v, 7]], dtype=np.int32 if idx == TensorProto.INT32 else np.int64)
    (y,) = run_model(q, {"ids": ids})
    assert y.dtype == dtype and y.shape == (2, 3, k)
    expect = table[np.where(ids < 0, ids + v, ids)]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(y.astype(np.float64), expect.astype(dtype).astype(np.float64), **tol)
    # and the stored table is a faithful quantization of the original: within half a step per value
    c = _consts(q)
    scales = c[node.input[2]].astype(np.float64)
    step = np.repeat(scales, node_block(node), axis=1)[:, :k]
    # (float16: codes and zero points of up to 2^bits steps on a scale rounded to float16 afterwards
    # add up to ~2^(bits-11) steps each)
    slack = 1e-2 if dtype == np.float32 else 0.3
    # symmetric (onnxruntime's grid, scale = extreme / -2^(b-1), negative for a positive extreme):
    # values of the sign opposite to the extreme saturate at code 2^(b-1)-1, at most one step off
    bound = np.where(sym & (e.astype(np.float64) * step > 0), 1.0, 0.5) * np.abs(step)
    assert np.all(np.abs(table - e.astype(np.float64)) <= bound * (1 + slack) + 1e-6)


def node_block(node):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_qdq_gather_is_blocked_dequantize_linear_on_rows(bits, sym):
    v, k = 30, 96
    m, e = _gather_model(v, k)
    q = quantize(m, WeightOnlyConfig(bits=bits, symmetric=sym, format="qdq"))
    assert _ops(q) == ["DequantizeLinear", "Gather"]
    dq = q.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs["axis"] == 1 and attrs["block_size"] == 32
    c = _inits(q)
    codes = c[dq.input[0]].astype(np.float64)
    assert codes.shape == (v, k)
    scale = np.repeat(c[dq.input[1]].astype(np.float64), 32, axis=1)[:, :k]
    zp = np.repeat(c[dq.input[2]].astype(np.float64), 32, axis=1)[:, :k] if len(dq.input) > 2 else 0.0
    table = (codes - zp) * scale
    ids = np.array([3, -2, 0], np.int64)
    (y,) = run_model(q, {"ids": ids[None]})
    np.testing.assert_allclose(y[0], table[ids], rtol=1e-6, atol=1e-6)
    # within half a step (symmetric: a full step where a value of the extreme's opposite sign saturates)
    bound = np.where(sym & (e * scale > 0), 1.0, 0.5) * np.abs(scale)
    assert np.all(np.abs(table - e) <= bound * 1.02)


def _tied(layout: str, v=256, k=96, seed=0):
    """A tied embedding + head: the genai builder's ``W[K, V]`` or torch's ``E[V, K]``."""
    rng = np.random.default_rng(seed)
    if layout == "genai":
        w = rng.standard_normal((k, v)).astype(np.float32)
        nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="embed/Transpose"),
                 helper.make_node("Gather", ["Wt", "ids"], ["h"], name="embed"),
                 helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")]
        table = w.T
    else:
        w = rng.standard_normal((v, k)).astype(np.float32)
        nodes = [helper.make_node("Gather", ["W", "ids"], ["h"], name="embed"),
                 helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="head/Transpose"),
                 helper.make_node("MatMul", ["h", "Wt"], ["logits"], name="lm_head")]
        table = w
    m = make_model(nodes, [vi("ids", ["B", "S"], TensorProto.INT64)], [vi("logits", ["B", "S", v])], [init("W", w)])
    return m, table


@pytest.mark.parametrize("layout", ["genai", "torch"])
@pytest.mark.parametrize("sym", [True, False])
def test_tied_table_is_stored_once_and_read_by_both(layout, sym, tmp_path):
    m, table = _tied(layout)
    v, k = table.shape
    src = tmp_path / "m.onnx"
    onnx.save(m, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out = tmp_path / "q.onnx"
    _, report = quantize(str(src), WeightOnlyConfig(symmetric=sym, accuracy_level=0), output=out, return_report=True)
    q = onnx.load(out)
    mm = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    producers = {o: n for n in q.graph.node for o in n.output}
    assert producers[gbq.input[0]].op_type == "Reshape" and producers[gbq.input[0]].input[0] == mm.input[1]
    assert gbq.input[2] == mm.input[2] and gbq.input[3:] == mm.input[3:]  # same scales and zero points
    assert "W" not in _inits(q)
    assert [t.name for t in report.tensors] == ["W"] and len(report.tensors[0].consumers) == 2
    assert not report.tensors[0].float_kept
    w_deq = _matmulnbits_weight(q, mm)
    np.testing.assert_array_equal(_table(q, gbq, k), w_deq.T)
    ids = np.array([[1, 17, v - 1]], np.int64)
    (logits,) = run_model(q, {"ids": ids})
    np.testing.assert_allclose(logits, w_deq.T[ids] @ w_deq, rtol=2e-4, atol=2e-4)
    # on disk: the packed codes once, the float table not at all
    m_small = onnx.load(src)  # external data loaded
    raw = b"".join(f.read_bytes() for f in (tmp_path / "q.onnx", tmp_path / "q.onnx.data"))
    codes = _inits(onnx.load(out))[mm.input[1]].tobytes()
    assert raw.count(codes[:4096]) == 1
    assert numpy_helper.to_array(m_small.graph.initializer[0]).tobytes()[:4096] not in raw
    assert report.weight_bytes_after == sum(len(_inits(q)[n].tobytes()) for n in mm.input[1:] if n)
    # inspect's plan for the float model is what was written
    from ort_wq.inspect import planned_sizes
    from ort_wq.model_io import load_model

    assert planned_sizes(load_model(src), WeightOnlyConfig(symmetric=sym)) == (
        report.weight_bytes_before, report.weight_bytes_after)


def test_override_naming_the_head_applies_to_the_embedding_too():
    m, table = _tied("genai")
    cfg = WeightOnlyConfig(overrides=[NodeOverride.parse("lm_head=bits:8,block:64")], accuracy_level=0)
    q, report = quantize(m, cfg, return_report=True)
    for node in q.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"]) == (8, 64), node.op_type
    assert (report.tensors[0].bits, report.tensors[0].block_size) == (8, 64)
    assert {c.bits for c in report.converted} == {8}


def test_two_bit_tables_are_stored_at_four_bits_and_say_why():
    m, table = _tied("genai")
    q, report = quantize(m, WeightOnlyConfig(bits=2, accuracy_level=0), return_report=True)
    assert report.tensors[0].bits == 4
    assert any("GatherBlockQuantized reads 4 or 8 bits" in n for n in report.tensors[0].notes)
    assert "GatherBlockQuantized reads 4 or 8 bits" in report.to_text()
    (logits,) = run_model(q, {"ids": np.array([[3]], np.int64)})
    assert np.isfinite(logits).all()


def test_fpq4_head_and_gather_store_two_copies_and_say_why():
    m, table = _tied("torch")
    q, report = quantize(m, WeightOnlyConfig(format="fpq4", symmetric=True), return_report=True)
    assert sorted(_ops(q)) == ["GatherBlockQuantized", "MatMulFpQ4", "Transpose"] or \
        sorted(_ops(q)) == ["GatherBlockQuantized", "MatMulFpQ4"]
    assert any("stored twice" in n for n in report.tensors[0].notes)
    assert "W" not in _inits(q)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fused_matmul_is_converted(trans_b):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48) if not trans_b else (48, 64)).astype(np.float32)
    m = make_model([helper.make_node("FusedMatMul", ["x", "W"], ["y"], domain="com.microsoft", transB=trans_b, name="fm")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 48])], [init("W", w)], extra_opsets=MS)
    q, report = quantize(m, WeightOnlyConfig(accuracy_level=0), return_report=True)
    assert _ops(q) == ["MatMulNBits"] and report.converted[0].op_type == "FusedMatMul"
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ _matmulnbits_weight(q, q.graph.node[0]), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("attrs, reason", [({"alpha": 2.0}, "alpha=2.0"), ({"transA": 1}, "transA=1")])
def test_fused_matmul_with_other_attributes_is_reported(attrs, reason):
    w = np.ones((64, 48), np.float32)
    m = make_model([helper.make_node("FusedMatMul", ["x", "W"], ["y"], domain="com.microsoft", name="fm", **attrs)],
                   [vi("x", ["M", 64] if not attrs.get("transA") else [64, "M"])], [vi("y", ["M", 48])], [init("W", w)],
                   extra_opsets=MS)
    q, report = quantize(m, WeightOnlyConfig(), return_report=True)
    assert _ops(q) == ["FusedMatMul"] and not report.converted
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason


def test_op_types_select_consumers_and_unknown_names_are_refused(capsys, tmp_path):
    m, _ = _tied("genai")
    only_gather = quantize(m, WeightOnlyConfig(op_types=("Gather",)))
    assert sorted(_ops(only_gather)) == ["GatherBlockQuantized", "MatMul"]  # the Transpose went with the Gather
    assert "W" in _inits(only_gather)  # the head still reads the float table
    only_mm, report = quantize(m, WeightOnlyConfig(op_types="MatMul"), return_report=True)
    assert sorted(_ops(only_mm)) == ["Gather", "MatMulNBits", "Transpose"]
    assert report.tensors[0].float_kept.startswith("still read by Transpose")
    assert report.weight_bytes_after > report.tensors[0].bytes_before  # the float table still counts
    from ort_wq.inspect import planned_sizes
    import onnx_ir as ir

    assert planned_sizes(ir.serde.deserialize_model(m), WeightOnlyConfig(op_types="MatMul")) == (
        report.weight_bytes_before, report.weight_bytes_after)
    with pytest.raises(ValueError, match="'Matmul' not known; use one or more of MatMul, Gemm, FusedMatMul, Gather"):
        WeightOnlyConfig(op_types=("Matmul",))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert main(["quantize", str(src), str(tmp_path / "q.onnx"), "--op-types", "Gathr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Gathr' not known" in err[0]
    assert not (tmp_path / "q.onnx").exists()


def test_quantizing_twice_changes_nothing_and_names_stay():
    m, _ = _tied("torch")
    q1 = quantize(m, WeightOnlyConfig())
    q2, report = quantize(q1, WeightOnlyConfig(), return_report=True)
    assert not report.converted and not report.tensors
    assert [n.op_type for n in q2.graph.node] == [n.op_type for n in q1.graph.node]
    assert sorted(t.name for t in q2.graph.initializer) == sorted(t.name for t in q1.graph.initializer)
    assert [i.name for i in q2.graph.input] == [i.name for i in m.graph.input] == ["ids"]
    assert [o.name for o in q2.graph.output] == [o.name for o in m.graph.output] == ["logits"]


def test_constant_node_table():
    e = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["E"], value=numpy_helper.from_array(e)),
             helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")]
    m = make_model(nodes, [vi("ids", ["S"], TensorProto.INT32)], [vi("y", ["S", 64])], [])
    q = quantize(m, WeightOnlyConfig())
    assert _ops(q) == ["GatherBlockQuantized"]
    ids = np.array([0, 19, -20], np.int32)
    (y,) = run_model(q, {"ids": ids})
    np.testing.assert_allclose(y, _table(q, q.graph.node[-1], 64)[ids], rtol=1e-6, atol=1e-6)


def test_gather_in_a_subgraph_and_a_shape_gather_left_alone():
    e = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["h"], name="sub_embed")], "then", [],
                               [vi("h", ["S", 64])])
    other = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["h2"], name="else_embed")], "else", [],
                              [vi("h2", ["S", 64])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other, name="if"),
             helper.make_node("Shape", ["y"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["dim"], name="shape_gather")]
    m = make_model(nodes, [vi("c", [], TensorProto.BOOL), vi("ids", ["S"], TensorProto.INT64)],
                   [vi("y", ["S", 64]), vi("dim", [], TensorProto.INT64)],
                   [init("E", e), init("zero", np.array(0, np.int64))])
    q, report = quantize(m, WeightOnlyConfig(), return_report=True)
    assert sorted(c.node for c in report.converted) == ["else_embed", "sub_embed"]
    assert not report.skipped  # the Gather of a shape is not a weight consumer
    ids = np.array([1, -3], np.int64)
    y, dim = run_model(q, {"c": np.array(True), "ids": ids})
    assert dim == 2 and np.abs(y - e[ids]).max() < 0.2


def test_reference_op_matches_the_kernel_and_catches_bad_scales():
    from ort_wq import ops, validate

    m, table = _tied("torch", v=64, k=100)
    q = quantize(m, WeightOnlyConfig(accuracy_level=0))
    ids = {"ids": np.array([[2, -5, 63]], np.int64)}
    (builtin,) = run_model(q, ids)
    sess = ops.reference_session(q)
    (ref,) = ops.run(sess, None, ids)
    np.testing.assert_allclose(ref, builtin, rtol=1e-5, atol=1e-5)
    assert any("GatherBlockQuantized" in k for k in ops.stats()["calls"])
    assert validate(m, q, inputs=ids, reference=True).passed()
    node = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    scales = next(t for t in q.graph.initializer if t.name == node.input[2])
    with pytest.raises(ValueError, match="scales have shape"):
        ops.evaluate("GatherBlockQuantized", [np.zeros((64, 64), np.uint8), ids["ids"],
                                              numpy_helper.to_array(scales)[:, :2]], {"bits": 4, "block_size": 32})


def test_inspect_and_quantize_agree_on_every_node():
    """One target finder: a node inspect calls quantizable is converted, every other one is not."""
    from ort_wq.inspect import inspect_rows
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W1"], ["a"], name="mm"),
        helper.make_node("Gemm", ["a", "W2"], ["b"], name="gemm_alpha2", alpha=2.0),
        helper.make_node("Gemm", ["b", "W3"], ["c"], name="gemm_1xN"),
        helper.make_node("Gemm", ["c", "W4"], ["d"], name="gemm_transB", transB=1),
        helper.make_node("FusedMatMul", ["d", "W5"], ["e"], name="fused", domain="com.microsoft"),
        helper.make_node("MatMul", ["e", "Wsmall"], ["f"], name="too_small"),
        helper.make_node("Transpose", ["f"], ["f_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "f_t"], ["g"], name="activation_matmul"),
    ]
    inits = [init("E", w(50, 64)), init("W1", w(64, 64)), init("W2", w(64, 64)), init("W3", w(1, 64)),
             init("W4", w(64, 64)), init("W5", w(64, 8)), init("Wsmall", w(8, 8))]
    m = make_model(nodes, [vi("ids", ["S"], TensorProto.INT64)], [vi("g", ["S", "S"])], inits, extra_opsets=MS)
    rows = {r["node"]: r["status"] for r in inspect_rows(ir.serde.deserialize_model(m))}
    _, report = quantize(m, WeightOnlyConfig(), return_report=True)
    converted = {c.node for c in report.converted}
    assert converted == {n for n, s in rows.items() if s.startswith("quantizable")}
    assert converted == {"embed", "mm", "gemm_transB", "fused"}
    skipped = {s.node: s.reason for s in report.skipped}
    for name in ("gemm_alpha2", "gemm_1xN", "too_small", "activation_matmul"):
        assert rows[name] == f"not quantizable: {skipped[name]}", name
