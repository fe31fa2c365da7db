"""Loading and saving models: clear errors for bad files, external data, atomic writes.

Models are loaded with onnx_ir, which memory-maps external data, so a weight is read only when
it is used. Saving writes into a temporary folder beside the destination and moves the files
into place only when everything was written: a failure leaves no output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
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
    """Every external-data file a tensor points at exists and is long enough."""
    needed: dict[str, int] = {}
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in needed.items():
        f = base / loc
        if not f.is_file():
            raise ModelInputError(f"{where}: external data file {loc!r} is missing (expected at {f}); keep it beside the model")
        if end and f.stat().st_size < end:
            raise ModelInputError(f"{where}: external data file {loc!r} is truncated ({f.stat().st_size} bytes, needs {end})")


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
    out = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor):
                out.add((Path(t.base_dir) / t.location).resolve())
    return out


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializers of the main graph."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class ExternalDataSink:
    """Appends tensors to one external-data file as they are produced (thread-safe).

    Each ``put`` writes the bytes at a 64-byte aligned offset and returns an ``ir.ExternalTensor``
    pointing at them, so the data leaves memory as soon as it is computed.
    """

    ALIGN = 64

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self._file = open(folder / name, "wb")  # noqa: SIM115 - closed by close()
        self._offset = 0
        self._lock = threading.Lock()

    def put(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        data = np.ascontiguousarray(array)
        tensor = ir.Tensor(data, name=name)
        raw = tensor.tobytes()
        with self._lock:
            pad = -self._offset % self.ALIGN
            if pad:
                self._file.write(b"\0" * pad)
            offset = self._offset + pad
            self._file.write(raw)
            self._offset = offset + len(raw)
        return ir.ExternalTensor(self.name, offset, len(raw), tensor.dtype, shape=tensor.shape, name=name,
                                 base_dir=str(self.folder))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class AtomicModelWriter:
    """Writes a model into a temporary folder beside ``path``; files move into place only in ``finish``.

    With ``external_data``, :attr:`sink` streams tensors to ``<name>.data`` while the model is being
    built; ``finish`` moves the initializers still held in memory or in other files there too.
    Used as a context manager: leaving it without ``finish`` (an error) removes everything.
    """

    def __init__(self, path: str | os.PathLike, external_data: bool) -> None:
        self.dest = Path(path)
        if self.dest.is_dir():
            raise ModelInputError(f"{self.dest}: is a folder; give a file name for the output model")
        self.parent = self.dest.parent if str(self.dest.parent) else Path(".")
        if not self.parent.exists():
            raise ModelInputError(f"{self.parent}: output folder does not exist")
        self.external_data = external_data
        self.data_path = self.parent / (self.dest.name + ".data")
        self.tmp: Path | None = None
        self.sink: ExternalDataSink | None = None

    def check_inputs(self, model: ir.Model) -> None:
        """Refuse an output whose files would replace a file the model reads its weights from."""
        if self.external_data and self.data_path.resolve() in external_files(model):
            raise ModelInputError(
                f"{self.data_path} holds the input's weights and would be overwritten; choose another output name"
            )

    def __enter__(self) -> AtomicModelWriter:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=self.parent))
        if self.external_data:
            self.sink = ExternalDataSink(self.tmp, self.dest.name + ".data")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, model: ir.Model) -> list[Path]:
        """Write the graph (and the remaining tensors), then rename the files into place."""
        assert self.tmp is not None, "use AtomicModelWriter as a context manager"
        written = []
        sink = self.sink
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or (sink is not None and isinstance(t, ir.ExternalTensor) and Path(t.base_dir) == sink.folder):
                    continue
                if sink is not None and t.nbytes >= 1024:
                    value.const_value = sink.put(value.name, t.numpy())
                elif isinstance(t, ir.ExternalTensor):  # another file's data: the output must not depend on it
                    value.const_value = ir.Tensor(np.array(t.numpy()), name=value.name)
                else:
                    continue
                release(t)
        if sink is not None:
            sink.close()
            ir.save(model, self.tmp / self.dest.name)
            os.replace(self.tmp / sink.name, self.parent / sink.name)
            written.append(self.parent / sink.name)
            ir.external_data.set_base_dir(model.graph, str(self.parent))
        else:
            ir.save(model, self.tmp / self.dest.name)
        os.replace(self.tmp / self.dest.name, self.dest)
        written.append(self.dest)
        return written


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Save ``model`` to ``path`` atomically; returns the files written.

    ``external_data=None`` writes external data (``<name>.data``) when the model had it or is too
    large for one protobuf. Files are written in a temporary folder beside ``path`` and renamed
    into place only after the whole save succeeded.
    """
    if external_data is None:
        external_data = has_external_data(model) or model_nbytes(model) >= PROTO_LIMIT
    with AtomicModelWriter(path, external_data) as writer:
        writer.check_inputs(model)
        return writer.finish(model)


def _tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    graphs = [model.graph, *model.graph.subgraphs()]
    return [v.const_value for g in graphs for v in g.initializers.values() if v.const_value is not None]


def inference_session(
    model: ir.Model, sess_options: Any = None, providers: list[str] | None = None, *, outputs: list[str] | None = None
) -> Any:
    """An onnxruntime session for an in-memory ``ir.Model``, external data included.

    The graph is serialised without its external tensors and onnxruntime is told the folder they
    live in (``session.model_external_initializers_file_folder_path``), so nothing is copied. A
    model whose in-memory tensors would exceed the 2 GB protobuf limit (or whose external data
    lives in several folders) is saved to a temporary folder first. ``sess_options`` is modified.
    ``outputs``: the session computes only these values of the main graph: they become its
    outputs, and nodes and initializers they do not depend on are left out (onnxruntime itself
    runs every node, e.g. an LLM's output head, even when its result is not fetched).
    """
    import onnxruntime as ort

    so = sess_options if sess_options is not None else ort.SessionOptions()
    providers = providers or ["CPUExecutionProvider"]
    tensors = _tensors(model)
    folders = {os.path.abspath(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor)}
    in_memory = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
    if len(folders) <= 1 and in_memory < PROTO_LIMIT:
        proto: onnx.ModelProto = ir.serde.serialize_model(model)
        if outputs is not None:
            _keep_only(proto.graph, outputs)
        if folders:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="ort_wq_", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        if outputs is not None:
            proto = onnx.load(str(path), load_external_data=False)
            _keep_only(proto.graph, outputs)
            onnx.save(proto, str(path))
        return ort.InferenceSession(str(path), so, providers=providers)


def _keep_only(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Make ``outputs`` the graph's outputs and drop the nodes and initializers they do not need."""
    known = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    needed, keep = set(outputs), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_reads(node))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.extend(known[n] if n in known else onnx.ValueInfoProto(name=n) for n in outputs)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside the node's subgraphs (outer-scope values among them)."""
    out: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                out.update(i for i in n.input if i)
                out.update(_subgraph_reads(n))
    return out
