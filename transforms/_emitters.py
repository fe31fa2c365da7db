"""Output ops and the storages they read, by format.

A *storage* module packs a quantized tensor into initializers: ``layout(k, n, spec, dtype, **opts)``
(``{key: (name_suffix, ir.DataType, shape)}``, known before the tensor is quantized) and
``pack(result, k, n, spec, dtype, **opts)`` (the arrays). An *emitter* module builds the node(s)
of one output op from a storage's values:

- MatMul-like consumers: ``emit(op, x, values, spec, k, n, bias, accuracy_level)`` computing
  ``x @ W (+ bias)``; ``SUPPORTS_BIAS``, ``OP_TYPE``.
- Gather consumers: ``emit_gather(op, ids, values, spec, k, n)`` computing ``W.T[ids]``.

A tensor is packed once per storage its consumers need: with ``nbits`` a tied embedding and head
read the same bytes (MatMulNBits ``B`` and GatherBlockQuantized ``data``); ``fpq4``'s blob cannot
be gathered, so its tables get an ``nbits`` storage beside it (the report says so).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

FORMATS = ("nbits", "fpq4", "qdq")


def _modules() -> dict[str, ModuleType]:
    from . import emit_fpq4, emit_gather, emit_nbits, emit_qdq

    return {"nbits": emit_nbits, "fpq4": emit_fpq4, "qdq": emit_qdq, "gather": emit_gather}


def get(fmt: str) -> ModuleType:
    """The MatMul emitter of a format."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not supported; use one of {list(FORMATS)}")
    return _modules()[fmt]


def for_consumer(embedding: bool, fmt: str) -> tuple[ModuleType, str]:
    """``(emitter module, storage kind)`` for a consumer (``embedding``: a Gather) in ``fmt``."""
    mods = _modules()
    if not embedding:
        return get(fmt), fmt
    if fmt == "qdq":
        return mods["qdq"], "qdq"
    return mods["gather"], "nbits"


def storages(target: Any, fmt: str) -> dict[str, tuple[ModuleType, dict]]:
    """Storage kind -> ``(storage module, layout options)`` for every storage the target's consumers read."""
    mods = _modules()
    out: dict[str, tuple[ModuleType, dict]] = {}
    kinds = {for_consumer(c.kind.embedding, fmt)[1] for c in target.consumers}
    multiplied_from_nbits = fmt == "nbits" and target.multiplied
    for kind in sorted(kinds):
        if kind == "nbits":
            out[kind] = (mods["nbits"], {"b_2d": not multiplied_from_nbits})
        elif kind == "qdq":
            out[kind] = (mods["qdq"], {"rows": not target.multiplied})
        else:
            out[kind] = (mods[kind], {})
    return out


def planned_nbytes(target: Any, fmt: str) -> int:
    """Bytes of the initializers the target will be written as (known before it is quantized)."""
    import numpy as np
    import onnx_ir as ir

    ref = target.ref
    dtype = np.float16 if ref.dtype == ir.DataType.FLOAT16 else np.float32
    total = 0
    for storage, opts in storages(target, fmt).values():
        for _, ir_dtype, shape in storage.layout(ref.k, ref.n, target.spec, dtype, **opts).values():
            total += (int(np.prod(shape)) * ir_dtype.bitwidth + 7) // 8
    return total
