"""Is a quantized model faithful? Run it and its original on the same inputs and compare.

Per output: max abs error, relative L2 error, cosine similarity, top-1 agreement for logits-like
outputs. ``reference=True`` also compares each quantized node's built-in kernel with the reference
op (:mod:`ort_wq.ops`) on the very same input, and runs the whole model on the reference ops.
Models over 2 GB work (paths go to onnxruntime as they are; copies share external data).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from . import ops
from .model_io import as_ir_model
from .feeds import compared_outputs, with_batch
from .validate_inputs import (  # noqa: F401  (re-exported)
    ValidationInputError,
    _batches,
    check_feeds,
    input_values,
    _line,
    load_npz,
    generate_inputs,
)

__all__ = [
    "OutputMetrics", "NodeCheck", "ValidationReport", "ValidationInputError", "validate", "generate_inputs",
    "add_validate_arguments", "run_validate_command",
]  # fmt: skip

# Defaults a correct 4-bit model passes and a broken one fails. Measured with generated inputs,
# ort-wq's default output (4-bit asym block 32): cosine 0.963 / rel L2 0.27 (MiniLM), 0.9988 /
# 0.054 (smollm2-2l logits), 1.0 (magika), 0.9895 (the demo); with the nibbles of every packed
# byte swapped (wrong packing): cosine 0.006 (MiniLM), -0.30 (smollm2-2l), 0.002 (magika).
MAX_REL_ERROR = 0.5
MIN_COSINE = 0.9
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training"}
_COLUMNS = f"{'output':<24} {'shape':<16} {'max abs err':>11} {'rel L2 err':>10} {'cosine':>9} {'top-1':>7}"


class _LoadError(ValidationInputError):
    """onnxruntime refused to create a session (for the quantized model: maybe a missing kernel)."""


@dataclass
class OutputMetrics:
    """How far one output is from its reference, over all batches."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    rel_l2_error: float
    cosine: float
    top1_agreement: float | None = None

    def failures(self, max_rel_error: float, min_cosine: float) -> list[str]:
        out = []
        if not self.rel_l2_error <= max_rel_error:  # NaN fails too
            out.append(f"output {self.name!r}: relative L2 error {self.rel_l2_error:.4g} > {max_rel_error:g}")
        if not self.cosine >= min_cosine:
            out.append(f"output {self.name!r}: cosine similarity {self.cosine:.6f} < {min_cosine:g}")
        return out

    def row(self) -> str:
        top1 = "-" if self.top1_agreement is None else f"{self.top1_agreement:.4f}"
        shape = "[" + ", ".join(map(str, self.shape)) + "]"
        errors = f"{self.max_abs_error:>11.3e} {self.rel_l2_error:>10.3e}"
        return f"{self.name:<24} {shape:<16} {errors} {self.cosine:>9.6f} {top1:>7}"


@dataclass
class NodeCheck:
    """Built-in kernel vs reference op for one quantized node, on the same input."""

    name: str
    op_type: str
    max_abs_error: float
    rel_l2_error: float
    limit: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rel_l2_error <= self.limit


@dataclass
class ValidationReport:
    """Result of :func:`validate`: :meth:`passed` applies thresholds, :meth:`format_table` prints it.

    ``nodes``, ``reference_outputs`` (reference-op run vs built-in): ``reference=True`` only.
    """

    outputs: list[OutputMetrics]
    nodes: list[NodeCheck] = field(default_factory=list)
    reference_outputs: list[OutputMetrics] = field(default_factory=list)
    batches: int = 1
    quantized_runtime: str = "built-in kernels"
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def failures(self, max_rel_error: float = MAX_REL_ERROR, min_cosine: float = MIN_COSINE) -> list[str]:
        out = [f for m in self.outputs for f in m.failures(max_rel_error, min_cosine)] + list(self.errors)
        for n in self.nodes:
            if not n.ok:
                why = n.error or f"built-in vs reference error {n.rel_l2_error:.3g} > {n.limit:g}"
                out.append(f"node {n.name!r} ({n.op_type}): {why}")
        return out

    def passed(self, max_rel_error: float = MAX_REL_ERROR, min_cosine: float = MIN_COSINE) -> bool:
        return not self.failures(max_rel_error, min_cosine)

    def format_table(self, max_rel_error: float = MAX_REL_ERROR, min_cosine: float = MIN_COSINE) -> str:
        lines = [f"{self.batches} batch(es); quantized model ran on {self.quantized_runtime}", _COLUMNS]
        lines += [m.row() + ("  FAIL" if m.failures(max_rel_error, min_cosine) else "") for m in self.outputs]
        if self.nodes:
            lines += ["", "per quantized node: built-in kernel vs reference op on the same input"]
            lines.append(f"{'node':<24} {'op':<16} {'max abs err':>11} {'rel L2 err':>10} {'limit':>9}  status")
            for n in self.nodes:
                status = "ok" if n.ok else ("FAIL" if n.error is None else f"ERROR: {n.error}")
                err = f"{n.max_abs_error:>11.3e} {n.rel_l2_error:>10.3e}"
                lines.append(f"{n.name:<24} {n.op_type:<16} {err} {n.limit:>9.1e}  {status}")
        if self.reference_outputs:
            lines += ["", "whole model on the reference ops vs on the built-in kernels", _COLUMNS]
            lines += [m.row() for m in self.reference_outputs]
        fails = self.failures(max_rel_error, min_cosine)
        lines += [f"note: {n}" for n in self.notes] + [""]
        verdict = "FAIL" if fails else "PASS"
        lines.append(f"result: {verdict} (rel L2 error <= {max_rel_error:g}, cosine >= {min_cosine:g})")
        return "\n".join(lines + [f"  - {f}" for f in fails])

    def __str__(self) -> str:
        return self.format_table()


class _Accumulator:
    """Running float64 sums for the metrics of one output over several batches."""

    def __init__(self, top1: bool = False) -> None:
        self.max_abs, self.diff2, self.ref2, self.got2, self.dot = 0.0, 0.0, 0.0, 0.0, 0.0
        self.agree, self.positions, self.shape, self.top1 = 0, 0, (), top1

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            raise ValidationInputError(f"output {name!r} has shape {list(got.shape)}, expected {list(ref.shape)}")
        r, g = ref.astype(np.float64).reshape(-1), got.astype(np.float64).reshape(-1)
        d = g - r
        self.shape = self.shape or ref.shape
        self.max_abs = float(np.max([self.max_abs, np.abs(d).max() if d.size else 0.0]))  # NaN propagates
        self.diff2, self.ref2 = self.diff2 + float(d @ d), self.ref2 + float(r @ r)
        self.got2, self.dot = self.got2 + float(g @ g), self.dot + float(r @ g)
        if self.top1 and np.issubdtype(ref.dtype, np.floating) and ref.ndim and ref.shape[-1] > 1:
            self.agree += int(np.sum(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
            self.positions += ref.size // ref.shape[-1]

    def metrics(self, name: str) -> OutputMetrics:
        rel = math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else (0.0 if self.diff2 == 0 else math.inf)
        both = self.ref2 > 0 and self.got2 > 0
        cos = self.dot / math.sqrt(self.ref2 * self.got2) if both else float(self.ref2 == self.got2)
        if not math.isfinite(self.diff2):
            rel = cos = math.nan
        top1 = self.agree / self.positions if self.positions else None
        return OutputMetrics(name, tuple(self.shape), self.max_abs, rel, cos, top1)

    @staticmethod
    def compare(names: list[str], refs: list[list], gots: list[list]) -> list[OutputMetrics]:
        """Metrics per output name, from per-batch output lists."""
        accs = [_Accumulator(top1=_is_logits(n)) for n in names]
        for ref, got in zip(refs, gots):
            for acc, name, r, g in zip(accs, names, ref, got):
                acc.add(name, r, g)
        return [acc.metrics(name) for acc, name in zip(accs, names)]


def _is_logits(name: str) -> bool:
    """Outputs whose argmax means something (top-1 agreement is reported for these only)."""
    low = name.lower()
    return any(w in low for w in ("logit", "prob", "score", "label"))


@dataclass
class _Loaded:
    model: ir.Model
    path: str | None
    label: str
    folder: str | None = None

    @classmethod
    def of(cls, obj: Any, label: str) -> _Loaded:
        if isinstance(obj, (str, os.PathLike)):
            from .folders import model_folder, resolve

            obj, folder = resolve(obj), os.fspath(model_folder(obj))
        else:
            folder = None
        model, kind = as_ir_model(obj)  # ModelInputError (a ValueError) for missing or unreadable files
        path = os.fspath(obj) if kind == "path" else None
        return cls(model, path, f"{label} model {path}" if path else f"{label} model", folder)


def _session(loaded: _Loaded, model: ir.Model | None = None, *, reference: bool = False) -> ort.InferenceSession:
    """A CPU session for ``model`` (default: the loaded one, from its path when it has one);
    ``reference=True``: the loaded model with its quantized nodes on the reference ops."""
    try:
        if reference:
            return ops.reference_session(loaded.model)
        so = ort.SessionOptions()
        if {n.domain for n in (model or loaded.model).graph.all_nodes()} - _KNOWN_DOMAINS:
            ops.register(so, contrib=False)  # other onnxruntime-extensions ops (tokenizers, ...)
        if model is None and loaded.path is not None:
            return ort.InferenceSession(loaded.path, so, providers=["CPUExecutionProvider"])
        return ops.inference_session(model or loaded.model, so)
    except Exception as exc:  # onnxruntime's exception classes derive from Exception only
        where = " on the reference ops" if reference else ""
        raise _LoadError(f"{loaded.label}: onnxruntime cannot load it{where}: {_line(exc)}") from None


def _run(sess: ort.InferenceSession, names: list[str], feeds: dict, label: str) -> tuple[list, list]:
    """Outputs and reference-op failures of one run."""
    ops.take_failures()
    try:
        outputs = sess.run(names, feeds)
    except Exception as exc:
        raise ValidationInputError(f"{label} failed to run: {_line(exc)}") from None
    return outputs, ops.take_failures()


def _reference_checks(loaded: _Loaded, batches: list[dict], names: list[str], report: ValidationReport) -> list:
    """Run the built-in kernels exposing each quantized node's inputs and output; compare each node
    with the reference op applied to the same inputs. Returns the model outputs per batch."""
    model, probes = ops.probe_quantized_nodes(loaded.model)
    sess = _session(loaded, model)
    all_names = names + [v.name for v in model.graph.outputs if v.name not in names]
    accs, errors, q_outputs = [_Accumulator() for _ in probes], [None] * len(probes), []
    for feeds in batches:
        outs = _run(sess, all_names, feeds, loaded.label)[0]
        q_outputs.append(outs[: len(names)])
        for j, probe in enumerate(probes):
            try:
                accs[j].add(probe.label, *probe.compare({**feeds, **dict(zip(all_names, outs))}))
            except ValueError as exc:
                errors[j] = errors[j] or _line(exc)
    for acc, error, p in zip(accs, errors, probes):
        m = acc.metrics(p.label)
        rel = math.inf if error else m.rel_l2_error
        report.nodes.append(NodeCheck(p.label, p.node.op_type, m.max_abs_error, rel, p.tolerance, error))
    return q_outputs


def _reference_run(loaded: _Loaded, batches: list[dict], names: list[str], report: ValidationReport) -> list:
    """The model's outputs per batch on the reference ops; op failures become node or report errors."""
    sess, outputs = _session(loaded, reference=True), []
    for feeds in batches:
        outs, failures = _run(sess, names, feeds, f"{loaded.label} on the reference ops")
        outputs.append(outs)
        for f in failures:
            check = next((n for n in report.nodes if n.name == f.node), None)
            if check is not None:
                check.error = check.error or f.message
            elif f"reference op failed: {f}" not in report.errors:
                report.errors.append(f"reference op failed: {f}")
    return outputs


def validate(
    original: Any,
    quantized: Any,
    *,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    data_reader: Any = None,
    reference: bool = False,
    seed: int = 0,
    outputs: Sequence[str] | None = None,
) -> ValidationReport:
    """Compare ``quantized`` with ``original`` (each a path, ``onnx.ModelProto`` or ``onnx_ir.Model``).

    ``inputs``: a feed dict or a list of them; ``data_reader``: a ``CalibrationDataReader``;
    neither: :func:`generate_inputs` (batch 1 when the model does not run at batch 2).
    ``outputs``: the output names to compare (default: all but the KV-cache outputs of a decoder).
    Paths may be model folders. Without built-in kernels (MatMulFpQ4 lacks AVX-512) the
    quantized model runs on the reference ops and the report says so. Unusable models or inputs
    raise ``ValueError`` (:class:`ValidationInputError`, ``ModelInputError`` for files).
    """
    orig, quant = _Loaded.of(original, "original"), _Loaded.of(quantized, "quantized")
    raw = _batches(inputs, data_reader)
    generated = not raw
    raw = raw or [generate_inputs(orig.model, seed, folder=orig.folder)]
    batches = [check_feeds(b, input_values(orig.model), "original model") for b in raw]
    q_inputs, names = sorted(v.name for v in input_values(quant.model)), sorted(batches[0])
    if q_inputs != names:
        raise ValidationInputError(f"the quantized model's inputs {q_inputs} differ from the original's {names}")
    try:
        names = compared_outputs(orig.model, outputs)
    except ValueError as exc:
        raise ValidationInputError(str(exc)) from None
    missing = [n for n in names if n not in {v.name for v in quant.model.graph.outputs}]
    if missing:
        raise ValidationInputError(f"the quantized model lacks the original's output(s) {', '.join(missing)}")
    sess = _session(orig)
    notes = []
    try:
        ref_outputs = [_run(sess, names, b, orig.label)[0] for b in batches]
    except ValidationInputError as exc:
        rows = {np.shape(v)[0] for v in batches[0].values() if np.ndim(v)}
        if not generated or rows != {2}:
            raise
        batches = [with_batch(batches[0], 1)]  # e.g. a torch export traced at batch 1
        try:
            ref_outputs = [_run(sess, names, batches[0], orig.label)[0]]
        except ValidationInputError:
            raise exc from None
        notes.append("the original model does not run at batch 2: generated inputs of batch 1")
    del sess  # one model in memory at a time
    report = ValidationReport(outputs=[], batches=len(batches), notes=notes)
    hidden = [v.name for v in orig.model.graph.outputs if v.name not in names]
    if hidden and outputs is None:
        report.notes.append(f"{len(hidden)} KV-cache output(s) not compared (choose outputs with --outputs)")
    try:
        if reference and any(ops.is_quantized_node(n) for n in quant.model.graph):
            q_outputs = _reference_checks(quant, batches, names, report)
        else:
            sess = _session(quant)
            q_outputs = [_run(sess, names, b, quant.label)[0] for b in batches]
            del sess
            if reference:
                report.notes.append("no MatMulNBits/MatMulFpQ4 node in the main graph: no per-node check")
    except _LoadError as exc:
        if not any(ops.is_quantized_node(n) for n in quant.model.graph.all_nodes()):
            raise
        reason = _line(exc).split(": ", 2)[-1]
        report.quantized_runtime = f"the reference ops (built-in kernels unavailable: {reason})"
        if reference:
            report.notes.append("per-node check skipped: the built-in kernels it compares with are unavailable")
        q_outputs, reference = _reference_run(quant, batches, names, report), False
    report.outputs = _Accumulator.compare(names, ref_outputs, q_outputs)
    if reference and report.nodes:
        ref_run = _reference_run(quant, batches, names, report)
        report.reference_outputs = _Accumulator.compare(names, q_outputs, ref_run)
    return report


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ort-wq validate``."""
    parser.add_argument("original", help="the original (float) ONNX model or model folder; external data is "
                        "read from beside it")  # fmt: skip
    parser.add_argument("quantized", help="the quantized ONNX model (or model folder) to check against ORIGINAL")
    parser.add_argument("--inputs", metavar="FILE.npz", help="model inputs, one array per model input name "
                        "(default: random inputs generated from the model's input signature)")  # fmt: skip
    parser.add_argument("--reference", action="store_true", help="also compare each MatMulNBits/MatMulFpQ4 node's "
                        "built-in kernel with the reference op on the same input (catches wrong packing)")  # fmt: skip
    parser.add_argument("--max-rel-error", type=float, default=MAX_REL_ERROR, metavar="X",
                        help="largest allowed relative L2 error of an output (default %(default)s)")  # fmt: skip
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE, metavar="X",
                        help="smallest allowed cosine similarity of an output (default %(default)s)")  # fmt: skip
    parser.add_argument("--outputs", metavar="NAME,...", help="compare only these outputs (default: all but "
                        "the KV-cache outputs of a decoder model)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default 0)")
    parser.add_argument("--report-json", metavar="FILE", help="also write the report as JSON (schema in the README)")


def run_validate_command(args: argparse.Namespace) -> int:
    """``ort-wq validate``: print the table; 0 within thresholds, 1 not, 2 on bad input."""
    try:
        if not args.max_rel_error >= 0:
            raise ValidationInputError(f"--max-rel-error must be >= 0, got {args.max_rel_error}")
        if not -1 <= args.min_cosine <= 1:
            raise ValidationInputError(f"--min-cosine must be between -1 and 1, got {args.min_cosine}")
        feeds = load_npz(args.inputs) if args.inputs else None
        outputs = [n.strip() for n in args.outputs.split(",") if n.strip()] if args.outputs else None
        report = validate(args.original, args.quantized, inputs=feeds, reference=args.reference, seed=args.seed,
                          outputs=outputs)  # fmt: skip
        if args.report_json:
            from .report_json import validate_report, write_report

            write_report(args.report_json, validate_report(report, original=args.original, quantized=args.quantized,
                                                           max_rel_error=args.max_rel_error,
                                                           min_cosine=args.min_cosine))  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"ort-wq validate: error: {_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback from the CLI
        print(f"ort-wq validate: error: validation failed unexpectedly: {type(exc).__name__}: {_line(exc)}", file=sys.stderr)
        return 2
    print(report.format_table(args.max_rel_error, args.min_cosine))
    return 0 if report.passed(args.max_rel_error, args.min_cosine) else 1
