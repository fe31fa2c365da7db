"""Output formats by name: each emitter module has ``layout``, ``pack`` and ``emit``.

- ``layout(k, n, spec, dtype)``: the initializers a quantized weight needs, known before the
  weight is quantized: ``{key: (name_suffix, ir.DataType, shape)}``.
- ``pack(result, k, n, spec, dtype)``: the arrays for those keys, from a ``QuantizedWeight``.
- ``emit(op, x, values, spec, k, n, bias, accuracy_level)``: the node(s) computing ``x @ W (+ bias)``.
"""

from __future__ import annotations

from types import ModuleType


def get(fmt: str) -> ModuleType:
    from . import emit_fpq4, emit_nbits, emit_qdq

    emitters = {"nbits": emit_nbits, "fpq4": emit_fpq4, "qdq": emit_qdq}
    if fmt not in emitters:
        raise ValueError(f"format={fmt!r} is not supported; use one of {sorted(emitters)}")
    return emitters[fmt]
