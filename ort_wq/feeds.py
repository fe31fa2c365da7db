"""Model inputs built by ort-wq itself (validate's generated inputs, calibration and evaluation
from token ids), decoder models included.

Inputs are recognised by name, in the layouts of the onnxruntime-genai builder, optimum and
torch dynamo exports:

- ``input_ids`` ``[batch, seq]``: the given token ids, else random ids below the embedding size;
- ``attention_mask`` ``[batch, past + seq]``: ones;
- ``position_ids`` ``[batch, seq]``: ``past, past + 1, ...``;
- past KV cache, ``past_key_values.N.key|value``, ``past_key_N``/``past_value_N`` (any input whose
  name starts with ``past``) ``[batch, kv_heads, past, head_size]``: zeros, past length 0. Heads
  and head size come from the declared shape, else ``genai_config.json`` / ``config.json``
  beside the model, else the graph's attention nodes.

A dimension that is ``-1``, symbolic or unnamed is dynamic; a dimension shared by name gets one
size everywhere (so ``batch_size`` is the same in every input). Other inputs: floats ~ N(0, 1),
token-like integers below their Gather table, ``*mask*`` ones, other integers zeros.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = [
    "DecoderLayout", "decoder_layout", "make_feeds", "is_dynamic", "input_values", "kv_output_names", "compared_outputs",
]  # fmt: skip

_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_PAST = re.compile(r"^past", re.IGNORECASE)
_PRESENT = re.compile(r"^(present|past_key_values_out|key_cache|value_cache)", re.IGNORECASE)


def input_values(model: ir.Model) -> list[ir.Value]:
    """The graph inputs that are not initializers."""
    return [v for v in model.graph.inputs if v.const_value is None and v.name not in model.graph.initializers]


def is_dynamic(dim: Any) -> bool:
    """A symbolic, unnamed or ``-1`` dimension (onnxruntime treats all three as dynamic)."""
    return not isinstance(dim, int) or dim < 0


def kv_output_names(model: ir.Model) -> list[str]:
    """Graph outputs that are a KV cache (``present.*`` and friends)."""
    return [v.name for v in model.graph.outputs if _PRESENT.match(v.name)]


def compared_outputs(model: ir.Model, outputs: list[str] | None = None) -> list[str]:
    """The outputs worth comparing: ``outputs`` (checked against the model), else every output
    but a decoder's KV caches (all of them if that leaves none)."""
    names = [v.name for v in model.graph.outputs]
    if outputs is None:
        kv = set(kv_output_names(model))
        return [n for n in names if n not in kv] or names
    unknown = [n for n in outputs if n not in names]
    if unknown or not outputs:
        raise ValueError(f"no output named {', '.join(map(repr, unknown)) or 'given'}; the model has {', '.join(names)}")
    return list(dict.fromkeys(outputs))


@dataclass
class DecoderLayout:
    """Which inputs of a model play a decoder role, and the KV-cache geometry."""

    input_ids: str | None = None
    attention_mask: str | None = None
    position_ids: str | None = None
    past: tuple[str, ...] = ()
    kv_heads: int | None = None
    head_size: int | None = None

    @property
    def is_decoder(self) -> bool:
        return self.input_ids is not None and (bool(self.past) or self.position_ids is not None)


def decoder_layout(model: ir.Model, folder: str | Path | None = None) -> DecoderLayout:
    """The decoder roles of ``model``'s inputs; ``folder``: where to look for config files."""
    layout = DecoderLayout()
    past = []
    for v in input_values(model):
        low = v.name.lower()
        if low.endswith("input_ids") and layout.input_ids is None:
            layout.input_ids = v.name
        elif low.endswith("attention_mask") and layout.attention_mask is None:
            layout.attention_mask = v.name
        elif low.endswith("position_ids") and layout.position_ids is None:
            layout.position_ids = v.name
        elif _PAST.match(v.name) and v.shape is not None and len(v.shape) == 4:
            past.append(v)
    layout.past = tuple(v.name for v in past)
    if past:
        dims = past[0].shape.dims
        layout.kv_heads = dims[1] if not is_dynamic(dims[1]) else None
        layout.head_size = dims[3] if not is_dynamic(dims[3]) else None
        if layout.kv_heads is None or layout.head_size is None:
            heads, size = _kv_geometry(model, folder)
            layout.kv_heads = layout.kv_heads or heads
            layout.head_size = layout.head_size or size
    return layout


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _kv_geometry(model: ir.Model, folder: str | Path | None) -> tuple[int | None, int | None]:
    """``(kv_heads, head_size)`` from config files beside the model, else from attention nodes."""
    if folder is not None:
        decoder = _read_json(Path(folder) / "genai_config.json").get("model", {}).get("decoder", {})
        if decoder.get("head_size"):
            return decoder.get("num_key_value_heads"), int(decoder["head_size"])
        cfg = _read_json(Path(folder) / "config.json")
        heads = cfg.get("num_attention_heads")
        size = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
        if size:
            return cfg.get("num_key_value_heads", heads), int(size)
    for node in model.graph.all_nodes():
        if node.op_type not in ("GroupQueryAttention", "MultiHeadAttention", "Attention") or not node.inputs:
            continue
        heads = node.attributes.get_int("num_heads", 0)
        kv = node.attributes.get_int("kv_num_heads", heads)
        width = _out_width(node.inputs[0])
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        total = heads + 2 * kv if packed else heads
        if heads and width and width % total == 0:
            return kv, width // total
    return None, None


def _out_width(value: ir.Value | None) -> int | None:
    """Last dimension of ``value``: declared, or the N of the MatMul (+ Add) producing it."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) and not is_dynamic(value.shape[-1]):
        return int(value.shape[-1])
    node = value.producer()
    for _ in range(3):
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits", "Gemm") and len(node.inputs) > 1:
            if node.op_type == "MatMulNBits":
                return node.attributes.get_int("N", 0) or None
            w = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
            return int(w.shape[-1]) if w is not None and len(w.shape) == 2 else None
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return None


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
                elif node.op_type in ("Gather", "GatherBlockQuantized") and index == 1 and node.inputs[0] is not None:
                    size = _table_rows(node)
                    if size:
                        bounds[start.name] = min(bounds.get(start.name, size), size)
    return bounds


def _table_rows(node: ir.Node) -> int | None:
    table = node.inputs[0]
    t = ir.convenience.get_const_tensor(table)
    shape = t.shape if t is not None else table.shape
    if shape is None or not len(shape):
        if table.producer() is not None and table.producer().op_type == "Transpose":  # tied embedding
            src = ir.convenience.get_const_tensor(table.producer().inputs[0])
            return int(src.shape[-1]) if src is not None and len(src.shape) == 2 else None
        return None
    dim = shape[node.attributes.get_int("gather_axis", node.attributes.get_int("axis", 0))]
    return None if is_dynamic(dim) else int(dim)


def make_feeds(
    model: ir.Model,
    *,
    input_ids: np.ndarray | None = None,
    batch: int = 2,
    seq: int = 8,
    seed: int = 0,
    folder: str | Path | None = None,
    layout: DecoderLayout | None = None,
) -> dict[str, np.ndarray]:
    """One feed dict for every input of ``model`` (see the module doc).

    ``input_ids`` ``[batch, seq]``: the token ids to feed (then ``batch``/``seq`` follow from it).
    Fixed dimensions of the model win over ``batch``/``seq``.
    """
    layout = layout or decoder_layout(model, folder)
    rng = np.random.default_rng(seed)
    if input_ids is not None:
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        batch, seq = input_ids.shape
    specs = input_values(model)
    sizes: dict[str, int] = {}
    roles = _role_dims(layout, batch, seq)
    for v in specs:  # a size fixed by one input holds for the same symbol everywhere
        for d, want in zip(_dims(v), roles.get(v.name, ())):
            if isinstance(d, ir.SymbolicDim) and d.value and want is not None:
                sizes.setdefault(str(d.value), want)
    if layout.input_ids and input_ids is None:
        dims = _dims(next(v for v in specs if v.name == layout.input_ids))
        batch = dims[0] if dims and not is_dynamic(dims[0]) else batch
        seq = dims[1] if len(dims) > 1 and not is_dynamic(dims[1]) else seq
    bounds = _index_bounds(model.graph)
    feeds: dict[str, np.ndarray] = {}
    for v in specs:
        shape = _resolve(v, roles.get(v.name, ()), sizes)
        dtype, name = np.dtype(v.dtype.numpy()), v.name
        if name == layout.input_ids and input_ids is not None:
            if any(not is_dynamic(d) and d != s for d, s in zip(_dims(v), input_ids.shape)):
                raise ValueError(f"input {name!r} takes shape {_show(v)}, got token ids of shape {list(input_ids.shape)}")
            feeds[name] = input_ids.astype(dtype, copy=False)
        elif name == layout.position_ids:
            feeds[name] = np.broadcast_to(np.arange(shape[-1]) if shape else 0, shape).astype(dtype)
        elif name in layout.past:
            feeds[name] = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif name in bounds:
            feeds[name] = rng.integers(0, max(bounds[name], 1), shape).astype(dtype)
        elif "position" in name.lower() and shape:
            feeds[name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        else:
            feeds[name] = (np.ones if "mask" in name.lower() else np.zeros)(shape, dtype)
    return feeds


def _role_dims(layout: DecoderLayout, batch: int, seq: int) -> dict[str, tuple]:
    """Sizes by position of each decoder-role input (past length 0)."""
    out: dict[str, tuple] = {}
    if layout.input_ids:
        out[layout.input_ids] = (batch, seq)
    if layout.attention_mask:
        out[layout.attention_mask] = (batch, seq)
    if layout.position_ids:
        out[layout.position_ids] = (batch, seq)
    for name in layout.past:
        out[name] = (batch, layout.kv_heads, 0, layout.head_size)
    return out


def _dims(v: ir.Value) -> tuple:
    return tuple(v.shape.dims) if v.shape is not None else ()


def _resolve(v: ir.Value, wanted: tuple, sizes: dict[str, int]) -> list[int]:
    shape = []
    for i, d in enumerate(_dims(v)):
        if not is_dynamic(d):
            shape.append(int(d))
            continue
        want = wanted[i] if i < len(wanted) else None
        key = str(d.value) if isinstance(d, ir.SymbolicDim) and d.value else None
        if want is not None:
            shape.append(want)
        elif key is not None:
            shape.append(sizes.setdefault(key, 2 if "batch" in key.lower() else 8))
        else:
            shape.append(sizes.setdefault(f"{v.name}:{i}", 8))
    return shape


def _show(v: ir.Value) -> str:
    return "[" + ", ".join(str(d) if not is_dynamic(d) else (getattr(d, "value", None) or "?") for d in _dims(v)) + "]"


def with_batch(feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows (axis 0) of every feed (for models that only run at batch 1)."""
    return {k: np.ascontiguousarray(v[:rows]) if np.ndim(v) else v for k, v in feeds.items()}
