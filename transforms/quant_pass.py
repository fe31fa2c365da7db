"""The onnx_ir pass: run the weight-only rules on a model, finish the quantized initializers,
clean up what the rewrite left unused, and report every tensor quantized and every candidate
node that was not converted.

Usable in an ``ir.passes.PassManager`` (e.g. on ``torch.onnx.export(..., dynamo=True).model``).
"""

from __future__ import annotations

import time
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from ort_wq.algorithms import LayerStats
from ort_wq.config import WeightOnlyConfig
from ort_wq.packing import CONTRIB_OPS
from ort_wq.report import QuantizedTensor, QuantReport, SkippedNode, initializer_bytes, initializer_bytes_by_reader

from ._context import QuantContext, QuantEntry
from .opset import ensure_opset
from .rule_set import rules



class WeightOnlyQuantPass(ir.passes.InPlacePass):
    """Quantize the constant weights of MatMul/Gemm/FusedMatMul/Gather nodes in place.

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
        ctx.progress = self.progress
        ctx.setup(model)
        if self.config.format == "qdq":
            from .emit_qdq import MIN_OPSET

            ensure_opset(model, MIN_OPSET)
        try:
            if self.config.algorithm == "awq" and self.stats:
                from .awq_fold import fold_awq_scales

                ctx.node_notes.update(fold_awq_scales(model, self.config, self.stats, ctx))
                ctx.setup(model)  # the folded weights are new initializers
            targets = ctx.targets
            count = rules(self.config, context=ctx).apply_to_model(model)
            entries = ctx.entries()
            ctx.materialize(progress=self.progress)
        finally:
            ctx.shutdown()
        if count:
            if "com.microsoft" not in model.opset_imports and any(c.new_op in CONTRIB_OPS for c in ctx.report.converted):
                model.opset_imports["com.microsoft"] = 1
            RemoveUnusedNodesPass()(model)
            _remove_unused_subgraph_initializers(model)
            RemoveUnusedOpsetsPass()(model)
        report = ctx.report
        report.skipped.extend(targets.skipped)
        remaining = {id(n) for n in _nodes(model)}
        for target in targets.targets:
            for c in target.consumers:
                if id(c.node) in remaining:
                    report.skipped.append(SkippedNode(c.node.name or "", c.node.op_type, "not matched by the rules",
                                                      c.ref.value.name or ""))
        report.tensors.extend(_tensor_record(e, report) for e in entries)
        report.bytes_by_reader = initializer_bytes_by_reader(model)
        report.seconds = time.perf_counter() - start
        self.last_report = report
        return ir.passes.PassResult(model, modified=count > 0)


def _nodes(model: ir.Model):
    for graph in (model.graph, *model.graph.subgraphs()):
        yield from graph


def _tensor_record(entry: QuantEntry, report: QuantReport) -> QuantizedTensor:
    ref, spec, target = entry.ref, entry.spec, entry.target
    after = sum(initializer_bytes(v) for values in entry.values.values() for v in values.values())
    source = ref.value
    kept = ""
    if source.uses() or source.is_graph_output():
        readers = sorted({f"{u.node.op_type} {u.node.name!r}" for u in source.uses()})
        why = {s.node: s.reason for s in report.skipped}
        reasons = sorted({why.get(u.node.name or "", "") for u in source.uses()} - {""})
        kept = f"still read by {', '.join(readers) or 'a graph output'}" + (f" ({'; '.join(reasons)})" if reasons else "")
        after += ref.tensor.nbytes
    return QuantizedTensor(
        name=source.name or "", shape=[int(d) for d in ref.tensor.shape], bits=spec.bits, block_size=spec.block_size,
        symmetric=spec.symmetric, consumers=[f"{c.node.op_type} {c.node.name!r}" for c in target.consumers],
        bytes_before=ref.tensor.nbytes, bytes_after=after, float_kept=kept, notes=list(entry.notes),
    )


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    for graph in model.graph.subgraphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
