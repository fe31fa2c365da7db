"""Inputs for validation: generated from a model's signature, read from .npz, checked against it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from .model_io import as_ir_model
from .model_io import first_line as _line

_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


class ValidationInputError(ValueError):
    """Models or inputs that cannot be validated; the message is one line and names the culprit."""


def input_values(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.const_value is None and v.name not in model.graph.initializers]


def _index_bounds(graph: ir.Graph) -> dict[str, int]:
    """For inputs used as Gather indices (directly or through Cast, Reshape, ...): the table size."""
    bounds: dict[str, int] = {}
    for start in graph.inputs:
        todo, seen = [start], set()
        while todo:
            value = todo.pop()
            seen.add(id(value))
            for node, index in ((u.node, u.idx) for u in value.uses()):
                if node.op_type in _PASS_THROUGH and index == 0 and id(node.outputs[0]) not in seen:
                    todo.append(node.outputs[0])
                elif node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
                    table = ir.convenience.get_const_tensor(node.inputs[0])
                    if table is not None and len(table.shape) > 0:
                        size = int(table.shape[node.attributes.get_int("axis", 0)])
                        bounds[start.name] = min(bounds.get(start.name, size), size)
    return bounds


def generate_inputs(model: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from the model's signature: floats ~ N(0, 1); token ids below the embedding size (read
    from a Gather table); ``*mask*`` ones; ``*position*`` 0, 1, 2, ...; other integers 0. Symbolic
    dimensions of one name get one size: 2 for ``*batch*``, else 8."""
    m = as_ir_model(model)[0]
    rng = np.random.default_rng(seed)
    bounds, sizes, feeds = _index_bounds(m.graph), {}, {}
    for value in input_values(m):
        shape = []
        for i, d in enumerate(value.shape.dims if value.shape is not None else ()):
            if not isinstance(d, int):  # symbolic: one size per name (unnamed: per position)
                key = str(d.value) if d.value else f"{value.name}:{i}"
                d = sizes.setdefault(key, 2 if "batch" in key.lower() else 8)
            shape.append(d)
        dtype, name = np.dtype(value.dtype.numpy()), value.name
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif name in bounds:
            feeds[name] = rng.integers(0, max(bounds[name], 1), shape).astype(dtype)
        elif "position" in name.lower() and shape:
            feeds[name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        else:
            feeds[name] = (np.ones if "mask" in name.lower() else np.zeros)(shape, dtype)
    return feeds


def check_feeds(feeds: Mapping[str, Any], specs: list[ir.Value], label: str) -> dict[str, np.ndarray]:
    """``feeds`` in the model's dtypes; a wrong name, dtype kind or shape raises, naming the input."""
    names = [v.name for v in specs]
    missing, extra = [n for n in names if n not in feeds], sorted(set(feeds) - set(names))
    if missing or extra:
        parts = [f"{w} {', '.join(map(repr, x))}" for w, x in (("missing", missing), ("unexpected", extra)) if x]
        raise ValidationInputError(f"inputs do not match the {label}: {'; '.join(parts)} (it takes {', '.join(names)})")
    out, kind = {}, {"f": "float", "i": "int", "u": "int", "b": "bool"}
    for v in specs:
        arr, want = np.asarray(feeds[v.name]), np.dtype(v.dtype.numpy())
        if arr.dtype != want and kind.get(arr.dtype.kind, arr.dtype.kind) != kind.get(want.kind, want.kind):
            raise ValidationInputError(f"input {v.name!r} is {arr.dtype} but the {label} expects {want}")
        dims = v.shape.dims if v.shape is not None else None
        fixed = [] if dims is None else [(d, s) for d, s in zip(dims, arr.shape) if isinstance(d, int)]
        if dims is not None and (arr.ndim != len(dims) or any(d != s for d, s in fixed)):
            expected = "[" + ", ".join(str(d if isinstance(d, int) else d.value or "?") for d in dims) + "]"
            raise ValidationInputError(f"input {v.name!r} has shape {list(arr.shape)}; the {label} expects {expected}")
        out[v.name] = arr.astype(want, copy=False)
    return out


def _batches(inputs: Any, data_reader: Any) -> list[Mapping[str, Any]]:
    if inputs is not None and data_reader is not None:
        raise ValidationInputError("give inputs or data_reader, not both")
    if inputs is not None:
        return [inputs] if isinstance(inputs, Mapping) else list(inputs)
    rewind = getattr(data_reader, "rewind", None) or (lambda: None)
    rewind()
    batches = [] if data_reader is None else list(iter(data_reader.get_next, None))
    rewind()
    return batches


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name; one-line ``ValueError`` for a missing or unreadable file."""
    if os.path.isdir(path):
        raise ValidationInputError(f"{path}: is a folder, not a .npz file (save inputs with numpy.savez)")
    if not os.path.isfile(path):
        raise ValidationInputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ValidationInputError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise ValidationInputError(f"{path}: not a .npz archive (save inputs with numpy.savez)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValidationInputError(f"{path}: cannot read it as a .npz archive ({_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValidationInputError(f"{path}: not a .npz archive (save inputs with numpy.savez)")
    with data:
        return {k: data[k] for k in data.files}


