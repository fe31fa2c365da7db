"""The graph proto as the writer saves it: without value_info that repeats initializers, with its
data file's name, and what an existing graph file reads."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from .model_io import _all_tensors, proto_graphs

__all__ = ["serialize", "relocate", "locations"]


def serialize(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto, without the value_info entries that only repeat an initializer's type and shape.

    onnx_ir writes a value_info for every initializer; the initializer itself already holds its
    type and shape, so these are dropped (those carrying a doc string or metadata are kept).
    """
    proto = ir.serde.serialize_model(model)
    for graph in proto_graphs(proto.graph):
        inits = {t.name for t in graph.initializer}
        keep = [v for v in graph.value_info if v.name not in inits or v.doc_string or v.metadata_props]
        if len(keep) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(keep)
    return proto


def locations(path: Path) -> set[str]:
    """External-data locations the graph at ``path`` refers to (empty if unreadable)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - absent or not a model: nothing to clean
        return set()
    out = set()
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out.update(e.value for e in t.external_data if e.key == "location")
    return out


def relocate(proto: onnx.ModelProto, old: str, new: str) -> None:
    """Point the proto's external tensors stored in ``old`` at ``new``."""
    if old == new:
        return
    for t in _all_tensors(proto.graph):
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
