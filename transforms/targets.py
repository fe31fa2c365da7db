"""Which constant tensors are quantized, and which nodes read them: the one home of that decision.

``OPS`` is a small table per consumer op type: which input holds the weight, whether that input
is ``W[K, N]`` or its transpose ``[N, K]`` (a Gather table ``[V, K]`` is a transposed head
weight, so a tied embedding and head quantize along the same axis into the same codes), and what
disqualifies the node. :func:`find_targets` walks every graph once and returns a :class:`TargetSet`:

- one :class:`Target` per distinct constant tensor (and orientation), with every consumer that
  reads it (directly or through a 2-D ``Transpose``) and the :class:`QuantSpec` resolved from all
  of their names: an override that names the head of a tied table applies to its embedding too;
- one :class:`~ort_wq.report.SkippedNode` per candidate that is not converted, with its reason.

The rules, the pass's report, ``ort-wq inspect``, calibration and AWQ all ask this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from ort_wq.algorithms import QuantSpec
from ort_wq.config import OP_TYPES, WeightOnlyConfig
from ort_wq.report import SkippedNode

from ._weights import WeightRef, const_tensor, domain_of, gemm_reason, transposed_source, weight_ref


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _trans_b(node: ir.Node) -> bool:
    return bool(_attr(node, "transB", 0))


def _fused_matmul_reason(node: ir.Node) -> str:
    alpha = float(_attr(node, "alpha", 1.0))
    if alpha != 1.0:
        return f"FusedMatMul with alpha={alpha} is not supported (only 1)"
    for name in ("transA", "transBatchA", "transBatchB"):
        if _attr(node, name, 0):
            return f"FusedMatMul with {name}=1 is not supported"
    return ""


def _gather_reason(node: ir.Node) -> str:
    axis = int(_attr(node, "axis", 0))
    return "" if axis == 0 else f"Gather along axis {axis} is not supported (only 0)"


@dataclass(frozen=True)
class OpKind:
    """One row of the table: how a consumer op reads its weight."""

    op_type: str
    weight_input: int
    transposed: Callable[[ir.Node], bool]  # the input holds [N, K] (W transposed)
    reason: Callable[[ir.Node], str]  # '' when the node can read a quantized weight
    activation_input: int | None  # the input whose statistics calibration collects
    embedding: bool = False  # reads rows of a table (Gather): only float constants are candidates


OPS: dict[tuple[str, str], OpKind] = {
    ("", "MatMul"): OpKind("MatMul", 1, lambda n: False, lambda n: "", 0),
    ("", "Gemm"): OpKind("Gemm", 1, _trans_b, gemm_reason, 0),
    ("com.microsoft", "FusedMatMul"): OpKind("FusedMatMul", 1, _trans_b, _fused_matmul_reason, 0),
    ("", "Gather"): OpKind("Gather", 0, lambda n: True, _gather_reason, None, embedding=True),
}
assert {k.op_type for k in OPS.values()} == set(OP_TYPES), "config.OP_TYPES and the table disagree"
GATHER_BITS = (4, 8)  # GatherBlockQuantized on uint8 data
NOT_A_CANDIDATE = "not a weight consumer"  # lookup()'s reason for nodes the table does not take (a Gather of shapes)


def kind_of(node: ir.Node) -> OpKind | None:
    return OPS.get((domain_of(node), node.op_type))


@dataclass
class Consumer:
    """A node that reads a target's tensor."""

    node: ir.Node
    kind: OpKind
    ref: WeightRef

    @property
    def activation(self) -> ir.Value | None:
        i = self.kind.activation_input
        return self.node.inputs[i] if i is not None and i < len(self.node.inputs) else None


@dataclass
class Target:
    """One constant tensor to quantize once, with every consumer that will read the result."""

    ref: WeightRef
    consumers: list[Consumer] = field(default_factory=list)
    spec: QuantSpec | None = None
    algorithm: str = "rtn"
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Names an override pattern is matched against: the tensor's and its consumers'."""
        out = [self.ref.value.name or ""]
        out += [c.node.name or "" for c in self.consumers]
        return [n for n in dict.fromkeys(out) if n]

    @property
    def stats_consumer(self) -> Consumer | None:
        """The consumer whose input's calibration statistics the tensor's algorithm reads (the first
        that has an activation input)."""
        return next((c for c in self.consumers if c.activation is not None), None)

    @property
    def activation(self) -> ir.Value | None:
        """The activation whose calibration statistics the tensor's algorithm reads."""
        c = self.stats_consumer
        return c.activation if c is not None else None

    @property
    def gathered(self) -> bool:
        return any(c.kind.embedding for c in self.consumers)

    @property
    def multiplied(self) -> bool:
        return any(not c.kind.embedding for c in self.consumers)


@dataclass
class TargetSet:
    """Everything :func:`find_targets` decided for one model."""

    targets: list[Target] = field(default_factory=list)
    skipped: list[SkippedNode] = field(default_factory=list)
    main: ir.Graph | None = None
    _by_node: dict[int, tuple[Consumer, Target]] = field(default_factory=dict)
    _reasons: dict[int, str] = field(default_factory=dict)

    def lookup(self, node: ir.Node) -> tuple[Consumer | None, Target | None, str]:
        """``(consumer, target, '')`` for a node to convert, else ``(None, None, reason)``."""
        hit = self._by_node.get(id(node))
        if hit is not None:
            return hit[0], hit[1], ""
        return None, None, self._reasons.get(id(node), NOT_A_CANDIDATE)

    def activations(self) -> dict[str, int]:
        """Activation value name -> K, for every main-graph consumer with an activation input."""
        out: dict[str, int] = {}
        for t in self.targets:
            for c in t.consumers:
                x = c.activation
                if x is not None and x.name and c.node.graph is self.main:
                    out[x.name] = t.ref.k
        return out

    def calibrated(self) -> dict[str, tuple[int, int]]:
        """Activation name -> ``(K, readers)`` for the main-graph activations whose statistics an
        algorithm will read, ``readers`` being the number of tensors that read them."""
        from ort_wq.algorithms import get_algorithm

        out: dict[str, tuple[int, int]] = {}
        for t in self.targets:
            c = t.stats_consumer
            x = t.activation
            if x is None or not x.name or c.node.graph is not self.main:
                continue
            if get_algorithm(t.algorithm)[1]:
                k, readers = out.get(x.name, (t.ref.k, 0))
                out[x.name] = (k, readers + 1)
        return out


def weight_of(node: ir.Node, kind: OpKind, config: WeightOnlyConfig) -> tuple[WeightRef | None, str]:
    """The constant weight a consumer reads, seen through a 2-D ``Transpose``; or the reason not."""
    reason = kind.reason(node)
    if reason:
        return None, reason
    w = node.inputs[kind.weight_input] if kind.weight_input < len(node.inputs) else None
    transpose = kind.transposed(node)
    ref, reason = weight_ref(w, transpose, config.min_k, config.min_n)
    if ref is None:
        src = transposed_source(w)
        if src is not None:
            ref, reason2 = weight_ref(src, not transpose, config.min_k, config.min_n)
            reason = reason if ref is None and not reason2 else reason2
    if ref is None:
        return None, reason
    if config.format == "fpq4" and not kind.embedding and ref.dtype != ir.DataType.FLOAT:
        return None, "MatMulFpQ4 takes float32 weights only (use format nbits for float16)"
    return ref, ""


def _is_candidate(node: ir.Node, kind: OpKind) -> bool:
    """Gathers count only when they read a float constant table (not shapes, not ids)."""
    if not kind.embedding:
        return True
    w = node.inputs[kind.weight_input] if node.inputs else None
    src = transposed_source(w) or w
    tensor, _ = const_tensor(src)
    return tensor is not None and tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                                                    ir.DataType.DOUBLE)


def find_targets(model: ir.Model, config: WeightOnlyConfig) -> TargetSet:
    """Every quantizable tensor with its consumers, and every candidate left out with its reason."""
    result = TargetSet(main=model.graph)
    by_key: dict[tuple[int, bool], Target] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            kind = kind_of(node)
            if kind is None or not _is_candidate(node, kind):
                continue
            ref, reason = weight_of(node, kind, config)
            if ref is not None:
                names = [node.name or "", ref.value.name or ""]
                reason = config.selected(names, kind.op_type) or ""
            if reason:
                w = node.inputs[kind.weight_input] if kind.weight_input < len(node.inputs) else None
                result.skipped.append(SkippedNode(node.name or "", node.op_type, reason, (w.name or "") if w else ""))
                result._reasons[id(node)] = reason
                continue
            key = (id(ref.value), ref.transpose)
            target = by_key.get(key)
            if target is None:
                target = by_key[key] = Target(ref)
                result.targets.append(target)
            consumer = Consumer(node, kind, ref)
            target.consumers.append(consumer)
            result._by_node[id(node)] = (consumer, target)
    for target in result.targets:
        target.spec, target.notes = resolve_spec(target, config)
        target.algorithm = algorithm_for(target, config)[0]
    return result


def algorithm_for(target: Target, config: WeightOnlyConfig) -> tuple[str, list[str]]:
    """The algorithm that quantizes ``target``: the configured one, or rtn where an error-compensating
    algorithm (GPTQ) would fit a head's outputs by moving error into the rows a Gather reads as
    they are (measured: worse logits than rtn on a tied LM)."""
    from ort_wq.algorithms.base import compensates_error

    name = config.algorithm
    if target.gathered and compensates_error(name):
        return "rtn", [f"read by a Gather: the rows themselves must be accurate, {name} replaced by rtn"]
    return name, []


def with_zero_points(spec: QuantSpec, algorithm: str, config: WeightOnlyConfig) -> QuantSpec:
    """Float zero points only where asked (``zero_points='float'``) or where ``auto`` and the
    algorithm optimises them (HQQ); else uint8."""
    from ort_wq.algorithms.base import uses_float_zero_points

    if spec.float_zero_points and config.zero_points == "auto" and not uses_float_zero_points(algorithm):
        return replace(spec, float_zero_points=False)
    return spec


def resolve_spec(target: Target, config: WeightOnlyConfig) -> tuple[QuantSpec, list[str]]:
    """The spec of one tensor, from all its consumers' names, adjusted to what they can all read."""
    k = target.ref.k
    algorithm, notes = algorithm_for(target, config)
    spec = with_zero_points(config.spec_for(target.names, k), algorithm, config)
    top = max(16, 1 << max(0, k - 1).bit_length())
    if spec.block_size > top and config.format != "fpq4":  # MatMulFpQ4's blocks are 32, whatever K
        notes.append(f"block size {spec.block_size} is larger than K={k}: using {top}")
        spec = replace(spec, block_size=top)
    if target.gathered:
        if spec.bits not in GATHER_BITS:
            bits = min(b for b in GATHER_BITS if b >= spec.bits)
            why = "GatherBlockQuantized reads 4 or 8 bits"
            notes.append(f"{why}: {bits}-bit instead of {spec.bits}-bit"
                         + (" for the table and its MatMul (one shared copy is smaller than two)" if target.multiplied else ""))
            spec = replace(spec, bits=bits)
        if spec.float_zero_points and not spec.symmetric:
            if config.zero_points == "float":
                notes.append("GatherBlockQuantized reads uint8 zero points: float zero points not used for this table")
            spec = replace(spec, float_zero_points=False)
        if config.format == "fpq4" and target.multiplied:
            notes.append("MatMulFpQ4's blob cannot be read by GatherBlockQuantized: the table is stored twice "
                         "(4-bit each, still smaller than one float copy)")
    return spec, notes
