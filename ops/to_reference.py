"""Reference copies of quantized models: ``to_reference``, node probes and loading into onnxruntime.

Every com.microsoft ``MatMulNBits`` / ``MatMulFpQ4`` / ``GatherBlockQuantized`` node (main graph, subgraphs and model-local
functions) becomes a node of :data:`REFERENCE_DOMAIN` with the same inputs minus the empty ones,
the attributes made explicit (defaults written out), and the original node name in a ``node``
attribute. The reference ops are float32 only, so float16 (or bfloat16) inputs go through Cast
nodes and the result is cast back: the output value keeps its name and type. Built-in and
reference kernels can then run side by side in one process.

:func:`probe_quantized_nodes` compares node by node instead: it exposes what each quantized node
reads and writes as graph outputs, so one run of the built-in kernels gives every node's input
and output, and :meth:`NodeProbe.compare` applies the reference op to that very input.

:func:`inference_session` loads an ``onnx_ir`` model into onnxruntime without copying external
data: the graph is serialised on its own and onnxruntime reads the data files from their folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ort_wq.model_io import as_ir_model, inference_session
from ort_wq.packing import CONTRIB_OPS

from .gather_block_quantized import evaluate_gather_block_quantized
from .matmul_fpq4 import evaluate_matmul_fpq4
from .matmul_nbits import evaluate_matmul_nbits
from .registration import REFERENCE_DOMAIN, gather_variant, nbits_variant, register

__all__ = [
    "QUANTIZED_OPS", "is_quantized_node", "node_label", "to_reference", "NodeProbe", "probe_quantized_nodes",
    "inference_session", "reference_session",
]  # fmt: skip

QUANTIZED_OPS = CONTRIB_OPS  # the ops ort_wq.packing lays out
_FLOAT = ir.DataType.FLOAT


def is_quantized_node(node: ir.Node) -> bool:
    """A com.microsoft MatMulNBits, MatMulFpQ4 or GatherBlockQuantized node."""
    return node.domain == "com.microsoft" and node.op_type in QUANTIZED_OPS


def node_label(node: ir.Node, index: int) -> str:
    """How failures and reports name a node: its name, else ``op_type#index`` (position in its graph)."""
    return node.name or f"{node.op_type}#{index}"


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    tensor = ir.convenience.get_const_tensor(value)
    return tensor.dtype if tensor is not None else None


def _int_attr(node: ir.Node, name: str, label: str, default: int | None = None) -> int:
    attr = node.attributes.get(name)
    if attr is None:
        if default is None:
            raise ValueError(f"{node.op_type} node {label}: required attribute {name!r} is missing")
        return default
    return int(attr.as_int())


class _Rewriter:
    """Replaces the quantized nodes of one graph or function."""

    def __init__(self, graph: ir.Graph | ir.Function) -> None:
        self.graph = graph
        self.casts: list[ir.Node] = []

    def as_float(self, value: ir.Value | None, label: str, what: str) -> ir.Value | None:
        """``value`` itself when it is float32 (or absent), else the output of a new Cast to float32."""
        if value is None or _dtype(value) in (_FLOAT, None):
            return value
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", _FLOAT)], name=f"{label}/reference_cast_{what}")
        cast.outputs[0].name = f"{label}/{what}_float32"
        cast.outputs[0].type = ir.TensorType(_FLOAT)
        cast.outputs[0].shape = value.shape
        self.casts.append(cast)
        return cast.outputs[0]

    def replace(self, node: ir.Node, label: str) -> None:
        self.casts = []
        if node.op_type == "MatMulFpQ4":
            ref = self.fpq4(node, label)
        elif node.op_type == "GatherBlockQuantized":
            ref = self.gather(node, label)
        else:
            ref = self.nbits(node, label)
        out = node.outputs[0]
        ref_out = ref.outputs[0]
        new_nodes = [*self.casts, ref]
        float_input = node.inputs[2] if node.op_type == "GatherBlockQuantized" else node.inputs[0]
        out_type = _dtype(out) or _dtype(float_input) or _FLOAT
        if out_type != _FLOAT:
            ref_out.name = f"{label}/output_float32"
            ref_out.type, ref_out.shape = ir.TensorType(_FLOAT), out.shape
            back = ir.Node("", "Cast", [ref_out], [ir.AttrInt64("to", out_type)], name=f"{label}/reference_cast_back")
            new_nodes.append(back)
            ref_out = back.outputs[0]
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], new_nodes, [out], [ref_out])

    def nbits(self, node: ir.Node, label: str) -> ir.Node:
        k, n = _int_attr(node, "K", label), _int_attr(node, "N", label)
        block_size, bits = _int_attr(node, "block_size", label), _int_attr(node, "bits", label, 4)
        a, b, scales, zp, g_idx, bias = (list(node.inputs) + [None] * 6)[:6]
        if a is None or b is None or scales is None:
            raise ValueError(f"MatMulNBits node {label}: inputs A, B and scales are required")
        if g_idx is not None:
            raise ValueError(f"MatMulNBits node {label}: g_idx (act-order) is not supported by the reference op")
        zp_kind = "none" if zp is None else ("float" if _dtype(zp) not in (ir.DataType.UINT8, None) else "uint8")
        inputs = [self.as_float(a, label, "A"), b, self.as_float(scales, label, "scales")]
        if zp is not None:
            inputs.append(self.as_float(zp, label, "zero_points") if zp_kind == "float" else zp)
        if bias is not None:
            inputs.append(self.as_float(bias, label, "bias"))
        attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits)]
        attrs += [ir.AttrInt64("block_size", block_size), ir.AttrString("node", label)]
        op_type = nbits_variant(zp_kind, bias is not None)
        return ir.Node(REFERENCE_DOMAIN, op_type, inputs, attrs, name=node.name, num_outputs=1)

    def gather(self, node: ir.Node, label: str) -> ir.Node:
        data, ids, scales, zp = (list(node.inputs) + [None] * 4)[:4]
        if data is None or ids is None or scales is None:
            raise ValueError(f"GatherBlockQuantized node {label}: inputs data, indices and scales are required")
        if _dtype(data) not in (ir.DataType.UINT8, None) or (zp is not None and _dtype(zp) not in (ir.DataType.UINT8, None)):
            raise ValueError(f"GatherBlockQuantized node {label}: the reference op takes uint8 data and zero points")
        if _dtype(ids) not in (ir.DataType.INT64, None):
            cast = ir.Node("", "Cast", [ids], [ir.AttrInt64("to", ir.DataType.INT64)], name=f"{label}/reference_cast_ids")
            cast.outputs[0].name = f"{label}/indices_int64"
            cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.INT64), ids.shape
            self.casts.append(cast)
            ids = cast.outputs[0]
        inputs = [data, ids, self.as_float(scales, label, "scales"), *([zp] if zp is not None else [])]
        attrs = [ir.AttrInt64(name, _int_attr(node, name, label, default))
                 for name, default in (("bits", 4), ("block_size", 128), ("quantize_axis", 1), ("gather_axis", 0))]
        attrs.append(ir.AttrString("node", label))
        return ir.Node(REFERENCE_DOMAIN, gather_variant(zp is not None), inputs, attrs, name=node.name, num_outputs=1)

    def fpq4(self, node: ir.Node, label: str) -> ir.Node:
        a, b, b_shape = (list(node.inputs) + [None] * 3)[:3]
        if a is None or b is None or b_shape is None:
            raise ValueError(f"MatMulFpQ4 node {label}: inputs A, B and B_shape are required")
        blk_quant_type = _int_attr(node, "blk_quant_type", label, 1)
        attrs = [ir.AttrInt64("blk_quant_type", blk_quant_type), ir.AttrString("node", label)]
        inputs = [self.as_float(a, label, "A"), b, b_shape]
        return ir.Node(REFERENCE_DOMAIN, "MatMulFpQ4", inputs, attrs, name=node.name, num_outputs=1)


def _convert(graph: ir.Graph | ir.Function) -> int:
    count = 0
    for index, node in enumerate(list(graph)):
        if is_quantized_node(node):
            _Rewriter(graph).replace(node, node_label(node, index))
            count += 1
    if count:
        graph.opset_imports.setdefault(REFERENCE_DOMAIN, 1)
    return count


def to_reference(model: Any) -> Any:
    """A copy of ``model`` whose MatMulNBits / MatMulFpQ4 nodes run the reference ops.

    ``model`` is an ``onnx.ModelProto`` (a ``ModelProto`` is returned), an ``onnx_ir.Model`` (a
    cloned ``ir.Model`` is returned; tensors are shared, not copied) or a path (the loaded
    ``ir.Model`` is returned, external data still memory-mapped from beside the file). Run the
    copy with the library registered (``ort_wq.ops.session_options(contrib=False)`` or
    :func:`reference_session`). Raises ``ValueError`` for nodes the reference ops cannot run
    (missing attributes, ``g_idx``).
    """
    m, kind = _reference_ir(model)
    return ir.serde.serialize_model(m) if kind == "proto" else m


def _reference_ir(model: Any) -> tuple[ir.Model, str]:
    """The converted copy as an ``ir.Model``, and the kind of input (see ``as_ir_model``)."""
    m, kind = as_ir_model(model)
    if kind == "ir":
        m = m.clone()
    count = _convert(m.graph)
    for sub in m.graph.subgraphs():
        count += _convert(sub)
    for func in m.functions.values():
        count += _convert(func)
    if count:
        m.opset_imports.setdefault(REFERENCE_DOMAIN, 1)
    return m, kind


@dataclass
class NodeProbe:
    """One quantized node of a probed model: where each of its inputs and its output come from."""

    label: str
    node: ir.Node
    sources: list[Any]  # per input, then the output: None (empty), a constant tensor, or a value name

    def compare(self, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(built-in output, reference output)`` given the run's outputs and feeds by name.

        Raises :class:`ReferenceInputError` when the reference op rejects the node's inputs.
        """
        arrays = [s if s is None else values[s] if isinstance(s, str) else s.numpy() for s in self.sources]
        attrs = {k: a.value for k, a in self.node.attributes.items()}
        evaluate = {"MatMulFpQ4": evaluate_matmul_fpq4, "GatherBlockQuantized": evaluate_gather_block_quantized}.get(
            self.node.op_type, evaluate_matmul_nbits)
        return arrays[-1], evaluate(arrays[:-1], attrs)

    @property
    def tolerance(self) -> float:
        """Relative L2 difference allowed between built-in and reference output.

        Tight at ``accuracy_level`` 0, where the CPU kernel dequantizes exactly like the reference
        (float16 adds one rounding of the output); loose above, where the kernel may quantize the
        activations to int8 per block (``accuracy_level`` 4) or compute in reduced precision.
        """
        if self.node.attributes.get_int("accuracy_level", 0) > 0:
            return 5e-2
        a = self.node.inputs[2 if self.node.op_type == "GatherBlockQuantized" else 0]
        return 1e-3 if a is None or a.dtype in (ir.DataType.FLOAT, None) else 4e-3


def probe_quantized_nodes(model: ir.Model) -> tuple[ir.Model, list[NodeProbe]]:
    """A clone of ``model`` that also outputs every non-constant value its main-graph quantized nodes
    read or write (graph inputs excepted), and one :class:`NodeProbe` per such node."""
    clone = model.clone()
    graph = clone.graph
    exposed = {v.name for v in graph.outputs} | {v.name for v in graph.inputs}
    probes = []
    for index, node in enumerate(list(graph)):
        if not is_quantized_node(node):
            continue
        sources: list[Any] = []
        for value in [*node.inputs, node.outputs[0]]:
            const = None if value is None else ir.convenience.get_const_tensor(value)
            sources.append(const if const is not None or value is None else value.name)
            if isinstance(sources[-1], str) and value.name not in exposed:
                graph.outputs.append(value)
                exposed.add(value.name)
        probes.append(NodeProbe(node_label(node, index), node, sources))
    return clone, probes


def reference_session(
    model: Any, sess_options: ort.SessionOptions | None = None, providers: list[str] | None = None
) -> ort.InferenceSession:
    """A session running ``model`` (path, ``ModelProto`` or ``ir.Model``) on the reference ops.

    Works for every MatMulNBits form and on runtimes without the contrib kernels. Run it with
    :func:`ort_wq.ops.run` to get reference-op failures raised. ``sess_options`` (default: new
    ones) get the onnxruntime-extensions library registered: pass options without it.
    """
    ref = _reference_ir(model)[0]
    so = register(sess_options if sess_options is not None else ort.SessionOptions(), contrib=False)
    return inference_session(ref, so, providers)
