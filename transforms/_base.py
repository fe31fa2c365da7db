"""The common shape of the weight-only rules: look the consumer up in the targets, quantize, emit."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from . import _emitters
from ._context import QuantContext
from .targets import Consumer, Target


class WeightOnlyRule(RewriteRuleClassBase):
    """Base for rules that replace a weight consumer with a quantized equivalent.

    Subclasses implement ``pattern`` and, where the match needs more than the target finder's
    verdict, ``analyze(consumer, **bindings) -> reason`` ('' to go on). ``consumer(root, ...)``
    picks the node that reads the weight (the pattern's root unless overridden). Whether a node's
    weight is quantized, and how, is decided once per model by ``targets.find_targets``.
    """

    def __init__(self, ctx: QuantContext, name: str | None = None) -> None:
        super().__init__(name=name or type(self).__name__)
        self.ctx = ctx
        self._consumer: Consumer | None = None
        self._target: Target | None = None

    def consumer(self, root: ir.Node, **bindings) -> ir.Node:
        return root

    def analyze(self, consumer: Consumer, **bindings) -> str:
        return ""

    def check(self, context, **bindings) -> MatchResult:
        result = MatchResult()
        self.ctx.ensure_setup(context.model)
        node = self.consumer(context.root, **bindings)
        consumer, target, reason = self.ctx.targets.lookup(node)
        if consumer is None:
            return result.fail(reason)
        reason = self.analyze(consumer, **bindings)
        if reason:
            return result.fail(reason)
        self._consumer, self._target = consumer, target
        return result

    def named(self, output: ir.Value, main: ir.Value | None = None) -> ir.Value:
        """Name the new nodes behind ``output`` after the node they replace, as onnxruntime's quantizer
        does: ``<name>_Q4`` for the node computing ``main`` (default ``output``), ``<name>_Q4/<op>``
        for the others."""
        node = self._consumer.node if self._consumer is not None else None
        base = f"{(node.name if node is not None else '') or 'weight_only'}_Q{self._target.spec.bits}"
        root = (main if main is not None else output).producer()
        todo = [output.producer()]
        while todo:
            new = todo.pop()
            if new is None or new.name or new.graph is not None:
                continue
            new.name = self.ctx.unique_name(base if new is root else f"{base}/{new.op_type}")
            todo.extend(v.producer() for v in new.inputs if v is not None)
        return output

    def emitted(self):
        """``(emitter, values, entry)`` for the matched consumer; records it in the report."""
        consumer, target = self._consumer, self._target
        assert consumer is not None and target is not None
        entry = self.ctx.entry_for(target)
        emitter, storage = _emitters.for_consumer(consumer.kind.embedding, self.ctx.config.format)
        op_type = getattr(emitter, "GATHER_OP_TYPE", None) if consumer.kind.embedding else None
        self.ctx.record(consumer.node, op_type or emitter.OP_TYPE, entry)
        return emitter, entry.values[storage], entry

    def emit_matmul(self, op, x, bias=None, add=None):
        """``x @ W (+ bias)`` in the configured format (``+ add`` as its own node), named after the
        replaced node. ``bias``: a constant of ``N`` values (reshaped to ``[N]`` unless it is), only
        for an emitter that ``SUPPORTS_BIAS`` (the rules check)."""
        emitter, values, entry = self.emitted()
        ref, level = entry.ref, self.ctx.config.accuracy_level
        if bias is not None:
            shape = [int(d) for d in bias.shape] if bias.shape is not None else None
            if shape != [ref.n]:
                bias = op.Reshape(bias, op.Constant(value_ints=[ref.n]))
        y = emitter.emit(op, x, values, entry.spec, ref.k, ref.n, bias, level)
        return self.named(y if add is None else op.Add(y, add), main=y)
