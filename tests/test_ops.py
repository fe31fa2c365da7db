"""Reference ops (ort_wq.ops) against onnxruntime's own MatMulNBits / MatMulFpQ4 kernels.

Every test runs real onnxruntime sessions. Tests that enable the process-wide com.microsoft
override, or that feed corrupted weights (a leaked Python exception would abort the process), run
in a subprocess so that they cannot disturb the rest of the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ort_wq import make_matmul_weight_only_node, pad_tensor, quant_tensor
from ort_wq import ops

from .helpers import matmul_node, run_model, single_node_model

REPO = Path(__file__).resolve().parents[1]


def nbits_model(bits, bs, k, n, zp="none", bias=False, dtype=np.float32, seed=0, accuracy_level=0):
    """A one-node MatMulNBits model; ``zp`` is none / uint8 / float, A of shape [B, M, K]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w += rng.uniform(-1.0, 2.0, size=(1, n)).astype(np.float32) if zp != "none" else 0
    if zp == "float":
        w = rng.uniform(1.0, 2.0, size=(k, n)).astype(np.float32)  # never crosses zero: zp outside [0, 2^b-1]
    w = w.astype(dtype)
    kb = -(-k // bs)
    scheme, kind = ("sym", "uint") if zp == "none" else ("asym", "int" if zp == "float" else "uint")
    q, scale, zero_point = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, scheme, kind)
    node, inits = make_matmul_weight_only_node(
        matmul_node(), (k, n), bits, bs, kb, q, scale, None if zp == "none" else zero_point, accuracy_level
    )
    zp_init = next((i for i in inits if len(node.input) > 3 and i.name == node.input[3]), None)
    if zp != "none":
        assert zp_init is not None and (zp_init.data_type == onnx.TensorProto.UINT8) == (zp == "uint8")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(dtype), "bias"))
        node.input.extend([""] * (5 - len(node.input)) + ["bias"])
    model = single_node_model(node, inits, k, n, dtype=dtype)
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_param="B"))
    return model


def fpq4_model(k, n, symmetric, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) + (0.0 if symmetric else 0.7)
    kb = -(-k // 32)
    q, scale, zp = quant_tensor(pad_tensor(w, 32, kb).T, 4, 32, "sym" if symmetric else "asym", "uint")
    node, inits = make_matmul_weight_only_node(
        matmul_node(), (k, n), 4, 32, kb, q, scale, None if symmetric else zp, op_type="MatMulFpQ4"
    )
    model = single_node_model(node, inits, k, n)
    model.graph.input[0].type.tensor_type.ClearField("shape")  # A of any rank [..., K]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


def fpq4_unsupported_reason() -> str | None:
    try:
        ort.InferenceSession(fpq4_model(32, 4, True).SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the runtime's own reason
        return str(exc).strip().splitlines()[-1][:300]
    return None


def run_reference(model, feeds):
    return ops.run(ops.reference_session(model), None, feeds)


def assert_close_to_builtin(y_ref, y_builtin, dtype):
    assert y_ref.dtype == y_builtin.dtype and y_ref.shape == y_builtin.shape
    scale = float(np.abs(y_builtin.astype(np.float64)).max())
    if dtype == np.float16:  # both compute in float32 and round once: at most an ulp or two apart
        np.testing.assert_allclose(y_ref.astype(np.float64), y_builtin, rtol=2e-3, atol=2e-3 * scale)
    else:
        np.testing.assert_allclose(y_ref, y_builtin, rtol=1e-5, atol=1e-6 * scale)


NBITS_CASES = [
    (bits, zp, bias, dtype)
    for bits in (2, 4, 8)
    for zp in ("none", "uint8", "float")
    for bias in (False, True)
    for dtype in (np.float32, np.float16)
    if not (bits == 8 and zp == "float")  # the CPU kernel refuses 8-bit float zero points
]


NBITS_IDS = [f"{b}b-zp_{z}-{'bias' if c else 'nobias'}-{np.dtype(d).name}" for b, z, c, d in NBITS_CASES]


@pytest.mark.parametrize("bits, zp, bias, dtype", NBITS_CASES, ids=NBITS_IDS)
def test_matmulnbits_reference_matches_builtin(bits, zp, bias, dtype):
    """Every variant, two block sizes, a ragged K (odd k_blocks) and an exact one."""
    for bs, k, n in ((16, 3 * 16 + 5, 24), (64, 2 * 64, 12)):
        model = nbits_model(bits, bs, k, n, zp, bias, dtype, seed=bits * 7 + bs)
        ref = ops.to_reference(model)
        ref_types = [nd.op_type for nd in ref.graph.node if nd.domain == ops.REFERENCE_DOMAIN]
        assert ref_types == [ops.nbits_variant(zp, bias)]
        a = np.random.default_rng(k).standard_normal((2, 3, k)).astype(dtype)
        (y_builtin,) = run_model(model, {"A": a})
        (y_ref,) = run_reference(model, {"A": a})
        assert_close_to_builtin(y_ref, y_builtin, dtype)
        np.testing.assert_array_equal(ops.evaluate("MatMulNBits", [a, *load_inits(model)], node_attrs(model)), y_ref)


def load_inits(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits.get(name) for name in model.graph.node[0].input[1:]]


def node_attrs(model):
    return {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}


@pytest.mark.parametrize("bs, k", [(128, 300), (256, 256), (1024, 1000)])
def test_matmulnbits_large_blocks(bs, k):
    model = nbits_model(4, bs, k, 8, "uint8")
    a = np.random.default_rng(1).standard_normal((1, 5, k)).astype(np.float32)
    assert_close_to_builtin(run_reference(model, {"A": a})[0], run_model(model, {"A": a})[0], np.float32)


@pytest.mark.parametrize("symmetric", [True, False], ids=["type0", "type1"])
def test_matmulfpq4_reference_matches_builtin(symmetric):
    reason = fpq4_unsupported_reason()
    if reason:
        pytest.skip(f"onnxruntime has no MatMulFpQ4 kernel here: {reason}")
    for k, shape in ((70, (2, 3)), (64, (5,)), (33, ())):
        model = fpq4_model(k, 12, symmetric, seed=k)
        a = np.random.default_rng(k).standard_normal((*shape, k)).astype(np.float32)
        (y_builtin,) = run_model(model, {"A": a})
        (y_ref,) = run_reference(model, {"A": a})
        assert y_ref.shape == (*shape, 12)
        assert_close_to_builtin(y_ref, y_builtin, np.float32)


def test_to_reference_copies_and_keeps_interface():
    model = nbits_model(4, 32, 64, 8, "float", bias=True, dtype=np.float16)
    before = model.SerializeToString()
    ref = ops.to_reference(model)
    assert model.SerializeToString() == before  # the input is untouched
    assert isinstance(ref, onnx.ModelProto)
    assert [o.name for o in ref.graph.output] == ["Y"] and ref.graph.output[0].type.tensor_type.elem_type == 10
    ops_used = [(nd.domain, nd.op_type) for nd in ref.graph.node]
    assert (ops.REFERENCE_DOMAIN, "MatMulNBitsZpFBias") in ops_used and ("", "Cast") in ops_used
    node = next(nd for nd in ref.graph.node if nd.domain == ops.REFERENCE_DOMAIN)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["node"] == b"mm_Q4"
    ir_model = ir.serde.deserialize_model(model)
    ir_ref = ops.to_reference(ir_model)
    assert isinstance(ir_ref, ir.Model) and ir_ref is not ir_model
    assert [n.op_type for n in ir_model.graph] == ["MatMulNBits"]


def test_to_reference_refuses_g_idx():
    model = nbits_model(4, 32, 64, 8, "uint8")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g"))
    model.graph.node[0].input.append("g")
    with pytest.raises(ValueError, match="mm_Q4.*g_idx"):
        ops.to_reference(model)


def test_reference_input_checks_name_the_problem():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    b = np.zeros((8, 2, 16), np.uint8)
    scales = np.ones((8, 2), np.float32)
    with pytest.raises(ops.ReferenceInputError, match=r"B is uint8 \[8, 1, 16\].*need uint8 \[8, 2, 16\]"):
        ops.matmul_nbits(a, b[:, :1], scales, K=64, N=8, bits=4, block_size=32)
    with pytest.raises(ops.ReferenceInputError, match=r"scales have shape \[8, 3\]"):
        ops.matmul_nbits(a, b, np.ones((8, 3), np.float32), K=64, N=8, bits=4, block_size=32)
    with pytest.raises(ops.ReferenceInputError, match="flat across rows"):
        a96, b96, s96 = np.ones((1, 96), np.float32), np.zeros((8, 3, 16), np.uint8), np.ones((8, 3), np.float32)
        ops.matmul_nbits(a96, b96, s96, np.zeros(12, np.uint8), K=96, N=8, bits=4, block_size=32)
    with pytest.raises(ops.ReferenceInputError, match="block_size=24"):
        ops.matmul_nbits(a, b, scales, K=64, N=8, bits=4, block_size=24)
    with pytest.raises(ops.ReferenceInputError, match="last dimension must be K"):
        ops.matmul_nbits(a[:, :32], b, scales, K=64, N=8, bits=4, block_size=32)
    with pytest.raises(ops.ReferenceInputError, match=r"blob has 100 bytes but B_shape \[64, 8\]"):
        ops.matmul_fpq4(a, np.zeros(100, np.uint8), np.array([64, 8]), blk_quant_type=0)


def test_weights_are_cached_and_sessions_are_thread_safe():
    model = nbits_model(4, 32, 256, 64, "uint8", bias=True)
    sess = ops.reference_session(model)
    rng = np.random.default_rng(3)
    feeds = [rng.standard_normal((1, 4, 256)).astype(np.float32) for _ in range(16)]
    expected = [run_model(model, {"A": a})[0] for a in feeds]
    before = ops.stats()

    def one(i):
        return ops.run(sess, None, {"A": feeds[i]})[0]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(16)))
    for got, want in zip(results, expected):
        assert_close_to_builtin(got, want, np.float32)
    after = ops.stats()
    label = f"{ops.REFERENCE_DOMAIN}::MatMulNBitsZpU8Bias"
    assert after["calls"][label] - before["calls"].get(label, 0) == 16
    assert after["cache"]["hits"] - before["cache"]["hits"] >= 15  # one miss at most for this weight


def run_script(body: str) -> dict:
    """Run ``body`` in a fresh interpreter; it prints one JSON line as its last output."""
    script = "import json, numpy as np, onnxruntime as ort\nfrom ort_wq import ops\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"subprocess died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_session_options_runs_unmodified_models_on_the_reference_ops():
    """session_options(): com.microsoft nodes execute the reference bodies (call counters prove it)."""
    reason = fpq4_unsupported_reason()
    out = run_script(
        f"""
        from tests.test_ops import fpq4_model, nbits_model
        from tests.helpers import run_model
        fpq4, nbits, asym = fpq4_model(70, 12, False), nbits_model(4, 32, 96, 16), nbits_model(4, 32, 96, 16, "uint8")
        a = np.random.default_rng(0).standard_normal((2, 3, 70)).astype(np.float32)
        a2 = np.random.default_rng(1).standard_normal((1, 3, 96)).astype(np.float32)
        res = {{"active_before": ops.contrib_override_active()}}
        if {reason is None}:
            res["fpq4_builtin"] = run_model(fpq4, {{"A": a}})[0].tolist()  # a session without the library
        res["nbits_builtin"] = run_model(nbits, {{"A": a2}})[0].tolist()
        so = ops.session_options(nbits_zero_points="none")
        res["active_after"] = ops.contrib_override_active()
        before = ops.stats()["calls"]
        res["fpq4_ref"] = ops.run(ort.InferenceSession(fpq4.SerializeToString(), so), None, {{"A": a}})[0].tolist()
        res["nbits_ref"] = ops.run(ort.InferenceSession(nbits.SerializeToString(), so), None, {{"A": a2}})[0].tolist()
        after = ops.stats()["calls"]
        res["calls"] = {{k: v - before.get(k, 0) for k, v in after.items()}}
        try:
            ort.InferenceSession(asym.SerializeToString(), ops.session_options())
            res["asym"] = "loaded"
        except Exception as exc:
            res["asym"] = str(exc)
        try:
            ops.session_options(model=asym)
            res["asym_checked"] = "accepted"
        except ValueError as exc:
            res["asym_checked"] = str(exc)
        print(json.dumps(res))
        """
    )
    assert out["active_before"] is False and out["active_after"] is True
    assert out["calls"] == {"com.microsoft::MatMulFpQ4": 1, "com.microsoft::MatMulNBits": 1}
    for op in ("fpq4", "nbits") if reason is None else ("nbits",):
        ref, builtin = (np.array(out[f"{op}_{kind}"], np.float32) for kind in ("ref", "builtin"))
        assert_close_to_builtin(ref, builtin, np.float32)
    assert "mm_Q4" in out["asym"]  # the 4-input form is refused at load time, naming the node (use to_reference)
    assert "'mm_Q4' (uint8 zero points)" in out["asym_checked"] and "reference_session" in out["asym_checked"]


def test_corrupted_weights_raise_a_clear_python_exception():
    """Bad blobs and scales give ReferenceOpError naming the node; the process lives on (no abort)."""
    out = run_script(
        """
        from tests.test_ops import fpq4_model, nbits_model
        from onnx import numpy_helper
        res = {}
        bad = fpq4_model(64, 8, symmetric=True)
        blob = next(i for i in bad.graph.initializer if i.name == bad.graph.node[0].input[1])
        blob.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(blob)[:-20], blob.name))  # one record short
        a = np.ones((2, 64), np.float32)
        for mode, sess in (("to_reference", ops.reference_session(bad)),
                           ("session_options", ort.InferenceSession(bad.SerializeToString(), ops.session_options()))):
            try:
                ops.run(sess, None, {"A": a})
                res[mode] = "no error"
            except ops.ReferenceOpError as exc:
                res[mode] = str(exc)
        sess = ops.reference_session(bad)  # plain session.run: zeros now, the error on request
        res["plain_zeros"] = bool((sess.run(None, {"A": a})[0] == 0).all())
        try:
            ops.raise_failures()
            res["plain"] = "no error"
        except ops.ReferenceOpError as exc:
            res["plain"] = str(exc)
        nb = nbits_model(4, 32, 96, 8, "uint8")
        scales = next(i for i in nb.graph.initializer if i.name == nb.graph.node[0].input[2])
        scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales)[:, :2], scales.name))
        try:
            ops.run(ops.reference_session(nb), None, {"A": np.ones((1, 2, 96), np.float32)})
            res["scales"] = "no error"
        except ops.ReferenceOpError as exc:
            res["scales"] = str(exc)
        res["good_after"] = ops.run(ops.reference_session(fpq4_model(64, 8, True)), None, {"A": a})[0].shape
        print(json.dumps(res))
        """
    )
    assert "MatMulFpQ4 node 'mm_Q4'" in out["to_reference"]
    assert "blob has 300 bytes but B_shape [64, 8]" in out["to_reference"] and "needs 320" in out["to_reference"]
    assert "unnamed" in out["session_options"] and "B_shape=[64, 8]" in out["session_options"]
    assert out["plain_zeros"] and "blob has 300 bytes" in out["plain"]
    assert "MatMulNBits node 'mm_Q4'" in out["scales"] and "scales have shape [8, 2]" in out["scales"]
    assert out["good_after"] == [2, 8]


@pytest.mark.skipif(os.environ.get("ORT_WQ_BENCH") != "1", reason="benchmark: set ORT_WQ_BENCH=1")
@pytest.mark.parametrize("m", [1, 32])
def test_speed_4096(m, capsys):
    """Built-in kernels vs reference ops on a 4096 x 4096 weight (4-bit, block 32)."""
    k = n = 4096
    a = np.random.default_rng(0).standard_normal((1, m, k)).astype(np.float32)
    models = {
        "MatMulNBits acc0": nbits_model(4, 32, k, n, "uint8"),
        "MatMulNBits acc4": nbits_model(4, 32, k, n, "uint8", accuracy_level=4),
        "MatMulFpQ4": fpq4_model(k, n, False),
    }
    rows = []
    for name, model in models.items():
        builtin = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = ops.reference_session(model)
        ops.clear_cache()
        t0 = time.perf_counter()
        ops.run(ref, None, {"A": a})  # the first call dequantizes the weight into the cache
        first = time.perf_counter() - t0
        times = {}
        for label, sess in (("built-in", builtin), ("reference", ref)):
            sess.run(None, {"A": a})
            rounds = []
            for _ in range(5):  # best of 5 rounds of 5 calls: robust on a busy machine
                t0 = time.perf_counter()
                for _ in range(5):
                    ops.run(sess, None, {"A": a})
                rounds.append((time.perf_counter() - t0) / 5)
            times[label] = min(rounds)
        ratio = times["reference"] / times["built-in"]
        builtin_ms, reference_ms = times["built-in"] * 1e3, times["reference"] * 1e3
        rows.append(f"{name:18} M={m:<3} built-in {builtin_ms:7.2f} ms   reference {reference_ms:7.2f} ms"
                    f"   ({ratio:.1f}x; first reference call {first * 1e3:.0f} ms)")  # fmt: skip
    with capsys.disabled():
        print("\n" + "\n".join(rows))


def test_to_reference_converts_nodes_inside_subgraphs():
    inner = nbits_model(4, 32, 64, 8, "uint8")
    then_branch = onnx.helper.make_graph(
        list(inner.graph.node), "then", [], [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        list(inner.graph.initializer),
    )  # fmt: skip
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["Z"], ["Y2"])], "else", [],
        [onnx.helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, None)],
    )  # fmt: skip
    f32 = onnx.TensorProto.FLOAT
    inputs = [("c", onnx.TensorProto.BOOL, []), ("A", f32, [2, 64]), ("Z", f32, [2, 8])]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["out"], then_branch=then_branch, else_branch=else_branch)], "g",
        [onnx.helper.make_tensor_value_info(*i) for i in inputs],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=inner.opset_import, ir_version=10)
    feeds = {"c": np.array(True), "A": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    feeds["Z"] = np.zeros((2, 8), np.float32)
    before = ops.stats()["calls"].get(f"{ops.REFERENCE_DOMAIN}::MatMulNBitsZpU8", 0)
    assert_close_to_builtin(run_reference(model, feeds)[0], run_model(model, feeds)[0], np.float32)
    assert ops.stats()["calls"][f"{ops.REFERENCE_DOMAIN}::MatMulNBitsZpU8"] == before + 1


def test_session_options_uint8_zero_points_runs_default_output():
    """nbits_zero_points="uint8": ort-wq's default (asymmetric) output runs unmodified on the reference ops."""
    out = run_script(
        """
        from tests.test_ops import nbits_model
        from tests.helpers import run_model
        asym = nbits_model(4, 32, 96, 16, "uint8")
        a = np.random.default_rng(1).standard_normal((1, 3, 96)).astype(np.float32)
        res = {"builtin": run_model(asym, {"A": a})[0].tolist()}
        so = ops.session_options(model=asym)  # the default form: uint8 zero points
        before = ops.stats()["calls"].get("com.microsoft::MatMulNBits", 0)
        res["ref"] = ops.run(ort.InferenceSession(asym.SerializeToString(), so), None, {"A": a})[0].tolist()
        res["calls"] = ops.stats()["calls"]["com.microsoft::MatMulNBits"] - before
        try:
            ops.session_options(nbits_zero_points="none")
            res["second"] = "accepted"
        except ValueError as exc:
            res["second"] = str(exc)
        print(json.dumps(res))
        """
    )
    assert out["calls"] == 1
    np.testing.assert_allclose(np.array(out["ref"]), np.array(out["builtin"]), rtol=1e-4, atol=1e-4)
    assert "already defined" in out["second"]
