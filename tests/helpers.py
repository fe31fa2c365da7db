"""Shared test helpers: one-node models, running them in onnxruntime, independent dequantization."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

FLOAT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def single_node_model(node: onnx.NodeProto, inits: list[onnx.TensorProto], k: int, n: int, dtype=np.float32, opset=21):
    elem = FLOAT_TYPES[np.dtype(dtype)]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(node.input[0], elem, ["M", k])],
        [helper.make_tensor_value_info(node.output[0], elem, ["M", n])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return model


def run_model(model, feeds: dict, so: ort.SessionOptions | None = None) -> list[np.ndarray]:
    """Run on the CPU; QDQ MatMuls fused by onnxruntime use exact (level 0) arithmetic."""
    if so is None:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def dequant_groups(q: np.ndarray, scale: np.ndarray, zp, k: int, n: int, group_size: int) -> np.ndarray:
    """``W[k, n]`` from ``quant_tensor`` outputs on the padded ``W.T`` (independent of packing)."""
    zp = 0.0 if zp is None else np.asarray(zp, dtype=np.float64)
    w = (np.asarray(q, dtype=np.float64) - zp) * np.asarray(scale, dtype=np.float64)
    return w.reshape(n, -1)[:, :k].T


def matmul_node(name: str = "mm", weight: str = "W") -> onnx.NodeProto:
    return helper.make_node("MatMul", ["A", weight], ["Y"], name=name)
