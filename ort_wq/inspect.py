"""``ort-wq inspect``: what in a model can be quantized, what already is, and why not.

The verdicts come from the target finder (``transforms/targets.py``) with the same settings
``ort-wq quantize`` would use, so a node called quantizable here is converted there. Sizes are
the model's initializers by the ops that read them (what is on disk).
"""

from __future__ import annotations

import os

import onnx_ir as ir

from .config import WeightOnlyConfig
from .model_io import load_model
from .report import _mb, format_by_reader, initializer_bytes_by_reader



def _attrs(node: ir.Node) -> dict:
    return {k: (a.value if not isinstance(a.value, (ir.Graph, list)) else "...") for k, a in node.attributes.items()}


def _quantized_status(node: ir.Node) -> dict:
    a = _attrs(node)
    w = node.inputs[0 if node.op_type == "GatherBlockQuantized" else 1]
    row = dict(weight=w.name if w is not None else "")
    if node.op_type == "MatMulNBits":
        zp = len(node.inputs) > 3 and node.inputs[3] is not None
        row.update(k=a.get("K"), n=a.get("N"), status=f"quantized: {a.get('bits', 4)}-bit block {a.get('block_size')}"
                   f"{' asym' if zp else ' sym'}, accuracy_level {a.get('accuracy_level', 0)}")
    elif node.op_type == "GatherBlockQuantized":
        zp = len(node.inputs) > 3 and node.inputs[3] is not None
        row.update(status=f"quantized: {a.get('bits', 4)}-bit block {a.get('block_size')}{' asym' if zp else ' sym'}")
    else:
        row.update(status=f"quantized: 4-bit block 32, blk_quant_type {a.get('blk_quant_type', 1)}")
    return row


def inspect_rows(model: ir.Model, config: WeightOnlyConfig | None = None) -> list[dict]:
    """One row per candidate or quantized node: graph, node, op, weight, K, N, status."""
    from ort_wq.packing import CONTRIB_OPS
    from ort_wq.transforms.targets import NOT_A_CANDIDATE, find_targets, kind_of

    found = find_targets(model, config or WeightOnlyConfig())
    rows = []
    for graph in (model.graph, *model.graph.subgraphs()):
        where = graph.name or ("main" if graph is model.graph else "subgraph")
        for node in graph:
            row = dict(graph=where, node=node.name or "<unnamed>", op=node.op_type, weight="", k="", n="", status="")
            kind = kind_of(node)
            if node.domain == "com.microsoft" and node.op_type in CONTRIB_OPS:
                row.update(_quantized_status(node))
            elif kind is None:
                continue
            else:
                consumer, target, reason = found.lookup(node)
                w = node.inputs[kind.weight_input] if kind.weight_input < len(node.inputs) else None
                producer = w.producer() if w is not None else None
                if consumer is not None:
                    spec = target.spec
                    shared = f", shared by {len(target.consumers)} nodes" if len(target.consumers) > 1 else ""
                    row.update(weight=consumer.ref.value.name, k=consumer.ref.k, n=consumer.ref.n,
                               status=f"quantizable ({consumer.ref.dtype.name.lower()}): {spec.bits}-bit block "
                               f"{spec.block_size}{' sym' if spec.symmetric else ' asym'}{shared}")
                elif producer is not None and producer.op_type == "DequantizeLinear":
                    row.update(weight=producer.inputs[0].name,
                               status=f"quantized: QDQ block {_attrs(producer).get('block_size', 0)}")
                elif reason == NOT_A_CANDIDATE:  # e.g. a Gather of shapes, not of a table
                    continue
                else:
                    row.update(weight=(w.name or "") if w is not None else "", status=f"not quantizable: {reason}")
            rows.append(row)
    return rows


def inspect_model(path: str | os.PathLike, config: WeightOnlyConfig | None = None) -> str:
    """A text table for ``ort-wq inspect``."""
    model = load_model(path)
    rows = inspect_rows(model, config)
    if not rows:
        return "no MatMul, Gemm, Gather or quantized nodes found"
    cols = ["graph", "node", "op", "weight", "k", "n", "status"]
    widths = {c: min(48, max(len(c), *(len(str(r[c])) for r in rows))) for c in cols[:-1]}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  STATUS"]
    for r in rows:
        lines.append("  ".join(str(r[c])[:48].ljust(widths[c]) for c in cols[:-1]) + "  " + str(r["status"]))
    counts: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    sizes = initializer_bytes_by_reader(model)
    lines.append("initializers by reader: " + format_by_reader(sizes))
    before, after = planned_sizes(model, config or WeightOnlyConfig())
    if before:
        lines.append(f"ort-wq quantize with these settings: {_mb(before)} of float weights -> {_mb(after)} "
                     f"(model initializers {_mb(sum(sizes.values()))} -> {_mb(sum(sizes.values()) - before + after)})")
    return "\n".join(lines)


def planned_sizes(model: ir.Model, config: WeightOnlyConfig) -> tuple[int, int]:
    """``(float bytes of the tensors to quantize, bytes they will take)``, a tensor counted once and
    its float kept where a consumer that is not converted still reads it."""
    from ort_wq.transforms._emitters import planned_nbytes
    from ort_wq.transforms.targets import find_targets

    found = find_targets(model, config)
    before = after = 0
    for target in found.targets:
        nbytes = target.ref.tensor.nbytes
        before += nbytes
        after += planned_nbytes(target, config.format)
        readers = {id(u.node) for u in target.ref.value.uses()}
        converted = {id(c.node) for c in target.consumers}
        if target.ref.value.is_graph_output() or readers - converted - _transposes_into(target, converted):
            after += nbytes
    return before, after


def _transposes_into(target, converted: set[int]) -> set[int]:
    """Transposes of the tensor read only by converted consumers (they go with them)."""
    out = set()
    for use in target.ref.value.uses():
        node = use.node
        if node.op_type == "Transpose" and all(id(u.node) in converted for u in node.outputs[0].uses()):
            out.add(id(node))
    return out
