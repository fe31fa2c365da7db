"""``rules(config)``: the weight-only rules as one onnxscript ``RewriteRuleSet``."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RULE_NAME_TAG, RewriteRuleSet

from ort_wq.config import WeightOnlyConfig

from ._context import QuantContext
from .fused_matmul import FusedMatMulWeightOnly
from .gather import GatherWeightOnly
from .gemm import GemmWeightOnly
from .matmul import MatMulWeightOnly
from .matmul_add import MatMulAddWeightOnly


class WeightOnlyRuleSet(RewriteRuleSet):
    """The rules, leaving the rest of the graph as it was written.

    onnxscript tags every node a rule writes with ``pkg.onnxscript.rewriter.rule_name`` (about 50
    bytes per quantized node in the file; the report says what was converted) and, after any
    rewrite, names every unnamed node and unused optional output (``v``, ``v_1``, ...): both are
    undone here, so the output differs from the input only where weights were quantized.
    """

    def apply_to_model(self, model: ir.Model, **kwargs) -> int:
        graphs = [model.graph, *model.graph.subgraphs(), *(f.graph for f in model.functions.values())]
        unnamed_nodes = [(n, n.name) for g in graphs for n in g if not n.name]
        unnamed_outputs = [(v, v.name) for g in graphs for n in g for v in n.outputs if not v.name]
        count = super().apply_to_model(model, **kwargs)
        if count:
            names = {r.name for r in self.rules if r.name}
            for graph in graphs:
                for node in graph:
                    if node.metadata_props.get(RULE_NAME_TAG) in names:
                        del node.metadata_props[RULE_NAME_TAG]
            for node, name in unnamed_nodes:
                node.name = name
            for value, name in unnamed_outputs:
                if not value.uses() and not value.is_graph_output():
                    value.name = name
        return count


def rules(config: WeightOnlyConfig | None = None, *, context: QuantContext | None = None) -> RewriteRuleSet:
    """The rule set for ``config`` (default :class:`WeightOnlyConfig`).

    Use with ``onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=rules(cfg))``; the
    quantized initializers are computed in the background and filled in when first read.
    ``WeightOnlyQuantPass`` adds clean-up and a report on top. With a ``context`` already set up
    on a model, only the rules for the op types its targets are read by are included (each rule
    costs a match attempt per node).
    """
    ctx = context or QuantContext(config or WeightOnlyConfig())
    by_op = {"MatMul": [*MatMulAddWeightOnly.rule(ctx).commute(), MatMulWeightOnly.rule(ctx)],
             "Gemm": [GemmWeightOnly.rule(ctx)], "FusedMatMul": [FusedMatMulWeightOnly.rule(ctx)],
             "Gather": [GatherWeightOnly.rule(ctx)]}
    if context is not None and context._model_id is not None:  # set up: its targets are known
        present = {c.kind.op_type for t in ctx.targets.targets for c in t.consumers}
        by_op = {op: r for op, r in by_op.items() if op in present} or by_op  # (a rule set is never empty)
    return WeightOnlyRuleSet([r for group in by_op.values() for r in group])
