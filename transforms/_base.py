"""The common shape of the weight-only rules: find the weight, check it, quantize, emit."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from ._context import QuantContext
from ._weights import WeightRef, names_of, transposed_source, weight_ref


def resolve_weight(node: ir.Node, w: ir.Value | None, transpose: bool, ctx: QuantContext) -> tuple[WeightRef | None, str]:
    """The constant weight of a MatMul/Gemm, seen through a 2-D ``Transpose``; or the reason not."""
    cfg = ctx.config
    ref, reason = weight_ref(w, transpose, cfg.min_k, cfg.min_n)
    if ref is None:
        src = transposed_source(w)
        if src is not None:
            ref, reason2 = weight_ref(src, not transpose, cfg.min_k, cfg.min_n)
            reason = reason if ref is None and not reason2 else reason2
    if ref is None:
        return None, reason
    if cfg.format == "fpq4" and ref.dtype != ir.DataType.FLOAT:
        return None, "MatMulFpQ4 takes float32 weights only (use format nbits for float16)"
    why = cfg.selected(names_of(node, ref.value), node.op_type)
    if why:
        return None, why
    return ref, ""


class WeightOnlyRule(RewriteRuleClassBase):
    """Base for rules that replace a weight consumer with a quantized equivalent.

    Subclasses implement ``pattern`` and ``analyze(node, **bindings) -> (ref, reason)``, where
    ``node`` is the weight's consumer (``consumer``: the pattern's root unless overridden); the
    shared ``check`` keeps the analysis for ``rewrite`` (they run back to back on one match).
    """

    def __init__(self, ctx: QuantContext, name: str | None = None) -> None:
        super().__init__(name=name or type(self).__name__)
        self.ctx = ctx
        self._node: ir.Node | None = None
        self._ref: WeightRef | None = None

    def consumer(self, root: ir.Node, **bindings) -> ir.Node:
        return root

    def analyze(self, node: ir.Node, **bindings) -> tuple[WeightRef | None, str]:
        raise NotImplementedError

    def check(self, context, **bindings) -> MatchResult:
        result = MatchResult()
        self.ctx.ensure_setup(context.model)
        node = self.consumer(context.root, **bindings)
        ref, reason = self.analyze(node, **bindings)
        if ref is None:
            return result.fail(reason)
        self._node, self._ref = node, ref
        return result

    def named(self, output: ir.Value) -> ir.Value:
        """Name the new nodes behind ``output`` after the node they replace (``<name>/<op>``)."""
        base = (self._node.name if self._node is not None else "") or "weight_only"
        todo = [output.producer()]
        while todo:
            node = todo.pop()
            if node is None or node.name or node.graph is not None:
                continue
            node.name = self.ctx.unique_name(f"{base}/{node.op_type}")
            todo.extend(v.producer() for v in node.inputs if v is not None)
        return output

    def quantized(self, activation: ir.Value):
        """``(entry, spec)`` for the weight found by ``check``."""
        node, ref = self._node, self._ref
        assert node is not None and ref is not None
        spec = self.ctx.config.spec_for(names_of(node, ref.value), ref.k)
        entry = self.ctx.entry_for(ref, spec, activation)
        self.ctx.record(node, entry.emitter.OP_TYPE, entry)
        return entry, entry.spec
