"""The weight-only transform on hand-built models: every pattern runs in onnxruntime and gives
what an independent numpy dequantize + matmul gives; node kinds, sharing and skip reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import ort_wq
from ort_wq import WeightOnlyConfig, quantize
from ort_wq.transforms import WeightOnlyQuantPass, rules

from .helpers import run_model
from .models import deq, init, make_model, matmul_model, vi

EXACT = dict(rtol=2e-4, atol=2e-4)


def cfg(**kw):
    kw.setdefault("accuracy_level", 0)
    kw.setdefault("symmetric", True)
    return WeightOnlyConfig(**kw)


def ops(model):
    return [n.op_type for n in model.graph.node]


def x_for(k, m=5, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(dtype)


@pytest.mark.parametrize("fmt", ["nbits", "fpq4", "qdq"])
@pytest.mark.parametrize("sym", [True, False])
def test_matmul_each_format(fmt, sym):
    model, w = matmul_model(k=100, n=40)  # K not a multiple of the block: padded tail
    q, report = quantize(model, cfg(format=fmt, symmetric=sym), return_report=True)
    expected_ops = {"nbits": ["MatMulNBits"], "fpq4": ["MatMulFpQ4"], "qdq": ["DequantizeLinear", "MatMul"]}[fmt]
    assert ops(q) == expected_ops
    assert [c.node for c in report.converted] == ["mm"] and not report.skipped
    x = x_for(100)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w, 4, 32, sym), **EXACT)
    assert {i.name for i in q.graph.initializer}.isdisjoint({"W"})  # the fp32 weight is gone


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bs", [16, 64, 128, -1])
def test_matmulnbits_bits_and_blocks(bits, bs):
    model, w = matmul_model(k=96, n=24, seed=bits)
    q = quantize(model, cfg(bits=bits, block_size=bs, symmetric=False))
    node = q.graph.node[0]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == (128 if bs == -1 else bs)
    x = x_for(96)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w, bits, bs, False), **EXACT)


def test_nd_weight_with_leading_ones():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 64, 32)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                   [vi("x", [2, "M", 64])], [vi("y", [2, "M", 32])], [init("W", w)])
    q = quantize(m, cfg())
    assert ops(q) == ["MatMulNBits"]
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w[0]), **EXACT)


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_becomes_one_node(bias_first):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    add_in = ["b", "h"] if bias_first else ["h", "b"]
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", add_in, ["y"], name="add")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 32])], [init("W", w), init("b", b)])
    q = quantize(m, cfg())
    assert ops(q) == ["MatMulNBits"]
    assert len(q.graph.node[0].input) == 6 and q.graph.node[0].input[5] == "b"
    x = x_for(64)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w) + b, **EXACT)


def test_matmul_add_kept_when_matmul_output_is_also_used():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 32]), vi("h", ["M", 32])], [init("W", w), init("b", b)])
    q = quantize(m, cfg())
    assert ops(q) == ["MatMulNBits", "Add"]
    x = x_for(64)
    y, h = run_model(q, {"x": x})
    np.testing.assert_allclose(h, x @ deq(w), **EXACT)
    np.testing.assert_allclose(y, x @ deq(w) + b, **EXACT)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", ["none", "vec", "row", "full"])
def test_gemm(trans_b, c_kind):
    rng = np.random.default_rng(trans_b)
    k, n, m_rows = 64, 48, 4
    w = rng.standard_normal((k, n)).astype(np.float32)
    b_arr = w.T.copy() if trans_b else w
    inits = [init("B", b_arr)]
    inputs = [vi("a", [m_rows, k])]
    c = {"vec": rng.standard_normal(n), "row": rng.standard_normal((1, n)), "full": rng.standard_normal((m_rows, n))}
    gemm_in = ["a", "B"]
    feeds = {"a": x_for(k, m_rows)}
    if c_kind in ("vec", "row"):
        inits.append(init("C", c[c_kind].astype(np.float32)))
        gemm_in.append("C")
    elif c_kind == "full":
        inputs.append(vi("C", [m_rows, n]))
        gemm_in.append("C")
        feeds["C"] = c["full"].astype(np.float32)
    m = make_model([helper.make_node("Gemm", gemm_in, ["y"], name="gemm", transB=trans_b)], inputs, [vi("y", [m_rows, n])], inits)
    q, report = quantize(m, cfg(), return_report=True)
    assert report.converted and report.converted[0].op_type == "Gemm"
    assert "Gemm" not in ops(q) and "MatMulNBits" in ops(q)
    (y,) = run_model(q, feeds)
    expected = feeds["a"] @ deq(w)
    if c_kind != "none":
        expected = expected + (c[c_kind] if c_kind != "full" else feeds["C"])
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=5e-4)
    if c_kind in ("none", "vec", "row"):
        assert ops(q) == ["MatMulNBits"] or ops(q)[-1] == "MatMulNBits"


@pytest.mark.parametrize("attrs, reason", [(dict(alpha=2.0), "alpha"), (dict(transA=1), "transA"), (dict(beta=0.5), "beta")])
def test_gemm_unsupported_attributes_are_reported(attrs, reason):
    rng = np.random.default_rng(0)
    a_shape = [64, 4] if attrs.get("transA") else [4, 64]
    m = make_model([helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="g", **attrs)], [vi("a", a_shape)], [vi("y", [4, 32])],
                   [init("B", rng.standard_normal((64, 32)).astype(np.float32)), init("C", np.zeros(32, np.float32))])
    q, report = quantize(m, cfg(), return_report=True)
    assert ops(q) == ["Gemm"] and not report.converted
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason


def test_transpose_fed_weight_tied_head():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((80, 64)).astype(np.float32)  # [vocab, hidden], also used by Gather
    m = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
         helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tr"),
         helper.make_node("MatMul", ["h", "Et"], ["y"], name="head")],
        [vi("ids", ["S"], TensorProto.INT64)], [vi("y", ["S", 80])], [init("E", emb)])
    q = quantize(m, cfg(op_types=("MatMul",)))  # the head alone; tables: tests/test_embeddings.py
    assert ops(q) == ["Gather", "MatMulNBits"]
    ids = np.array([1, 5, 79], np.int64)
    (y,) = run_model(q, {"ids": ids})
    np.testing.assert_allclose(y, emb[ids] @ deq(np.ascontiguousarray(emb.T)), **EXACT)


def test_shared_weight_quantized_once():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 64])], [init("W", w)])
    q, report = quantize(m, cfg(), return_report=True)
    assert ops(q) == ["MatMulNBits", "MatMulNBits"]
    assert q.graph.node[0].input[1:] == q.graph.node[1].input[1:]
    assert len(q.graph.initializer) == 2
    assert report.weight_bytes_before == w.nbytes
    x = x_for(64)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w) @ deq(w), rtol=1e-3, atol=1e-3)


def test_constant_node_weight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    m = make_model([helper.make_node("Constant", [], ["W"], value=init("Wc", w)), helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 16])], [])
    q = quantize(m, cfg())
    assert ops(q) == ["MatMulNBits"]
    x = x_for(64)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w), **EXACT)


def test_subgraph_weights():
    rng = np.random.default_rng(0)
    w_outer = rng.standard_normal((64, 16)).astype(np.float32)
    w_inner = rng.standard_normal((64, 16)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wo"], ["t"], name="then_mm")], "then", [], [vi("t", ["M", 16])])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["Wi"], value=init("Wi_c", w_inner)), helper.make_node("MatMul", ["x", "Wi"], ["e"], name="else_mm")],
        "else", [], [vi("e", ["M", 16])])
    m = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                   [vi("x", ["M", 64]), vi("cond", [], TensorProto.BOOL)], [vi("y", ["M", 16])], [init("Wo", w_outer)])
    q, report = quantize(m, cfg(), return_report=True)
    assert sorted(c.node for c in report.converted) == ["else_mm", "then_mm"]
    x = x_for(64)
    (y_then,) = run_model(q, {"x": x, "cond": np.array(True)})
    (y_else,) = run_model(q, {"x": x, "cond": np.array(False)})
    np.testing.assert_allclose(y_then, x @ deq(w_outer), **EXACT)
    np.testing.assert_allclose(y_else, x @ deq(w_inner), **EXACT)


def test_fp16_model():
    model, w = matmul_model(k=64, n=32, dtype=np.float16)
    q = quantize(model, cfg())
    scales = next(i for i in q.graph.initializer if i.name == q.graph.node[0].input[2])
    assert scales.data_type == TensorProto.FLOAT16
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = x_for(64, dtype=np.float16)
    (y,) = run_model(q, {"x": x})
    assert y.dtype == np.float16
    ref = x.astype(np.float64) @ deq(w)
    assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max() + 2e-2


def test_idempotent():
    model, _ = matmul_model()
    q1 = quantize(model, cfg())
    q2, report = quantize(q1, cfg(), return_report=True)
    assert not report.converted
    assert q1.graph == q2.graph or onnx.helper.printable_graph(q1.graph) == onnx.helper.printable_graph(q2.graph)
    q3 = quantize(quantize(model, cfg(format="qdq")), cfg(format="qdq"))
    assert ops(q3) == ["DequantizeLinear", "MatMul"]


def test_name_collisions():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "W_Q4"], ["y0"]),
                    helper.make_node("Add", ["y0", "W_scales"], ["y"])],
                   [vi("x", ["M", 64])], [vi("y", ["M", 16])],
                   [init("W", w), init("W_Q4", np.ones(16, np.float32)), init("W_scales", np.full(16, 2, np.float32))])
    q = quantize(m, cfg())
    names = [i.name for i in q.graph.initializer]
    assert len(names) == len(set(names))
    x = x_for(64)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w) + 3.0, **EXACT)


def test_skip_reasons():
    rng = np.random.default_rng(0)
    m = make_model(
        [helper.make_node("MatMul", ["x", "Wdyn"], ["a"], name="dynamic"),
         helper.make_node("MatMul", ["x", "Wint"], ["b"], name="integer"),
         helper.make_node("MatMul", ["x", "Wsmall_k"], ["c"], name="small"),
         helper.make_node("MatMul", ["x", "Woverride"], ["d"], name="excluded_head")],
        [vi("x", ["M", 8]), vi("Wdyn", [8, 4]), vi("Woverride", [8, 4])],
        [vi("a", ["M", 4]), vi("b", ["M", 4], TensorProto.INT32), vi("c", ["M", 4]), vi("d", ["M", 4])],
        [init("Wint", np.ones((8, 4), np.int32)), init("Wsmall_k", rng.standard_normal((8, 4)).astype(np.float32)),
         init("Woverride", rng.standard_normal((8, 4)).astype(np.float32))],
    )
    _, report = quantize(m, cfg(min_k=4, exclude=["head"]), return_report=True)
    reasons = {s.node: s.reason for s in report.skipped}
    assert "graph input" in reasons["dynamic"]
    assert "not float" in reasons["integer"] or "INT32" in reasons["integer"]
    assert "graph input" in reasons["excluded_head"]  # an initializer that is also an input is not constant
    _, report = quantize(m, cfg(min_k=16), return_report=True)
    assert "too small" in {s.node: s.reason for s in report.skipped}["small"]
    _, report = quantize(m, cfg(min_k=4, exclude=["small"]), return_report=True)
    assert "excluded" in {s.node: s.reason for s in report.skipped}["small"]


def test_overrides_mixed_precision():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="body"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="lm_head")],
                   [vi("x", ["M", 64])], [vi("y", ["M", 32])], [init("W1", w1), init("W2", w2)])
    c = cfg(overrides=[ort_wq.NodeOverride.parse("head=bits:8,block:64")])
    q = quantize(m, c)
    bits = [{a.name: a.i for a in n.attribute}["bits"] for n in q.graph.node]
    assert bits == [4, 8]
    x = x_for(64)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w1) @ deq(w2, 8, 64), rtol=1e-3, atol=1e-3)
    q = quantize(m, cfg(overrides=[ort_wq.NodeOverride.parse("lm_head=skip")]))
    assert ops(q) == ["MatMulNBits", "MatMul"]


def test_pass_in_pass_manager_and_rules_with_rewriter():
    import onnxscript.rewriter

    model, w = matmul_model()
    ir_model = ir.serde.deserialize_model(model)
    qpass = WeightOnlyQuantPass(cfg())
    result = ir.passes.PassManager([qpass])(ir_model)
    assert result.modified and [n.op_type for n in ir_model.graph] == ["MatMulNBits"]
    assert qpass.last_report.converted[0].node == "mm"
    x = x_for(64)
    (y,) = run_model(ir.serde.serialize_model(ir_model), {"x": x})
    np.testing.assert_allclose(y, x @ deq(w), **EXACT)
    rewritten = onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=rules(cfg()))
    assert ops(rewritten) == ["MatMulNBits"]
    (y2,) = run_model(rewritten, {"x": x})
    np.testing.assert_array_equal(y2, y)


def test_ir_model_modified_in_place_and_proto_input_untouched():
    model, _ = matmul_model()
    before = model.SerializeToString()
    out = quantize(model, cfg())
    assert model.SerializeToString() == before and isinstance(out, onnx.ModelProto)
    ir_model = ir.serde.deserialize_model(model)
    assert quantize(ir_model, cfg()) is ir_model


def test_qdq_raises_opset_when_safe_and_refuses_otherwise():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["M", 64])], [vi("y", ["M", 16])], [init("W", w)], opset=17)
    q = quantize(m, cfg(format="qdq"))
    assert {o.domain: o.version for o in q.opset_import}[""] == 21
    x = x_for(64)
    np.testing.assert_allclose(run_model(q, {"x": x})[0], x @ deq(w), **EXACT)
    m2 = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Reshape", ["h", "s"], ["y"])],
                    [vi("x", ["M", 64])], [vi("y", [-1])], [init("W", w), init("s", np.array([-1], np.int64))], opset=13)
    with pytest.raises(ValueError, match="Reshape"):
        quantize(m2, cfg(format="qdq"))


def test_external_data_model(tmp_path):
    model, w = matmul_model(k=256, n=128)
    src = tmp_path / "in.onnx"
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)
    before = (src.read_bytes(), (tmp_path / "in.onnx.data").read_bytes())
    out = tmp_path / "out.onnx"
    assert quantize(str(src), cfg(), output=out) == str(out)
    assert (tmp_path / "out.onnx.data").is_file() and not list(tmp_path.glob("out.onnx.*.data"))
    assert (src.read_bytes(), (tmp_path / "in.onnx.data").read_bytes()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    x = x_for(256)
    (y,) = run_model(str(out), {"x": x})
    np.testing.assert_allclose(y, x @ deq(w), **EXACT)


def test_path_input_errors(tmp_path):
    model, _ = matmul_model()
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src)
    with pytest.raises(ValueError, match="output"):
        quantize(str(src), cfg())
    with pytest.raises(ValueError, match="input model"):
        quantize(str(src), cfg(), output=src)
    with pytest.raises(ValueError, match="no such file"):
        quantize(str(tmp_path / "missing.onnx"), cfg(), output=tmp_path / "o.onnx")


@pytest.mark.parametrize("zero_points, elem", [("float", TensorProto.FLOAT), ("uint8", TensorProto.UINT8)])
def test_zero_point_type_choice(zero_points, elem):
    model, w = matmul_model(k=96, n=24)
    q = quantize(model, cfg(symmetric=False, zero_points=zero_points))
    inits = {i.name: i for i in q.graph.initializer}
    assert inits[q.graph.node[0].input[3]].data_type == elem
    x = x_for(96)
    (y,) = run_model(q, {"x": x})
    np.testing.assert_allclose(y, x @ deq(w, 4, 32, False), **EXACT)


def test_transpose_without_perm_only_for_2d():
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((32, 64)).astype(np.float32)  # [N, K]
    w3 = rng.standard_normal((1, 32, 64)).astype(np.float32)
    m = make_model(
        [helper.make_node("Transpose", ["W2"], ["W2t"], name="t2"), helper.make_node("MatMul", ["x", "W2t"], ["a"], name="mm2"),
         helper.make_node("Transpose", ["W3"], ["W3t"], name="t3"), helper.make_node("Reshape", ["W3t", "s"], ["W3r"], name="r"),
         helper.make_node("MatMul", ["x", "W3r"], ["b"], name="mm3")],
        [vi("x", ["M", 64])], [vi("a", ["M", 32]), vi("b", ["M", 32])],
        [init("W2", w2), init("W3", w3), init("s", np.array([64, 32], np.int64))])
    q, report = quantize(m, cfg(), return_report=True)
    assert [c.node for c in report.converted] == ["mm2"]
    x = x_for(64)
    a, b = run_model(q, {"x": x})
    np.testing.assert_allclose(a, x @ deq(np.ascontiguousarray(w2.T)), **EXACT)
    np.testing.assert_allclose(b, x @ np.transpose(w3).reshape(64, 32), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["qdq", "fpq4"])
def test_fp16_other_formats(fmt):
    model, w = matmul_model(k=64, n=32, dtype=np.float16)
    q, report = quantize(model, cfg(format=fmt), return_report=True)
    if fmt == "fpq4":
        assert not report.converted and "float32" in report.skipped[0].reason
        return
    assert ops(q) == ["DequantizeLinear", "MatMul"]
    x = x_for(64, dtype=np.float16)
    (y,) = run_model(q, {"x": x})
    ref = x.astype(np.float64) @ deq(w)
    assert y.dtype == np.float16 and np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max() + 2e-2


def test_output_does_not_depend_on_input_files(tmp_path):
    """Every tensor of the input's data file (small biases too) ends up in the output's own files."""
    import shutil

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"])],
                   [vi("x", ["M", 64])], [vi("y", ["M", 32])], [init("W", w), init("b", b)])
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    onnx.save_model(m, src_dir / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    for fmt in ("nbits", "qdq"):
        out = out_dir / f"{fmt}.onnx"
        quantize(str(src_dir / "m.onnx"), cfg(format=fmt), output=out)
    shutil.rmtree(src_dir)
    x = x_for(64)
    for fmt in ("nbits", "qdq"):
        (y,) = run_model(str(out_dir / f"{fmt}.onnx"), {"x": x})
        np.testing.assert_allclose(y, x @ deq(w) + b, **EXACT)


def test_output_data_file_never_overwrites_the_input_data(tmp_path):
    model, _ = matmul_model()
    onnx.save_model(model, tmp_path / "a.onnx", save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    before = (tmp_path / "b.onnx.data").read_bytes()
    quantize(str(tmp_path / "a.onnx"), cfg(), output=tmp_path / "b.onnx")  # its data file has a name of its own
    assert (tmp_path / "b.onnx.data").read_bytes() == before
    with pytest.raises(ValueError, match="would be overwritten"):  # the graph path itself is the input's data
        quantize(str(tmp_path / "a.onnx"), cfg(), output=tmp_path / "b.onnx.data")
    assert (tmp_path / "b.onnx.data").read_bytes() == before
