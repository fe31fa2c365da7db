"""Constant weights and the reasons a tensor cannot be quantized (the target finder's building blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass
class WeightRef:
    """A constant weight seen by one consumer: ``W[K, N]`` is ``tensor`` (transposed if ``transpose``)."""

    value: ir.Value
    tensor: ir.TensorProtocol
    transpose: bool
    k: int
    n: int

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    def numpy(self) -> np.ndarray:
        """``W[K, N]`` as an array view: no copy (memory-mapped for external tensors), transposed
        weights are a transposed view (algorithms read them in their own layout)."""
        arr = np.asarray(self.tensor.numpy())
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
        return arr.T if self.transpose else arr


def domain_of(node: ir.Node) -> str:
    """The node's domain, ``""`` for the default one (also spelled ``"ai.onnx"``)."""
    return "" if node.domain in ("", "ai.onnx") else node.domain


def const_tensor(value: ir.Value | None) -> tuple[ir.TensorProtocol | None, str]:
    """The constant tensor behind ``value`` (initializer or Constant node), or ``(None, reason)``."""
    if value is None:
        return None, "weight input is missing"
    if value.is_graph_input():
        return None, "weight is a graph input (can be overridden at run time)"
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return None, "weight is already quantized (DequantizeLinear)"
        what = f"output of {producer.op_type}" if producer is not None else "not an initializer"
        return None, f"weight is not constant ({what})"
    return tensor, ""


def weight_ref(value: ir.Value | None, transpose: bool, min_k: int = 1, min_n: int = 1) -> tuple[WeightRef | None, str]:
    """A :class:`WeightRef` for a MatMul/Gemm weight input, or ``(None, reason)``."""
    tensor, reason = const_tensor(value)
    if tensor is None:
        return None, reason
    if tensor.dtype not in FLOAT_TYPES:
        return None, f"weight is {tensor.dtype.name}, not float32/float16"
    dims = [int(d) for d in tensor.shape]
    if len(dims) < 2 or any(d != 1 for d in dims[:-2]):
        return None, "weight is not 2-D (or 2-D with leading 1s)"
    rows, cols = dims[-2:]
    k, n = (cols, rows) if transpose else (rows, cols)
    if k < min_k or n < min_n:
        return None, f"weight is too small (minimum K={min_k}, N={min_n})"
    return WeightRef(value, tensor, transpose, k, n), ""


def transposed_source(value: ir.Value | None) -> ir.Value | None:
    """``W`` when ``value`` is ``Transpose(W, perm=[1, 0])`` (or no perm on a 2-D W), else ``None``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get("perm")
    src = node.inputs[0]
    if perm is not None:
        return src if list(perm.as_ints()) == [1, 0] else None
    # no perm reverses every axis: a transpose of the last two only for a 2-D input
    shape = src.shape if src is not None else None
    tensor = ir.convenience.get_const_tensor(src) if src is not None else None
    rank = len(tensor.shape) if tensor is not None else (len(shape) if shape is not None else None)
    return src if rank == 2 else None


def gemm_reason(node: ir.Node) -> str:
    """Why a Gemm cannot become a weight-only MatMul ('' when it can)."""
    attrs = node.attributes
    alpha = attrs["alpha"].as_float() if "alpha" in attrs else 1.0
    beta = attrs["beta"].as_float() if "beta" in attrs else 1.0
    trans_a = attrs["transA"].as_int() if "transA" in attrs else 0
    if trans_a:
        return "Gemm with transA=1 is not supported"
    if alpha != 1.0:
        return f"Gemm with alpha={alpha} is not supported (only 1)"
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_c and beta != 1.0:
        return f"Gemm with beta={beta} is not supported (only 1)"
    return ""


def bias_vector(value: ir.Value | None, n: int) -> ir.TensorProtocol | None:
    """The constant ``[N]`` (or ``[1, N]``) bias behind ``value``, else ``None``."""
    tensor, _ = const_tensor(value)
    if tensor is None or tensor.dtype not in FLOAT_TYPES:
        return None
    dims = [int(d) for d in tensor.shape]
    if dims == [n] or dims == [1, n]:
        return tensor
    return None
