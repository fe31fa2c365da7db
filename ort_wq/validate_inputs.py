"""Inputs for validation: generated from a model's signature, read from .npz, checked against it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from .feeds import input_values, is_dynamic, make_feeds
from .model_io import as_ir_model
from .model_io import first_line as _line

__all__ = ["ValidationInputError", "generate_inputs", "check_feeds", "input_values", "load_npz"]


class ValidationInputError(ValueError):
    """Models or inputs that cannot be validated; the message is one line and names the culprit."""


def generate_inputs(model: Any, seed: int = 0, *, batch: int = 2, folder: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Inputs from the model's signature (:func:`ort_wq.feeds.make_feeds`): floats ~ N(0, 1); token
    ids below the embedding size; decoder inputs (masks, positions, empty KV caches) consistent
    with each other; symbolic or ``-1`` dimensions of one name get one size: ``batch`` for the
    batch, 0 for the past length, else 8."""
    m = as_ir_model(model)[0]
    return make_feeds(m, batch=batch, seed=seed, folder=folder)


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
        fixed = [] if dims is None else [(d, s) for d, s in zip(dims, arr.shape) if not is_dynamic(d)]
        if dims is not None and (arr.ndim != len(dims) or any(d != s for d, s in fixed)):
            expected = "[" + ", ".join(str(d) if not is_dynamic(d) else (getattr(d, "value", None) or "?") for d in dims) + "]"
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


