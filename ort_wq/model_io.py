"""Loading and saving models: clear errors for bad files, external data, atomic writes.

Models are loaded with onnx_ir, which memory-maps external data, so a weight is read only when
it is used. Loading refuses what onnxruntime would refuse or read differently: external data
outside the model's folder (checked on the path's text first, so nothing outside is touched),
data shorter or longer than a tensor's shape, duplicate initializer names. Saving goes through
:mod:`ort_wq.output_files`: the output path names the old or the new complete model at every
instant.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "ModelInputError", "load_model", "save_model", "as_ir_model", "has_external_data", "inference_session", "PROTO_LIMIT",
]

# protobuf cannot serialise a message of 2 GiB or more; stay below it with room for the graph
PROTO_LIMIT = 2**31 - 2**26


class ModelInputError(ValueError):
    """A model file or object that cannot be used; the message is one line and says what to do."""


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an ``ir.Model`` (external data memory-mapped, checked to exist)."""
    p = Path(path)
    if not p.exists():
        raise ModelInputError(f"{p}: no such file")
    if p.is_dir():
        raise ModelInputError(f"{p}: is a folder, not an ONNX model file")
    if not os.access(p, os.R_OK):
        raise ModelInputError(f"{p}: not readable (check its permissions)")
    if p.stat().st_size == 0:
        raise ModelInputError(f"{p}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelInputError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelInputError(f"{p}: not an ONNX model (no graph found; is the file truncated or of another format?)")
    _check_external_files(proto, p.parent, str(p))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelInputError(f"{p}: cannot read the model ({first_line(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    return model


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_external_files(proto: onnx.ModelProto, base: Path, where: str) -> None:
    """Tensors agree with their data; external data stays in the model's folder and is long enough.

    A location outside the folder is refused before the file is touched, so nothing about it
    (not even its existence) is disclosed. Duplicate initializer names are refused: onnxruntime
    and onnx_ir would each pick a different copy.
    """
    _check_unique_initializers(proto.graph, where)
    needed: dict[str, tuple[int, str]] = {}
    for tensor in _all_tensors(proto.graph):
        size = _tensor_nbytes(tensor)
        name = tensor.name or "<unnamed>"
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            _check_inline_data(tensor, size, where)
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not _inside_folder(loc):
            raise ModelInputError(f"{where}: tensor {name!r} points at external data {loc!r} outside the model's "
                                  "folder; data files must sit in the model's folder (onnxruntime refuses this too)")
        try:
            offset, length = int(info.get("offset", 0) or 0), info.get("length")
            length = None if length in (None, "") else int(length)
        except ValueError:
            raise ModelInputError(f"{where}: tensor {name!r} has an unreadable external-data offset or length") from None
        if size is not None and length is not None and length != size:
            raise ModelInputError(f"{where}: tensor {name!r} declares {length} bytes of external data but its shape "
                                  f"{list(tensor.dims)} needs {size}; the model is inconsistent, re-export it")
        end = offset + (size if size is not None else (length or 0))
        if needed.get(loc, (0, ""))[0] < end:
            needed[loc] = (end, name)
    real_base = base.resolve()
    for loc, (end, name) in needed.items():
        f = base / loc
        if not f.resolve().is_relative_to(real_base):
            raise ModelInputError(f"{where}: external data file {loc!r} links outside the model's folder; "
                                  "copy the data file beside the model")
        if not f.is_file():
            raise ModelInputError(f"{where}: external data file {loc!r} is missing (expected at {f}); keep it beside the model")
        st = f.stat()
        if st.st_nlink > 1:
            raise ModelInputError(f"{where}: external data file {loc!r} has {st.st_nlink} hard links, which onnx "
                                  "refuses to read (a guard against link attacks); use a copy of it")
        have = st.st_size
        if end and have < end:
            raise ModelInputError(f"{where}: external data file {loc!r} is truncated ({have} bytes, tensor {name!r} "
                                  f"needs {end})")


def _inside_folder(location: str) -> bool:
    """A relative location that stays in the model's folder (checked on the text alone)."""
    if not location or "\0" in location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return False
    if len(location) > 1 and location[1] == ":" and location[0].isalpha():  # a Windows drive
        return False
    parts = Path(os.path.normpath(location.replace("\\", "/"))).parts
    return bool(parts) and parts[0] != ".."


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and type need (``None`` for strings and unknown types)."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (TypeError, ValueError):
        return None
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (numel * bits + 7) // 8


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _check_inline_data(tensor: onnx.TensorProto, size: int | None, where: str) -> None:
    if size is None or tensor.data_type == onnx.TensorProto.STRING:
        return
    name = tensor.name or "<unnamed>"
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != size:
            raise ModelInputError(f"{where}: tensor {name!r} has {len(tensor.raw_data)} bytes of data but its shape "
                                  f"{list(tensor.dims)} needs {size}; the model is inconsistent, re-export it")
        return
    count = next((len(getattr(tensor, f)) for f in _TYPED_FIELDS if len(getattr(tensor, f))), 0)
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    per_value = {onnx.TensorProto.COMPLEX64: 2, onnx.TensorProto.COMPLEX128: 2}.get(tensor.data_type, 1)
    if count and ir.DataType(tensor.data_type).bitwidth >= 8 and count != numel * per_value:
        raise ModelInputError(f"{where}: tensor {name!r} has {count} values but its shape {list(tensor.dims)} "
                              f"holds {numel}; the model is inconsistent, re-export it")


def proto_graphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in its nodes' attributes (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from proto_graphs(g)


def _check_unique_initializers(graph: onnx.GraphProto, where: str) -> None:
    for g in proto_graphs(graph):
        seen: set[str] = set()
        for init in g.initializer:
            if init.name in seen:
                raise ModelInputError(f"{where}: initializer {init.name!r} is defined twice in graph {g.name!r}; "
                                      "onnxruntime would use one copy and ort-wq another: remove the duplicate")
            seen.add(init.name)


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def as_ir_model(model: Any) -> tuple[ir.Model, str]:
    """``(ir.Model, kind)`` for a path, ``onnx.ModelProto`` or ``ir.Model``; kind is 'path', 'proto' or 'ir'."""
    if isinstance(model, ir.Model):
        return model, "ir"
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), "proto"
    if isinstance(model, (str, os.PathLike)):
        return load_model(model), "path"
    raise ModelInputError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of the main graph lives in an external file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def release(tensor: Any) -> None:
    """Drop the memory map of an external tensor (it is re-mapped if read again)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # another reader still holds a view; it goes when that view goes
            pass


def external_files(model: ir.Model) -> set[Path]:
    """Resolved paths of the files the model's external tensors live in."""
    files = set()  # (folder, location) pairs: most tensors share one file, resolved once
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor):
                files.add((str(t.base_dir), t.location))
    return {(Path(base) / location).resolve() for base, location in files}


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializers of the main graph."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None, durable: bool = True
) -> list[Path]:
    """Save ``model`` to ``path`` atomically; returns the files written.

    ``external_data=None`` writes external data (``<name>.data``, or ``<name>_data`` when the
    current ``path`` reads that name) when the model had it or is too large for one protobuf. ``path`` names the old
    model or the complete new one at every instant (see :mod:`ort_wq.output_files`);
    ``durable=False`` skips the fsyncs that make this hold across a power loss (throw-away copies).
    """
    from .output_files import AtomicModelWriter

    if external_data is None:
        external_data = has_external_data(model) or model_nbytes(model) >= PROTO_LIMIT
    with AtomicModelWriter(path, external_data, durable=durable) as writer:
        writer.check_inputs(model)
        return writer.finish(model)


def _tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    graphs = [model.graph, *model.graph.subgraphs()]
    return [v.const_value for g in graphs for v in g.initializers.values() if v.const_value is not None]


def fits_in_memory(tensors: Iterable[ir.TensorProtocol], sess_options: Any) -> bool:
    """Whether a proto holding ``tensors`` can go to onnxruntime from memory: the in-memory ones
    under the 2 GB protobuf limit, the external ones in one folder at most, which ``sess_options``
    is then told (``session.model_external_initializers_file_folder_path``)."""
    tensors = list(tensors)
    folders = {os.path.abspath(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor)}
    in_memory = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
    if len(folders) > 1 or in_memory >= PROTO_LIMIT:
        return False
    if folders:
        sess_options.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
    return True


def inference_session(model: ir.Model, sess_options: Any = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime session for an in-memory ``ir.Model``, external data included.

    The graph is serialised without its external tensors and onnxruntime is told the folder they
    live in (``session.model_external_initializers_file_folder_path``), so nothing is copied. A
    model whose in-memory tensors would exceed the 2 GB protobuf limit (or whose external data
    lives in several folders) is saved to a temporary folder first. ``sess_options`` is modified.
    (To compute only some values, prune the model first, as :mod:`ort_wq.algorithms.segments` does.)
    """
    import onnxruntime as ort

    so = sess_options if sess_options is not None else ort.SessionOptions()
    providers = providers or ["CPUExecutionProvider"]
    if fits_in_memory(_tensors(model), so):
        proto: onnx.ModelProto = ir.serde.serialize_model(model)
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="ort_wq_", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True, durable=False)
        return ort.InferenceSession(str(path), so, providers=providers)


def __getattr__(name: str) -> Any:
    """``AtomicModelWriter`` and ``ExternalDataSink`` moved to :mod:`ort_wq.output_files`."""
    if name in ("AtomicModelWriter", "ExternalDataSink"):
        from . import output_files

        return getattr(output_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
