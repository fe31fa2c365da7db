"""``ort-wq demo``: a small transformer built in memory, quantized, and compared with the original.

``build_transformer`` is also the generator of LM-shaped models for tests and benchmarks:
token embedding, pre-norm layers (QKV/output projections with bias, single-head attention, a
GELU MLP), and an output head tied to the embedding (MatMul through a Transpose).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_transformer(
    layers: int = 4,
    hidden: int = 512,
    mlp: int | None = None,
    vocab: int = 2000,
    seed: int = 0,
    outlier_channels: int = 0,
    dtype=np.float32,
) -> onnx.ModelProto:
    """An LM-like ONNX model: ``input_ids`` int64 ``[batch, seq]`` -> ``logits`` ``[batch, seq, vocab]``.

    ``outlier_channels`` > 0 scales a few hidden channels of the normalised activations by 20-50x
    (as real LLMs have), the case where activation-aware algorithms beat round-to-nearest.
    """
    rng = np.random.default_rng(seed)
    mlp = mlp or 4 * hidden
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape, scale: float) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(dtype), name))
        return name

    def const(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        return name

    def linear(x: str, name: str, k: int, n: int) -> str:
        nodes.append(helper.make_node("MatMul", [x, weight(f"{name}.weight", (k, n), k**-0.5)], [f"{name}.mm"], name=f"{name}/MatMul"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", const(f"{name}.bias", rng.standard_normal(n) * 0.02)], [f"{name}.out"], name=f"{name}/Add"))
        return f"{name}.out"

    def norm(x: str, name: str) -> str:
        gamma = np.ones(hidden)
        if outlier_channels:
            gamma[rng.choice(hidden, outlier_channels, replace=False)] = rng.uniform(20, 50, outlier_channels)
        nodes.append(helper.make_node("LayerNormalization", [x, const(f"{name}.weight", gamma), const(f"{name}.bias", np.zeros(hidden))],
                                      [f"{name}.out"], axis=-1, epsilon=1e-5, name=f"{name}/LayerNorm"))
        return f"{name}.out"

    weight("embed.weight", (vocab, hidden), 1.0)
    nodes.append(helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed/Gather"))
    f = transformer_layers(nodes, "h0", layers, hidden, mlp, linear, norm, const("attn.scale", np.array(hidden**-0.5)))
    nodes += [
        helper.make_node("Transpose", ["embed.weight"], ["embed.weight.T"], perm=[1, 0], name="lm_head/Transpose"),
        helper.make_node("MatMul", [f, "embed.weight.T"], ["logits"], name="lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "demo_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", vocab])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10,
                             producer_name="ort-wq demo")


def transformer_layers(nodes: list, h: str, layers: int, hidden: int, mlp: int, linear, norm, inv_sqrt: str) -> str:
    """Append pre-norm transformer layers and the final norm to ``nodes``; returns the last value.

    ``linear(x, name, k, n)`` and ``norm(x, name)`` add a projection / a normalisation and return
    their output name (so callers choose biases, weight storage and norm parameters).
    """
    for i in range(layers):
        p = f"layers.{i}"
        a = norm(h, f"{p}.ln1")
        q, k, v = (linear(a, f"{p}.attn.{t}", hidden, hidden) for t in ("q", "k", "v"))
        nodes += [
            helper.make_node("Transpose", [k], [f"{p}.kt"], perm=[0, 2, 1], name=f"{p}/attn/Transpose"),
            helper.make_node("MatMul", [q, f"{p}.kt"], [f"{p}.scores"], name=f"{p}/attn/QK"),
            helper.make_node("Mul", [f"{p}.scores", inv_sqrt], [f"{p}.scaled"], name=f"{p}/attn/Scale"),
            helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1, name=f"{p}/attn/Softmax"),
            helper.make_node("MatMul", [f"{p}.probs", v], [f"{p}.ctx"], name=f"{p}/attn/PV"),
        ]
        o = linear(f"{p}.ctx", f"{p}.attn.o", hidden, hidden)
        nodes.append(helper.make_node("Add", [h, o], [f"{p}.res1"], name=f"{p}/Residual1"))
        a2 = norm(f"{p}.res1", f"{p}.ln2")
        u = linear(a2, f"{p}.mlp.up", hidden, mlp)
        nodes.append(helper.make_node("Gelu", [u], [f"{p}.act"], name=f"{p}/mlp/Gelu"))
        d = linear(f"{p}.act", f"{p}.mlp.down", mlp, hidden)
        nodes.append(helper.make_node("Add", [f"{p}.res1", d], [f"{p}.res2"], name=f"{p}/Residual2"))
        h = f"{p}.res2"
    return norm(h, "final_ln")


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_ms(sess, feeds, repeats: int) -> float:
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run_demo(layers: int = 4, hidden: int = 512, save_dir: str | None = None, seed: int = 0) -> int:
    """Build, quantize, compare; print a summary. Returns the exit code."""
    from .config import WeightOnlyConfig
    from .quantize import quantize

    vocab = 2000
    t0 = time.perf_counter()
    model = build_transformer(layers=layers, hidden=hidden, vocab=vocab, seed=seed)
    config = WeightOnlyConfig()
    quantized, report = quantize(model, config, return_report=True)
    size_fp32, size_q = model.ByteSize(), quantized.ByteSize()
    if save_dir:
        from pathlib import Path

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        import onnx_ir as ir

        from .model_io import save_model

        for name, proto in (("original.onnx", model), ("quantized.onnx", quantized)):
            save_model(ir.serde.deserialize_model(proto), Path(save_dir) / name, external_data=False)

    rng = np.random.default_rng(seed + 1)
    prompt = {"input_ids": rng.integers(0, vocab, size=(1, 128), dtype=np.int64)}
    token = {"input_ids": prompt["input_ids"][:, :1]}
    s_ref, s_q = _session(model), _session(quantized)
    (ref,) = s_ref.run(None, prompt)
    (out,) = s_q.run(None, prompt)
    ref2, out2 = ref.reshape(-1, vocab).astype(np.float64), out.reshape(-1, vocab).astype(np.float64)
    cos = float(np.mean(np.sum(ref2 * out2, 1) / (np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1))))
    rel = float(np.linalg.norm(out2 - ref2) / np.linalg.norm(ref2))
    top1 = float(np.mean(ref2.argmax(1) == out2.argmax(1)))
    speed = [(name, _median_ms(s_ref, feeds, reps), _median_ms(s_q, feeds, reps))
             for name, feeds, reps in (("1 token", token, 30), ("128-token prompt", prompt, 5))]

    print(f"ort-wq demo: {layers}-layer transformer, hidden {hidden}, vocab {vocab} (built in memory)")
    print(f"settings: {config.bits}-bit, block {config.block_size}, {'sym' if config.symmetric else 'asym'}, "
          f"format {config.format}, accuracy_level {config.accuracy_level}, algorithm {config.algorithm}")
    print(report.to_text())
    print()
    print(f"{'':22}{'fp32':>12}{'quantized':>12}{'ratio':>9}")
    print(f"{'model size':22}{size_fp32 / 1e6:>10.2f}MB{size_q / 1e6:>10.2f}MB{size_fp32 / size_q:>8.1f}x")
    for name, a, b in speed:
        print(f"{name + ' latency':22}{a:>10.2f}ms{b:>10.2f}ms{a / b:>8.2f}x")
    print(f"\nlogits vs fp32: cosine {cos:.4f}, relative L2 error {rel:.4f}, top-1 agreement {top1:.1%}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
