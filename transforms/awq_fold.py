"""AWQ's activation scaling on the graph: ``X @ W == (X / s) @ (diag(s) W)``.

For each calibrated activation ``X`` whose every consumer is a quantizable MatMul/Gemm, AWQ
searches one per-channel scale ``s`` over all those weights together; the weights' rows are
multiplied by ``s`` and ``1 / s`` is folded into the producer of ``X`` where that is exact:

- ``LayerNormalization`` (scale and bias), ``RMSNormalization`` / ``SimplifiedLayerNormalization``
  (scale), com.microsoft ``SkipSimplifiedLayerNormalization`` (``gamma``, input 2: the pre-norm
  LLMs of the onnxruntime-genai builder) and ``SkipLayerNormalization`` (``gamma``, ``beta``):
  only their normalised output 0 changes, not the residual sum (output 3),
- ``Mul`` by a constant broadcast along the last axis (also the RMSNorm of torch's dynamo export,
  ``Mul(weight, Mul(x, rsqrt(mean(x^2) + eps)))``),
- a ``MatMul`` / ``Gemm`` with a constant weight (its output columns), with its ``Add`` bias.

Anything else (the activation also feeds another op, a shared or transposed weight, a producer
that is not linear per channel) is left unscaled: those nodes get AWQ's clip search only, and
the report says why. New tensors are written as new initializers: the input model's (possibly
memory-mapped) weights are never modified.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import LayerStats, get_algorithm
from ort_wq.config import WeightOnlyConfig
from ort_wq.model_io import release

from ._context import QuantContext
from ._weights import WeightRef, const_tensor, domain_of, gemm_reason
from .norms import channel_inputs, shape_reason
from .targets import Target


def _sole_const(value: ir.Value | None, k: int, axis_last: bool = True) -> str:
    """'' when ``value`` is a constant used once whose shape broadcasts along the last axis to K."""
    tensor, reason = const_tensor(value)
    if tensor is None:
        return reason
    if len(list(value.uses())) != 1:
        return f"constant {value.name!r} is shared"
    return shape_reason(value, tensor, k) if axis_last else ""


def _plan_producer(x: ir.Value, k: int) -> tuple[list[tuple[ir.Node, int, str]], str]:
    """How to fold ``1/s`` into the producer of ``x``: ``[(node, input index, how)]`` or a reason."""
    node, inputs, every, reason = channel_inputs(x)
    if reason:
        return [], reason
    if every:  # a norm: each per-channel constant is scaled
        for idx in inputs:
            why = _sole_const(node.inputs[idx], k)
            if why:
                return [], why
        return [(node, idx, "vector") for idx in inputs], ""
    if inputs:  # a Mul: either operand
        for idx in inputs:
            if not _sole_const(node.inputs[idx], k):
                return [(node, idx, "vector")], ""
        return [], "Mul has no constant per-channel operand"
    key = (domain_of(node), node.op_type)
    if key == ("", "Add"):
        for idx in (1, 0):
            mm_val, b = node.inputs[1 - idx], node.inputs[idx]
            mm = mm_val.producer() if mm_val is not None else None
            if mm is not None and mm.op_type == "MatMul" and not _sole_const(b, k) and len(list(mm_val.uses())) == 1:
                plan, why = _plan_matmul_columns(mm, k)
                if not why:
                    return [*plan, (node, idx, "vector")], ""
        return [], "Add is not a constant bias after a MatMul with a constant weight"
    if key == ("", "MatMul"):
        return _plan_matmul_columns(node, k)
    if key == ("", "Gemm") and not gemm_reason(node):
        trans_b = "transB" in node.attributes and node.attributes["transB"].as_int()
        why = _sole_const(node.inputs[1], k, axis_last=False)
        if why:
            return [], why
        plan = [(node, 1, "rows" if trans_b else "columns")]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            why = _sole_const(node.inputs[2], k)
            if why:
                return [], why
            plan.append((node, 2, "vector"))
        return plan, ""
    return [], f"producer {node.op_type} cannot absorb a per-channel scale"


def _plan_matmul_columns(node: ir.Node, k: int) -> tuple[list[tuple[ir.Node, int, str]], str]:
    tensor, reason = const_tensor(node.inputs[1])
    if tensor is None:
        return [], f"producer MatMul: {reason}"
    dims = [int(d) for d in tensor.shape]
    if len(dims) < 2 or dims[-1] != k or len(list(node.inputs[1].uses())) != 1:
        return [], "producer MatMul weight is shared or not [*, K]"
    return [(node, 1, "columns")], ""


def _replace_const(node: ir.Node, idx: int, how: str, s: np.ndarray, inverse: bool, ctx: QuantContext) -> None:
    old = node.inputs[idx]
    tensor, _ = const_tensor(old)
    factor = (1.0 / s if inverse else s).astype(np.float64)

    def scaled() -> np.ndarray:
        arr = np.asarray(tensor.numpy())
        # "rows": along axis -2 (the K of a [.., K, N] weight); "columns" / "vector": the last axis
        out = (arr * factor[:, None] if how == "rows" else arr * factor).astype(arr.dtype)
        del arr
        release(tensor)  # the memory map of the original goes once the scaled copy exists
        return out

    name = ctx.unique_name(f"{old.name}_awq")
    # a weight is scaled when it is read (by its quantization job): no scaled copy of every
    # weight is held between the fold and the rewrite
    new = ir.Tensor(scaled(), name=name) if how == "vector" else ir.LazyTensor(
        lambda: ir.Tensor(scaled()), dtype=tensor.dtype, shape=ir.Shape(tensor.shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=new)
    graph = node.graph
    graph.register_initializer(value)
    node.replace_input_with(idx, value)


def _for_clip_search(layer: LayerStats, x: ir.Value, ctx: QuantContext) -> LayerStats:
    """What each weight's clip search still reads after the fold: the diagonal blocks of ``H``
    (when all the activation's weights share one block size), not the whole ``K x K``."""
    sizes = {t.spec.block_size for t in ctx.targets.targets if t.activation is x}  # the readers (TargetSet.calibrated)
    return layer.compact(sizes.pop()) if len(sizes) == 1 else layer


def _targets(x: ir.Value, ctx: QuantContext) -> tuple[list[tuple[ir.Node, WeightRef, Target]], str]:
    """The quantized consumers of activation ``x`` (from the target finder), or why it cannot be scaled."""
    out = []
    for use in x.uses():
        node = use.node
        consumer, target, reason = ctx.targets.lookup(node)
        if consumer is None:
            return [], f"the activation also feeds {node.op_type} {node.name!r} ({reason})"
        if consumer.activation is not x or use.idx != consumer.kind.activation_input:
            return [], f"the activation is not the data input of {node.name!r}"
        ref = consumer.ref
        w_input = node.inputs[consumer.kind.weight_input]
        if ref.value is not w_input or len(target.consumers) != 1 or len(list(ref.value.uses())) != 1:
            return [], f"weight of {node.name!r} is shared or transposed"
        out.append((node, ref, target))
    return out, ""


def fold_awq_scales(model: ir.Model, config: WeightOnlyConfig, stats: dict[str, LayerStats],
                    ctx: QuantContext) -> dict[str, list[str]]:
    """Scale weights and fold ``1/s`` into producers; updates ``stats`` to the scaled activations.

    Returns notes per node name (for the report).
    """
    awq, _ = get_algorithm("awq")
    notes: dict[str, list[str]] = {}
    if not config.algorithm_options.get("allow_input_scale", True):
        return notes  # clip search only (each weight is quantized with allow_input_scale=False)
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    for name in list(stats):  # in model order: calibration runs only as far as the layer folded
        x = values.get(name)
        if x is None:
            continue
        layer = stats[name]
        if layer.rows == 0:
            continue
        targets, why = _targets(x, ctx)
        plan: list = []
        if targets:
            plan, why = _plan_producer(x, layer.k)
        if not targets or why:
            for use in x.uses():
                notes.setdefault(use.node.name or "", []).append(f"awq: input scaling not foldable ({why}): clip search only")
            stats[name] = _for_clip_search(layer, x, ctx)
            continue
        w_cat = np.concatenate([ref.numpy().astype(np.float32) for _, ref, _ in targets], axis=1)
        for _, ref, _ in targets:
            release(ref.tensor)
        spec = targets[0][2].spec
        options = {k: v for k, v in config.algorithm_options.items() if k != "clip"}
        result = awq(w_cat, replace(spec, float_zero_points=False), layer, **options, clip=False)
        s = np.asarray(result.input_scale, dtype=np.float64)
        for node, idx, how in plan:
            _replace_const(node, idx, how, s, inverse=True, ctx=ctx)
        for node, ref, _ in targets:
            _replace_const(node, 1, "columns" if ref.transpose else "rows", s, inverse=False, ctx=ctx)
            producer = x.producer()
            notes.setdefault(node.name or "", []).append(
                f"awq: input scale folded into {producer.op_type} {producer.name!r} ({result.notes[0] if result.notes else ''})")
        scaled = LayerStats(layer.k, xtx=layer.xtx / np.outer(s, s).astype(np.float32), abs_sum=layer.abs_sum / s,
                            rows=layer.rows)
        stats[name] = _for_clip_search(scaled, x, ctx)
        del layer, scaled
    return notes
