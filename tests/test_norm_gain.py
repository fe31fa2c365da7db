"""The gain of the norm before a weight: found on every matched form, and used by the head searches.

``ort_wq.transforms.norms.input_gain`` reads the per-channel constant a normalisation applies
last; rtn-clip and hqq weight an output head's search by it (with the vocabulary's own channel
energy). The end-to-end check runs onnxruntime's MatMulNBits on a head whose hidden state's
energy follows the gain and compares with an independent numpy matmul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.algorithms import QuantSpec, get_algorithm
from ort_wq.transforms.norms import input_gain

K = 64


def _model(op: str, domain: str, inputs: list[str], out_index: int = 0, gain_shape=(K,)):
    rng = np.random.default_rng(0)
    g = (rng.random(gain_shape) + 0.5).astype(np.float32)
    outs = [f"o{i}" for i in range(out_index + 1)]
    norm = helper.make_node(op, [{"g": "g"}.get(i, i) for i in inputs], outs, domain=domain)
    mm = helper.make_node("MatMul", [outs[out_index], "w"], ["y"])
    graph = helper.make_graph(
        [norm, mm], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(g, "g"), numpy_helper.from_array(np.ones((K, 8), np.float32), "w")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    return model, g


def _gain(model) -> np.ndarray | None:
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    return input_gain(mm.inputs[0], K)


@pytest.mark.parametrize("op,domain,inputs", [
    ("SimplifiedLayerNormalization", "", ["x", "g"]),
    ("SimplifiedLayerNormalization", "com.microsoft", ["x", "g"]),
    ("RMSNormalization", "", ["x", "g"]),
    ("LayerNormalization", "", ["x", "g"]),
    ("SkipSimplifiedLayerNormalization", "com.microsoft", ["x", "s", "g"]),
    ("SkipLayerNormalization", "com.microsoft", ["x", "s", "g"]),
    ("Mul", "", ["x", "g"]),
    ("Mul", "", ["g", "x"]),
])
def test_gain_of_each_norm_form(op, domain, inputs):
    model, g = _model(op, domain, inputs)
    np.testing.assert_array_equal(_gain(model), np.abs(g.astype(np.float64)))


def test_no_gain_where_none_is_applied_last():
    model, _ = _model("SkipSimplifiedLayerNormalization", "com.microsoft", ["x", "s", "g"], out_index=3)
    assert _gain(model) is None  # output 3 is the residual sum, not the normalised output
    model, _ = _model("Add", "", ["x", "g"])
    assert _gain(model) is None
    model, _ = _model("Mul", "", ["x", "s"])
    assert _gain(model) is None  # no constant operand
    model, _ = _model("SimplifiedLayerNormalization", "", ["x", "g"], gain_shape=(1,))
    assert _gain(model) is None  # not one value per channel


def _gain_head(seed=3, k=K, n=8192, rows=512):
    """A vocabulary head whose columns carry no channel structure, read by ``h = g * xhat``: only the
    norm's gain says which channels matter."""
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
    g = np.ones(k)
    g[rng.choice(k, 6, replace=False)] = 5.0
    h = (g * rng.standard_normal((rows, k))).astype(np.float32)
    return w, g, h


def _logit_err(h, w, qw) -> float:
    return float(np.linalg.norm(h @ qw.dequantize() - h @ w) / np.linalg.norm(h @ w))


@pytest.mark.parametrize("name", ["rtn-clip", "hqq"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_head_search_follows_the_input_gain(name, sym):
    w, g, h = _gain_head()
    spec = QuantSpec(4, 32, sym)
    fn, _ = get_algorithm(name)
    with_gain = fn(w, spec, None, input_gain=g)
    assert any("gain" in note for note in with_gain.notes)
    without = _logit_err(h, w, fn(w, spec, None))
    rtn = _logit_err(h, w, get_algorithm("rtn")[0](w, spec))
    assert _logit_err(h, w, with_gain) < 0.97 * min(without, rtn), (_logit_err(h, w, with_gain), without, rtn)


@pytest.mark.parametrize("name", ["rtn-clip", "hqq"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_head_groups_never_reconstruct_worse_than_rtn_under_either_proxy(name, sym):
    """With both proxies (the vocabulary's channel energy and the gain^4), the search runs on their
    mean, but every group must reconstruct at least as well as rtn's range under each proxy alone
    (errors weighted as the searches weight them, ``sqrt(1 + w^2 / sigma2)`` times the proxy); the
    groups that fail get rtn's range back, and the note says how many kept the search."""
    w, g, h = _gain_head(seed=5)
    bs = 32
    spec = QuantSpec(4, bs, sym)
    fn, _ = get_algorithm(name)
    got = fn(w, spec, None, input_gain=g)
    rtn = get_algorithm("rtn")[0](w, spec).dequantize().astype(np.float64)
    w64 = w.astype(np.float64)
    mag = np.sqrt(1.0 + w64**2 / (w64**2).mean(axis=0, keepdims=True))  # per output column
    vocab = (w64**2).mean(axis=1)
    gain = np.maximum(np.abs(g) ** 4 / (np.abs(g) ** 4).mean(), 1e-3)

    def group_err(dq, energy):
        e = (dq - w64) ** 2 * mag * (energy / energy.mean())[:, None]
        return e.reshape(K // bs, bs, -1).sum(axis=1)  # [groups, N]

    dq = got.dequantize().astype(np.float64)
    for energy in (vocab, gain):
        mine, base = group_err(dq, energy), group_err(rtn, energy)
        worse = mine > base * (1 + 1e-4)  # the searches sum in float32
        assert not worse.any(), (int(worse.sum()), float(((mine - base) / base).max()))
    changed = np.any((dq != rtn).reshape(K // bs, bs, -1), axis=1)
    assert 0 < changed.mean() < 1  # the search moved some groups, the guard kept others at rtn
    kept = [n for n in got.notes if "keep the searched range" in n]
    assert len(kept) == 1, got.notes
    assert _logit_err(h, w, got) < _logit_err(h, w, get_algorithm("rtn")[0](w, spec))


def test_transform_passes_the_final_norm_gain_to_the_head_search():
    """norm -> head MatMul through the whole pass: the report says the gain was used, and
    onnxruntime's MatMulNBits output equals numpy's dequantize + matmul of the stored blocks."""
    import onnxruntime as ort

    from ort_wq.packing import unpack_nbits_weight

    w, g, _ = _gain_head(n=8192)
    norm = helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["hn"], axis=-1, epsilon=1e-6)
    mm = helper.make_node("MatMul", ["hn", "w"], ["logits"], name="lm_head")
    graph = helper.make_graph(
        [norm, mm], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, w.shape[1]])],
        [numpy_helper.from_array(g.astype(np.float32), "g"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cfg = WeightOnlyConfig(bits=4, block_size=32, symmetric=True, algorithm="rtn-clip", accuracy_level=0)
    q, report = quantize(model, cfg, return_report=True)
    notes = [n for t in report.tensors for n in t.notes]
    assert any("input norm's gain" in n for n in notes), notes
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    codes = unpack_nbits_weight(inits[node.input[1]], 4).astype(np.float32)
    scales = inits[node.input[2]].reshape(codes.shape[0], -1, 1)
    deq = ((codes - 8) * scales).reshape(codes.shape[0], -1)[:, :K].T
    x = np.random.default_rng(1).standard_normal((16, K)).astype(np.float32)
    hn = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * g
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, hn.astype(np.float32) @ deq, rtol=1e-4, atol=1e-4)
