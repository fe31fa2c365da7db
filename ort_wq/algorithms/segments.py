"""Cut a model's main graph into segments that calibration runs one after the other.

Calibrating an LLM in one onnxruntime session holds every float weight in the session and the
statistics of every layer at once. Run segment by segment instead, each session holds only the
weights its nodes read, and the statistics of a segment are consumed (by GPTQ, AWQ, imatrix)
before the next segment is run.

Planning (:func:`plan_segments`), on the main graph in its (topological) node order:

- keep only the nodes the target activations depend on (an LLM's output head, its logits and
  its KV-cache outputs are not computed);
- cut after the producer of a target activation once the nodes since the last cut read at least
  ``budget`` bytes of initializers (about two layers of SmolLM2-135M at the default 32 MiB, one
  layer of a 7B model);
- a segment's inputs are the values it reads that are not its own initializers or outputs
  (graph inputs and values of earlier segments, outer-scope reads of subgraphs included); its
  outputs are the target activations it produces and the values later segments read.

:func:`segment_session` serialises only a segment's nodes and initializers (external tensors stay
references into their files), typing the inputs from the arrays the previous segment produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

DEFAULT_BUDGET = 32 << 20


@dataclass
class Segment:
    """Consecutive kept nodes of the main graph, run as one onnxruntime session.

    The nodes are serialised and the initializer tensors captured when the plan is made, so the
    segment stays runnable while the transform rewrites the graph.
    """

    nodes: list[Any]  # onnx.NodeProto
    initializers: dict[str, Any] = field(default_factory=dict)  # name -> ir.TensorProtocol
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    weight_bytes: int = 0


@dataclass
class Plan:
    """The segments of one model, with what their sessions need from the model itself."""

    segments: list[Segment]
    from_inputs: list[str]  # target activations that are graph inputs
    ir_version: int = 10
    opsets: dict[str, int] = field(default_factory=dict)
    functions: list[Any] = field(default_factory=list)  # onnx.FunctionProto
    name: str = "graph"


def _reads(node: ir.Node) -> set[str]:
    """Names a node reads: its inputs and every input of a node inside its subgraphs."""
    names = {v.name for v in node.inputs if v is not None and v.name}
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in g:
                names |= _reads(inner)
    return names


def plan_segments(model: ir.Model, activations: list[str], budget: int = DEFAULT_BUDGET) -> Plan:
    """The segments computing the target ``activations`` of the model's main graph.

    Activations that no node produces and that are not graph inputs are left out.
    """
    graph = model.graph
    plan = Plan([], [], model.ir_version, dict(model.opset_imports),
                [ir.serde.serialize_function(f) for f in model.functions.values()], graph.name or "graph")
    inputs = {v.name for v in graph.inputs}
    producer: dict[str, int] = {}
    nodes = list(graph)
    for i, node in enumerate(nodes):
        for v in node.outputs:
            if v.name:
                producer[v.name] = i
    from_inputs = [a for a in activations if a in inputs and a not in producer]
    wanted = [a for a in activations if a in producer]
    plan.from_inputs = from_inputs
    if not wanted:
        return plan
    reads = [_reads(n) for n in nodes]
    # the nodes the activations depend on
    needed, keep = set(wanted), [False] * len(nodes)
    for i in range(max(producer[a] for a in wanted), -1, -1):
        if any(v.name in needed for v in nodes[i].outputs):
            keep[i] = True
            needed |= reads[i]
    inits = graph.initializers
    act_at: dict[int, list[str]] = {}
    for a in wanted:
        act_at.setdefault(producer[a], []).append(a)
    segments: list[Segment] = []
    current, seen_inits, size = [], set(), 0
    for i, node in enumerate(nodes):
        if not keep[i]:
            continue
        current.append(i)
        for name in reads[i]:
            if name in inits and name not in seen_inits:
                seen_inits.add(name)
                tensor = inits[name].const_value
                size += tensor.nbytes if tensor is not None else 0
        if i in act_at and (size >= budget or i == max(act_at)):
            segments.append(current)
            current, seen_inits, size = [], set(), 0
    # inputs and outputs of each segment, from the later segments' reads
    later_reads: set[str] = set()
    seg_reads = [set().union(*(reads[i] for i in seg)) for seg in segments]
    seg_made = [{v.name for i in seg for v in nodes[i].outputs if v.name} for seg in segments]
    for s in range(len(segments) - 1, -1, -1):
        members = seg_reads[s] & set(inits)
        tensors = {n: inits[n].const_value for n in sorted(members) if inits[n].const_value is not None}
        seg = Segment([ir.serde.serialize_node(nodes[i]) for i in segments[s]], tensors,
                      weight_bytes=sum(x.nbytes for x in tensors.values()))
        seg.activations = [a for a in wanted if a in seg_made[s]]
        seg.outputs = sorted(set(seg.activations) | (seg_made[s] & later_reads))
        seg.inputs = sorted(seg_reads[s] - seg_made[s] - set(inits))
        later_reads |= seg_reads[s]
        plan.segments.insert(0, seg)
    return plan


def segment_session(plan: Plan, seg: Segment, types: dict[str, Any], sess_options: Any) -> Any:
    """An onnxruntime session computing ``seg.outputs`` from ``seg.inputs``.

    ``types``: an array per input name, which gives the input's element type (shapes are left
    open). Only this segment's initializers are serialised; external ones stay file references.
    Where that cannot be (external data in several folders, over 2 GB in memory), the segment
    goes through :func:`ort_wq.model_io.inference_session`, which saves it to a temporary folder.
    """
    import onnx
    import onnxruntime as ort

    from ort_wq.model_io import fits_in_memory, inference_session

    proto = onnx.ModelProto(ir_version=plan.ir_version, producer_name="ort-wq calibration")
    g = proto.graph
    g.name = f"{plan.name}_segment"
    g.node.extend(seg.nodes)
    for name in seg.inputs:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(types[name]).dtype)
        g.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    g.output.extend(onnx.ValueInfoProto(name=n) for n in seg.outputs)
    for domain, version in plan.opsets.items():
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    proto.functions.extend(plan.functions)
    tensors = seg.initializers
    if not fits_in_memory(tensors.values(), sess_options):
        for name, tensor in tensors.items():  # graph inputs first, made initializers in the IR
            g.input.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), None))
        model = ir.serde.deserialize_model(proto)
        del proto, g
        for value in [v for v in model.graph.inputs if v.name in tensors]:
            model.graph.inputs.remove(value)
            value.const_value = tensors[value.name]
            model.graph.register_initializer(value)
        return inference_session(model, sess_options)
    g.initializer.extend(ir.serde.serialize_tensor(t) for t in tensors.values())
    data = proto.SerializeToString()
    del proto, g
    return ort.InferenceSession(data, sess_options, providers=["CPUExecutionProvider"])
