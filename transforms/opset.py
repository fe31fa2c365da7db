"""Raising the default-domain opset for the QDQ format, only when that changes no semantics.

Bumping an opset import is safe exactly when every standard op the model uses has the same
schema version at the old and the new opset; otherwise the model must be converted first.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir


def ensure_opset(model: ir.Model, minimum: int) -> int | None:
    """Raise the model's ``""`` opset to ``minimum`` if safe; returns the old version if raised.

    Raises ``ValueError`` naming the ops whose definition differs between the two versions.
    """
    current = model.opset_imports.get("", model.graph.opset_imports.get("", 1))
    if current >= minimum:
        return None
    changed = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                old = onnx.defs.get_schema(node.op_type, current, "").since_version
                new = onnx.defs.get_schema(node.op_type, minimum, "").since_version
            except onnx.defs.SchemaError:
                changed.add(node.op_type)
                continue
            if old != new:
                changed.add(node.op_type)
    if changed:
        raise ValueError(
            f"format 'qdq' needs opset >= {minimum} but the model uses opset {current} and "
            f"{', '.join(sorted(changed))} changed since; convert it first "
            f"(onnx.version_converter.convert_version(model, {minimum})) or use format 'nbits'"
        )
    model.opset_imports[""] = minimum
    if model.ir_version < 10:
        model.ir_version = 10
    return current
