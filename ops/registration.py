"""The reference ops as onnxruntime-extensions Python custom ops, and how sessions get them.

Two sets of ops, because a Python op has one fixed list of required inputs and attributes:

- Under :data:`REFERENCE_DOMAIN`, defined on the first :func:`register` call: ``MatMulFpQ4`` and one
  ``MatMulNBits`` variant per optional-input combination (:func:`nbits_variant`). Copies made by
  :func:`ort_wq.ops.to_reference` point at them and carry the original node name in a ``node``
  attribute, so errors name the node. These ops are float32 only: onnxruntime-extensions cannot
  pass float16 tensors to Python, so ``to_reference`` wraps float16 nodes in Casts.
- Under ``com.microsoft`` (the *contrib override*), defined on the first :func:`register` or
  :func:`session_options` call with ``contrib=True``: ``MatMulFpQ4`` and one bias-free float32
  ``MatMulNBits`` form, by default ort-wq's own default output (asymmetric, packed uint8 zero
  points: inputs ``A, B, scales, zero_points``). They replace onnxruntime's own kernels so an
  unmodified model runs where the contrib kernels are missing. Python ops are process-wide: once
  enabled, every session in this process that registers the onnxruntime-extensions library gets
  them (other com.microsoft ops keep their built-in kernels). They are defined lazily so that
  merely importing ort_wq never changes the kernels of other sessions.

Each op body catches every exception (one escaping into onnxruntime aborts the process), records
it (see :mod:`._errors`) and returns zeros; :func:`ort_wq.ops.run` raises it after ``run()``.
Outputs are handed back as arrays (see :class:`_OutputArray`), not as Python lists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

from ._cache import CACHE
from ._errors import OpFailure, ReferenceInputError, record
from .gather_block_quantized import gather_block_quantized
from .matmul_fpq4 import matmul_fpq4
from .matmul_nbits import matmul_nbits

__all__ = [
    "REFERENCE_DOMAIN",
    "CONTRIB_DOMAIN",
    "nbits_variant",
    "register",
    "session_options",
    "contrib_override_active",
    "unserved_nodes",
    "stats",
]

REFERENCE_DOMAIN = "ort_wq.reference"
CONTRIB_DOMAIN = "com.microsoft"
ZERO_POINT_KINDS = ("none", "uint8", "float")

# onnxruntime-extensions type names (PyCustomOpDef.dt_*), resolved when an op is defined: importing
# onnxruntime_extensions is slow (it imports transformers/torch where installed), so it happens only
# when a session first needs the reference ops.
_F, _U8, _I64, _STR = "dt_float", "dt_uint8", "dt_int64", "dt_string"
_NBITS_ATTRS = {"K": _I64, "N": _I64, "bits": _I64, "block_size": _I64}


class _FlatOutput(np.ndarray):
    """1-D view whose ``tolist()`` is the array itself.

    onnxruntime-extensions returns ``result.flatten().tolist()`` to its C++ side, which accepts
    any array-like and copies an ndarray of the declared item size with one memcpy. Skipping the
    Python list (one float object per element) makes large outputs about 7x cheaper.
    """

    def tolist(self) -> Any:  # type: ignore[override]
        return self.view(np.ndarray)


class _OutputArray(np.ndarray):
    """A C-contiguous float32 op result whose ``flatten()`` is a :class:`_FlatOutput` view."""

    def flatten(self, order: Any = "C") -> np.ndarray:  # type: ignore[override]
        return self.view(np.ndarray).reshape(-1).view(_FlatOutput)


_EMPTY = np.zeros((0,), dtype=np.float32).view(_OutputArray)
_calls_lock = threading.Lock()
_calls: dict[str, int] = {}


def _as_output(y: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(y, dtype=np.float32).view(_OutputArray)


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ReferenceInputError) else f"{type(exc).__name__}: {text}"


_Compute = Callable[[Sequence[np.ndarray], dict[str, Any]], np.ndarray]
_Shape = Callable[[Sequence[np.ndarray], dict[str, Any]], tuple[int, ...]]


def _make_body(label: str, op_type: str, compute: _Compute, out_shape: _Shape) -> Callable[..., np.ndarray]:
    """An op body that never raises: failures are recorded and answered with zeros of ``out_shape``."""
    where = _where(op_type)

    def body(*inputs: np.ndarray, **attrs: Any) -> np.ndarray:
        try:
            with _calls_lock:
                _calls[label] = _calls.get(label, 0) + 1
            return _as_output(compute(inputs, attrs))
        except BaseException as exc:  # noqa: BLE001 - anything escaping here aborts the process
            try:
                node, detail = where(inputs, attrs)
            except BaseException:  # noqa: BLE001
                node, detail = None, ""
            try:
                record(OpFailure(op_type, node, _message(exc), detail))
            except BaseException:  # noqa: BLE001 - nothing more can be done without aborting
                pass
            try:
                return _as_output(np.zeros(out_shape(inputs, attrs), dtype=np.float32))
            except BaseException:  # noqa: BLE001
                return _EMPTY

    body.__name__ = body.__qualname__ = label.replace("::", "_").replace(".", "_")
    return body


def _where(op_type: str) -> Callable[[Sequence[np.ndarray], dict[str, Any]], tuple[str | None, str]]:
    """``(node name, description)`` for failure messages: the ``node`` attribute, else attributes and shapes."""

    def where(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> tuple[str | None, str]:
        if attrs.get("node"):
            return str(attrs["node"]), ""
        names = ("A", "B", "B_shape" if op_type == "MatMulFpQ4" else "scales")
        shapes = ", ".join(f"{n} {list(np.shape(x))}" for n, x in zip(names, inputs))
        if op_type == "MatMulFpQ4":
            known = f"B_shape={np.asarray(inputs[2]).reshape(-1).tolist()}" if len(inputs) > 2 else ""
        else:
            known = ", ".join(f"{k}={attrs[k]}" for k in _NBITS_ATTRS if k in attrs)
        return None, f"(com.microsoft, unnamed: session_options() mode; {known}; {shapes})"

    return where


def _lead_shape(inputs: Sequence[np.ndarray]) -> tuple[int, ...]:
    return tuple(np.shape(inputs[0])[:-1]) if inputs and np.ndim(inputs[0]) else ()


def nbits_variant(zero_points: str, bias: bool) -> str:
    """Name of the reference MatMulNBits op for a zero-point kind (``none``, ``uint8``, ``float``) and bias."""
    if zero_points not in ZERO_POINT_KINDS:
        raise ValueError(f"zero_points={zero_points!r}; use one of {ZERO_POINT_KINDS}")
    return "MatMulNBits" + {"none": "", "uint8": "ZpU8", "float": "ZpF"}[zero_points] + ("Bias" if bias else "")


def _nbits_types(zero_points: str, bias: bool) -> list[str]:
    zp = {"none": [], "uint8": [_U8], "float": [_F]}[zero_points]
    return [_F, _U8, _F, *zp, *([_F] if bias else [])]


def _nbits_compute(zero_points: str, bias: bool) -> _Compute:
    def compute(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
        a, b, scales, *rest = inputs
        zp = rest.pop(0) if zero_points != "none" else None
        bias_value = rest.pop(0) if bias else None
        return matmul_nbits(
            a, b, scales, zp, bias_value,
            K=int(attrs["K"]), N=int(attrs["N"]), bits=int(attrs["bits"]), block_size=int(attrs["block_size"]),
        )  # fmt: skip

    return compute


def _nbits_shape(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> tuple[int, ...]:
    return (*_lead_shape(inputs), max(int(attrs.get("N", 0)), 0))


def _fpq4_compute(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    a, blob, b_shape = inputs
    return matmul_fpq4(a, blob, b_shape, blk_quant_type=int(attrs["blk_quant_type"]))


def _fpq4_shape(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> tuple[int, ...]:
    shape = np.asarray(inputs[2]).reshape(-1)
    return (*_lead_shape(inputs), max(int(shape[1]), 0) if shape.size == 2 else 0)


def gather_variant(zero_points: bool) -> str:
    """Name of the reference GatherBlockQuantized op with or without (uint8) zero points."""
    return "GatherBlockQuantized" + ("ZpU8" if zero_points else "")


def _gather_compute(zero_points: bool) -> _Compute:
    def compute(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
        data, ids, scales, *rest = inputs
        return gather_block_quantized(
            data, ids, scales, rest[0] if zero_points else None, bits=int(attrs["bits"]),
            block_size=int(attrs["block_size"]), quantize_axis=int(attrs["quantize_axis"]),
            gather_axis=int(attrs["gather_axis"]),
        )

    return compute


def _gather_shape(inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> tuple[int, ...]:
    width = np.shape(inputs[0])[-1] * 8 // max(int(attrs.get("bits", 4)), 1) if inputs else 0
    return (*np.shape(inputs[1]), width) if len(inputs) > 1 else (0,)


def _define(
    name: str, op_type: str, inputs: list[str], attrs: dict[str, str], compute: _Compute, shape: _Shape
) -> None:
    """One Python op ``name`` ("domain::op") computing ``op_type``, one float32 output."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    def dt(type_name: str) -> int:
        return getattr(PyCustomOpDef, type_name)

    onnx_op(op_type=name, inputs=[dt(t) for t in inputs], outputs=[dt(_F)],
            attrs={k: dt(v) for k, v in attrs.items()})(_make_body(name, op_type, compute, shape))


_reference_lock = threading.Lock()
_reference_defined = False


def _define_reference_ops() -> None:
    """All ops of :data:`REFERENCE_DOMAIN`, defined together (once) before any session registers them."""
    global _reference_defined
    with _reference_lock:
        if not _reference_defined:
            _define_reference_op_set()
            _reference_defined = True


def _define_reference_op_set() -> None:
    attrs = {**_NBITS_ATTRS, "node": _STR}
    for zp in ZERO_POINT_KINDS:
        for bias in (False, True):
            name = f"{REFERENCE_DOMAIN}::{nbits_variant(zp, bias)}"
            _define(name, "MatMulNBits", _nbits_types(zp, bias), attrs, _nbits_compute(zp, bias), _nbits_shape)
    attrs = {"blk_quant_type": _I64, "node": _STR}
    _define(f"{REFERENCE_DOMAIN}::MatMulFpQ4", "MatMulFpQ4", [_F, _U8, _I64], attrs, _fpq4_compute, _fpq4_shape)
    attrs = {"bits": _I64, "block_size": _I64, "quantize_axis": _I64, "gather_axis": _I64, "node": _STR}
    for zp in (False, True):
        _define(f"{REFERENCE_DOMAIN}::{gather_variant(zp)}", "GatherBlockQuantized", [_U8, _I64, _F, *([_U8] if zp else [])],
                attrs, _gather_compute(zp), _gather_shape)


_override_lock = threading.Lock()
_override_on: str | None = None  # the MatMulNBits zero-point form defined under com.microsoft
_ZP_INPUTS = {"none": [], "uint8": [_U8], "float": [_F]}


def _enable_contrib_override(zero_points: str = "none") -> None:
    """Define the com.microsoft ops once, both in one go (never add ops to a registered domain)."""
    global _override_on
    if zero_points not in _ZP_INPUTS:
        raise ValueError(f"nbits_zero_points={zero_points!r} is not valid; use one of {sorted(_ZP_INPUTS)}")
    with _override_lock:
        if _override_on is not None:
            if _override_on != zero_points:
                raise ValueError(
                    f"the com.microsoft MatMulNBits override is already defined for zero points {_override_on!r} "
                    f"in this process; use ort_wq.ops.to_reference for other forms"
                )
            return
        fpq4_attrs = {"blk_quant_type": _I64}
        _define(f"{CONTRIB_DOMAIN}::MatMulFpQ4", "MatMulFpQ4", [_F, _U8, _I64], fpq4_attrs, _fpq4_compute, _fpq4_shape)
        nbits = _nbits_compute(zero_points, False)
        inputs = [_F, _U8, _F, *_ZP_INPUTS[zero_points]]
        _define(f"{CONTRIB_DOMAIN}::MatMulNBits", "MatMulNBits", inputs, dict(_NBITS_ATTRS), nbits, _nbits_shape)
        _override_on = zero_points


def contrib_override_active() -> bool:
    """Whether the com.microsoft override ops exist in this process (see the module docstring)."""
    return _override_on is not None


def _node_form(node: Any) -> str:
    """``"none"``, ``"uint8"``, ``"float"`` or a description of a form no override serves."""
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    if len(inputs) > 4:
        return "with bias or g_idx"
    dtypes = {v.dtype for v in (inputs[0], inputs[2]) if v is not None and v.dtype is not None}
    if any(d.name != "FLOAT" for d in dtypes):
        return "float16"
    if len(inputs) < 4:
        return "none"
    zp = inputs[3].dtype
    return "uint8" if zp is not None and zp.name == "UINT8" else "float"


def unserved_nodes(model: Any, nbits_zero_points: str | None = None) -> list[str]:
    """MatMulNBits nodes of ``model`` whose form the com.microsoft override does not serve, each
    as ``"'name' (form)"``; ``nbits_zero_points``: the form to check against (default: the one
    defined in this process, else ``"uint8"``)."""
    from ort_wq.model_io import as_ir_model

    served = nbits_zero_points or _override_on or "uint8"
    out = []
    for node in as_ir_model(model)[0].graph.all_nodes():
        if node.domain == CONTRIB_DOMAIN and node.op_type == "MatMulNBits":
            form = _node_form(node)
            if form != served:
                label = {"none": "symmetric, no zero points", "uint8": "uint8 zero points", "float": "float zero points"}
                out.append(f"{node.name or '<unnamed>'!r} ({label.get(form, form)})")
    return out


def _check_served(model: Any, zero_points: str) -> None:
    bad = unserved_nodes(model, zero_points)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"session_options() serves MatMulNBits with zero points {zero_points!r} (float32, no bias) but node "
            f"{', '.join(bad[:3])}{more} has another form; pass nbits_zero_points= for it in a new process, "
            "or use ort_wq.ops.reference_session(model), which serves every form"
        )


def register(
    sess_options: ort.SessionOptions, *, contrib: bool = True, nbits_zero_points: str | None = None, model: Any = None
) -> ort.SessionOptions:
    """Register the onnxruntime-extensions library (and so the reference ops) with ``sess_options``.

    ``contrib=True`` also makes com.microsoft ``MatMulFpQ4`` and ``MatMulNBits`` run the reference
    ops, process-wide from then on. A Python op has a fixed input list, so one MatMulNBits form is
    served: float32, no bias, and zero points as ``nbits_zero_points`` says: ``"uint8"`` (packed,
    ort-wq's default asymmetric output; the default unless this process already defined another
    form, then that one), ``"none"`` (symmetric: inputs ``A, B,
    scales``) or ``"float"``. The first call in a process fixes it. Other forms (bias, float16,
    another zero-point kind) need :func:`ort_wq.ops.to_reference`. ``model`` (a path, ModelProto
    or onnx_ir.Model): checked first; a node of a form not served raises ``ValueError`` naming it
    (instead of onnxruntime's "invalid graph" when the session is created).
    Call once per ``SessionOptions``. Returns ``sess_options``.
    """
    from onnxruntime_extensions import get_library_path

    _define_reference_ops()
    zero_points = nbits_zero_points or _override_on or "uint8"
    if contrib and model is not None:
        _check_served(model, _override_on or zero_points)
    if contrib:
        _enable_contrib_override(zero_points)
    sess_options.register_custom_ops_library(get_library_path())
    return sess_options


def session_options(
    sess_options: ort.SessionOptions | None = None, *, contrib: bool = True, nbits_zero_points: str | None = None,
    model: Any = None,
) -> ort.SessionOptions:
    """New (or the given) ``SessionOptions`` with the reference ops registered; see :func:`register`."""
    import onnxruntime as ort

    so = sess_options if sess_options is not None else ort.SessionOptions()
    return register(so, contrib=contrib, nbits_zero_points=nbits_zero_points, model=model)


def stats() -> dict[str, Any]:
    """Calls per reference op (``"domain::name"``) and weight-cache counters: proof that a body ran."""
    with _calls_lock:
        calls = dict(_calls)
    return {"calls": calls, "cache": CACHE.stats()}
