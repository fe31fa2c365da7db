"""``ort-wq inspect``: what in a model can be quantized, what already is, and why not."""

from __future__ import annotations

import os

import onnx_ir as ir

from .config import WeightOnlyConfig
from .model_io import load_model

_QUANT_OPS = {"MatMulNBits", "MatMulFpQ4"}


def _attrs(node: ir.Node) -> dict:
    return {k: (a.value if not isinstance(a.value, (ir.Graph, list)) else "...") for k, a in node.attributes.items()}


def inspect_rows(model: ir.Model, config: WeightOnlyConfig | None = None) -> list[dict]:
    """One row per MatMul/Gemm/quantized node: graph, node, op, weight, K, N, status."""
    from ort_wq.transforms._base import resolve_weight
    from ort_wq.transforms._context import QuantContext

    ctx = QuantContext(config or WeightOnlyConfig(min_k=1))
    rows = []
    for graph in (model.graph, *model.graph.subgraphs()):
        where = graph.name or ("main" if graph is model.graph else "subgraph")
        for node in graph:
            row = dict(graph=where, node=node.name or "<unnamed>", op=node.op_type, weight="", k="", n="", status="")
            if node.domain == "com.microsoft" and node.op_type in _QUANT_OPS:
                a = _attrs(node)
                row.update(weight=node.inputs[1].name if node.inputs[1] is not None else "")
                if node.op_type == "MatMulNBits":
                    row.update(k=a.get("K"), n=a.get("N"),
                               status=f"quantized: {a.get('bits', 4)}-bit block {a.get('block_size')}"
                               f"{' asym' if len(node.inputs) > 3 and node.inputs[3] is not None else ' sym'}"
                               f", accuracy_level {a.get('accuracy_level', 0)}")
                else:
                    row.update(status=f"quantized: 4-bit block 32, blk_quant_type {a.get('blk_quant_type', 1)}")
            elif node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
                w = node.inputs[1] if len(node.inputs) > 1 else None
                producer = w.producer() if w is not None else None
                if producer is not None and producer.op_type == "DequantizeLinear":
                    bs = _attrs(producer).get("block_size", 0)
                    row.update(weight=producer.inputs[0].name, status=f"quantized: QDQ block {bs}")
                else:
                    trans = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
                    ref, reason = resolve_weight(node, w, bool(trans), ctx)
                    if ref is not None:
                        row.update(weight=ref.value.name, k=ref.k, n=ref.n,
                                   status=f"quantizable ({ref.dtype.name.lower()})")
                    else:
                        row.update(weight=w.name if w is not None else "", status=f"not quantizable: {reason}")
            else:
                continue
            rows.append(row)
    return rows


def inspect_model(path: str | os.PathLike) -> str:
    """A text table for ``ort-wq inspect``."""
    model = load_model(path)
    rows = inspect_rows(model)
    if not rows:
        return "no MatMul, Gemm or quantized nodes found"
    cols = ["graph", "node", "op", "weight", "k", "n", "status"]
    widths = {c: min(48, max(len(c), *(len(str(r[c])) for r in rows))) for c in cols[:-1]}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  STATUS"]
    for r in rows:
        lines.append("  ".join(str(r[c])[:48].ljust(widths[c]) for c in cols[:-1]) + "  " + str(r["status"]))
    counts = {}
    for r in rows:
        key = r["status"].split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
