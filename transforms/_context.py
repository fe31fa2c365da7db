"""State shared by the rules of one quantization run.

The target finder (``targets.py``) decides which tensors are quantized; this context quantizes
each one once (on a thread pool, so tensors are quantized in parallel while the graph is being
rewritten), packs it into every storage its consumers read (one set of bytes for a tied
embedding and head), hands out the initializers and records the report.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import LayerStats, QuantizedWeight, QuantSpec, _progress, get_algorithm
from ort_wq.algorithms.base import reads_input_gain
from ort_wq.config import WeightOnlyConfig
from ort_wq.model_io import ModelInputError, first_line, release
from ort_wq.report import ConvertedNode, QuantReport

from . import _emitters
from ._weights import WeightRef
from .norms import input_gain
from .targets import Target, TargetSet, find_targets, with_zero_points


@dataclass
class QuantEntry:
    """One quantized tensor: its job and, per storage, the initializer values that hold its bytes."""

    target: Target
    spec: QuantSpec
    algorithm: str
    future: Future
    values: dict[str, dict[str, ir.Value]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ref(self) -> WeightRef:
        return self.target.ref


class QuantContext:
    """Quantizes target tensors for the rules; one per model run (see ``setup``)."""

    def __init__(self, config: WeightOnlyConfig, stats: dict[str, LayerStats] | None = None, sink: Any = None) -> None:
        self.config = config
        self.sink = sink  # an ExternalDataSink: finished tensors go to disk instead of memory
        self.stats = stats if stats is not None else {}
        self.progress = False  # show a bar for a long solve of one weight (set by the pass)
        self.report = QuantReport()
        self._entries: dict[int, QuantEntry] = {}
        self._names: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self.node_notes: dict[str, list[str]] = {}
        self._model_id: int | None = None
        self.targets = TargetSet()

    # -- set-up -------------------------------------------------------------------------------
    def ensure_setup(self, model: ir.Model) -> None:
        if self._model_id != id(model):
            self.setup(model)

    def setup(self, model: ir.Model) -> None:
        """Find the targets and learn every name in the model so new initializers never collide."""
        self._model_id = id(model)
        self._names = set()
        for graph in (model.graph, *model.graph.subgraphs()):
            self._names.update(v.name for v in graph.initializers.values() if v.name)
            self._names.update(v.name for v in graph.inputs if v.name)
            for node in graph:
                self._names.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self._names.add(node.name)
        self.targets = find_targets(model, self.config)

    def emitter_for_matmul(self):
        """The MatMul emitter of the configured format."""
        return _emitters.get(self.config.format)

    def unique_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            workers = self.config.threads or os.cpu_count() or 1
            if get_algorithm(self.config.algorithm)[1]:
                workers = 1  # GPTQ/AWQ spend their time in multithreaded BLAS: one weight at a time
            self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort-wq")
        return self._executor

    # -- quantization -------------------------------------------------------------------------
    def entry_for(self, target: Target) -> QuantEntry:
        """The quantized form of ``target`` (created once, read by all its consumers)."""
        entry = self._entries.get(id(target))
        if entry is not None:
            return entry
        spec = target.spec
        activation = target.activation
        algorithm, notes = self._algorithm_for(activation, target)
        fn, _ = get_algorithm(algorithm)
        if algorithm == self.config.algorithm and self.config.algorithm_options:
            fn = functools.partial(fn, **self.config.algorithm_options)
        if reads_input_gain(algorithm) and activation is not None:
            fn = functools.partial(fn, input_gain=input_gain(activation, target.ref.k))
        if algorithm == "awq":  # the activation scaling was already folded into the graph (awq_fold)
            fn = functools.partial(fn, allow_input_scale=False)
        if algorithm != target.algorithm:
            spec = with_zero_points(spec, algorithm, self.config)
        stats_name = activation.name if activation is not None and activation.name in self.stats else None
        ref = target.ref
        dtype = np.float16 if ref.dtype == ir.DataType.FLOAT16 else np.float32
        packers = _emitters.storages(target, self.config.format)
        layouts = {kind: storage.layout(ref.k, ref.n, spec, dtype, **opts) for kind, (storage, opts) in packers.items()}
        base = ref.value.name or "weight"
        names = {kind: {key: self.unique_name(f"{base}{suffix}") for key, (suffix, _, _) in layout.items()}
                 for kind, layout in layouts.items()}
        what = ref.value.name or "weight"
        entry_notes = [*target.notes, *notes]  # the algorithm's own are added by materialize()

        def job() -> tuple[dict[str, dict[str, ir.TensorProtocol]], list[str]]:
            # statistics are read here, on the worker: calibration runs the model only as far
            # as the weights being quantized, and frees each activation's statistics after use
            stats = self.stats[stats_name] if stats_name is not None else None
            w = ref.numpy()
            try:
                with np.errstate(invalid="ignore", over="ignore"), _progress.reporting(what, self.progress):
                    result: QuantizedWeight = fn(w, spec, stats)  # non-finite weights: refused below
            except ValueError as exc:
                raise ModelInputError(f"weight {what!r} {ref.tensor.shape}: {first_line(exc)}") from None
            del w, stats
            if stats_name is not None and hasattr(self.stats, "release"):
                self.stats.release(stats_name)
            if not (np.isfinite(np.asarray(result.scale, np.float32)).all() and _finite_zero_points(result)):
                # a NaN or infinite weight makes its block's range (and so its scale) non-finite
                raise ModelInputError(f"weight {what!r} {list(ref.tensor.shape)} holds NaN or infinite values; "
                                      "fix the model (or exclude the weight with --exclude)")
            release(ref.tensor)  # the float weight leaves memory once it is quantized
            out = {}
            for kind, (storage, opts) in packers.items():
                arrays = storage.pack(result, ref.k, ref.n, spec, dtype, **opts)
                out[kind] = {key: self._store(names[kind][key], arr) for key, arr in arrays.items()}
            return out, list(result.notes)

        future = self.executor.submit(job)
        entry = QuantEntry(target, spec, algorithm, future, notes=entry_notes)
        graph = _owner_graph(ref.value)
        for kind, layout in layouts.items():
            entry.values[kind] = {
                key: _lazy_initializer(graph, names[kind][key], future, kind, key, ir_dtype, shape)
                for key, (_, ir_dtype, shape) in layout.items()
            }
        self._entries[id(target)] = entry
        return entry

    def _store(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        """A finished array as a tensor: streamed to the output's data file when there is one."""
        if self.sink is not None and array.nbytes >= 1024:
            return self.sink.put(name, array)
        return ir.Tensor(array, name=name)

    def _algorithm_for(self, activation: ir.Value | None, target: Target) -> tuple[str, list[str]]:
        name = target.algorithm  # the target finder's choice (its notes are the target's)
        _, needs = get_algorithm(name)
        if needs and (activation is None or activation.name not in self.stats):
            return "rtn", [f"no calibration statistics for this input: {name} replaced by rtn"]
        return name, []

    def record(self, node: ir.Node, new_op: str, entry: QuantEntry) -> None:
        ref, spec = entry.ref, entry.spec
        self.report.converted.append(
            ConvertedNode(
                node=node.name or "", op_type=node.op_type, new_op=new_op, weight=ref.value.name or "",
                k=ref.k, n=ref.n, bits=spec.bits, block_size=spec.block_size, symmetric=spec.symmetric,
                algorithm=entry.algorithm, shared=len(entry.target.consumers) > 1,
                notes=[*entry.notes, *self.node_notes.get(node.name or "", [])],
            )
        )

    def entries(self) -> list[QuantEntry]:
        """Every tensor quantized so far (in the order they were first needed)."""
        return list(self._entries.values())

    def materialize(self, progress: bool = False) -> None:
        """Wait for every quantization job and store its bytes in the initializers."""
        entries = list(self._entries.values())
        bar = None
        if progress and entries:
            from tqdm import tqdm

            bar = tqdm(total=len(entries), unit="weight", desc="quantizing", leave=False, dynamic_ncols=True)
        done_bytes, started = 0, time.perf_counter()
        try:
            pending = {e.future: e for e in entries}
            for fut in as_completed(pending):
                entry = pending.pop(fut)
                try:
                    tensors, notes = fut.result()
                except ModelInputError:
                    raise  # already names the weight and what to do
                except Exception as exc:
                    raise RuntimeError(f"quantizing weight {entry.ref.value.name!r} failed: {exc}") from exc
                for kind, values in entry.values.items():
                    for key_name, value in values.items():
                        value.const_value = tensors[kind][key_name]
                entry.notes.extend(n for n in notes if n not in entry.notes)  # on this thread: the report is deterministic
                del tensors, fut
                if bar is not None:
                    done_bytes += entry.ref.tensor.nbytes
                    rate = done_bytes / max(time.perf_counter() - started, 1e-9) / 1e6
                    bar.set_postfix_str(f"{rate:.0f} MB/s of fp32 weights", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self.shutdown()
        self._entries.clear()

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _finite_zero_points(result: QuantizedWeight) -> bool:
    zp = result.zero_point
    return zp is None or not np.issubdtype(np.asarray(zp).dtype, np.floating) or bool(np.isfinite(zp).all())


def _owner_graph(value: ir.Value) -> ir.Graph | None:
    if value.graph is not None:
        return value.graph
    producer = value.producer()
    return producer.graph if producer is not None else None


def _lazy_initializer(graph: ir.Graph | None, name: str, future: Future, kind: str, key: str,
                      dtype: ir.DataType, shape) -> ir.Value:
    shape = ir.Shape(shape)

    def load() -> ir.TensorProtocol:
        return future.result()[0][kind][key]  # (tensors by kind, notes)

    tensor = ir.LazyTensor(load, dtype=dtype, shape=shape, name=name)
    value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype), const_value=tensor)
    if graph is not None:
        graph.register_initializer(value)
    return value
