"""The onnx_ir pass: run the weight-only rules on a model, finish the quantized initializers,
clean up what the rewrite left unused, and report every MatMul/Gemm that was not converted.

Usable in an ``ir.passes.PassManager`` (e.g. on ``torch.onnx.export(..., dynamo=True).model``).
"""

from __future__ import annotations

import time
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from ort_wq.algorithms import LayerStats
from ort_wq.config import WeightOnlyConfig
from ort_wq.report import QuantReport, SkippedNode

from ._base import resolve_weight
from ._context import QuantContext
from ._weights import gemm_reason
from .opset import ensure_opset
from .rule_set import rules


class WeightOnlyQuantPass(ir.passes.InPlacePass):
    """Quantize the constant weights of MatMul/Gemm nodes in place.

    After the pass, ``last_report`` holds a :class:`~ort_wq.report.QuantReport`.
    """

    def __init__(
        self,
        config: WeightOnlyConfig | None = None,
        *,
        stats: dict[str, LayerStats] | None = None,
        progress: bool = False,
        sink: Any = None,
    ) -> None:
        super().__init__()
        self.sink = sink
        self.config = config or WeightOnlyConfig()
        self.stats = stats
        self.progress = progress
        self.last_report: QuantReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        ctx = QuantContext(self.config, self.stats, sink=self.sink)
        ctx.setup(model)
        if self.config.format == "qdq":
            from .emit_qdq import MIN_OPSET

            ensure_opset(model, MIN_OPSET)
        try:
            if self.config.algorithm == "awq" and self.stats:
                from .awq_fold import fold_awq_scales

                ctx.node_notes.update(fold_awq_scales(model, self.config, self.stats, ctx))
            count = rules(self.config, context=ctx).apply_to_model(model)
            ctx.materialize(progress=self.progress)
        finally:
            ctx.shutdown()
        if count:
            if "com.microsoft" not in model.opset_imports and ctx.emitter.OP_TYPE.startswith("MatMul"):
                model.opset_imports["com.microsoft"] = 1
            RemoveUnusedNodesPass()(model)
            _remove_unused_subgraph_initializers(model)
            RemoveUnusedOpsetsPass()(model)
        ctx.report.skipped.extend(skipped_nodes(model, ctx))
        ctx.report.seconds = time.perf_counter() - start
        self.last_report = ctx.report
        return ir.passes.PassResult(model, modified=count > 0)


def skipped_nodes(model: ir.Model, ctx: QuantContext) -> list[SkippedNode]:
    """Every MatMul/Gemm still in the model, with the reason it was not converted."""
    out = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
                continue
            if ctx.config.format == "qdq" and _fed_by_dequantize(node):
                continue  # our own QDQ output (or an already quantized model)
            reason = gemm_reason(node) if node.op_type == "Gemm" else ""
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if not reason:
                trans = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
                w = node.inputs[1] if len(node.inputs) > 1 else None
                _, reason = resolve_weight(node, w, bool(trans), ctx)
            weight = w.name if w is not None else ""
            out.append(SkippedNode(node.name or "", node.op_type, reason or "not matched", weight or ""))
    return out


def _fed_by_dequantize(node: ir.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    producer = w.producer() if w is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    for graph in model.graph.subgraphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
