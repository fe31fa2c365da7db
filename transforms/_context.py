"""State shared by the rules of one quantization run.

The rules find weights; this context quantizes each distinct weight once (on a thread pool, so
weights are quantized in parallel while the graph is being rewritten), hands out the quantized
initializers (shared by every consumer of the same weight) and records the report.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import LayerStats, QuantizedWeight, QuantSpec, get_algorithm
from ort_wq.algorithms.base import uses_float_zero_points
from ort_wq.config import WeightOnlyConfig
from ort_wq.model_io import release
from ort_wq.report import ConvertedNode, QuantReport

from . import _emitters
from ._weights import WeightRef


@dataclass
class QuantEntry:
    """One quantized weight: its job and the initializer values that hold its bytes."""

    ref: WeightRef
    spec: QuantSpec
    emitter: Any
    algorithm: str
    future: Future
    values: dict[str, ir.Value] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    users: int = 0


class QuantContext:
    """Quantizes weights for the rules; one per model run (see ``setup``)."""

    def __init__(self, config: WeightOnlyConfig, stats: dict[str, LayerStats] | None = None, sink: Any = None) -> None:
        self.config = config
        self.sink = sink  # an ExternalDataSink: finished tensors go to disk instead of memory
        self.stats = stats or {}
        self.report = QuantReport()
        self._entries: dict[tuple, QuantEntry] = {}
        self._names: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self.emitter = _emitters.get(config.format)
        self.node_notes: dict[str, list[str]] = {}
        self._model_id: int | None = None

    # -- set-up -------------------------------------------------------------------------------
    def ensure_setup(self, model: ir.Model) -> None:
        if self._model_id != id(model):
            self.setup(model)

    def setup(self, model: ir.Model) -> None:
        """Learn every name in the model so new initializers never collide."""
        self._model_id = id(model)
        self._names = set()
        for graph in (model.graph, *model.graph.subgraphs()):
            self._names.update(v.name for v in graph.initializers.values() if v.name)
            self._names.update(v.name for v in graph.inputs if v.name)
            for node in graph:
                self._names.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self._names.add(node.name)

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
    def entry_for(self, ref: WeightRef, spec: QuantSpec, activation: ir.Value | None) -> QuantEntry:
        """The quantized form of ``ref`` under ``spec`` (created once, shared by all users)."""
        fmt = self.config.format
        key = (id(ref.value), ref.transpose, spec, fmt, self.config.algorithm)
        entry = self._entries.get(key)
        if entry is not None:
            entry.users += 1
            return entry
        algorithm, notes = self._algorithm_for(activation)
        fn, _ = get_algorithm(algorithm)
        if algorithm == self.config.algorithm and self.config.algorithm_options:
            fn = functools.partial(fn, **self.config.algorithm_options)
        if algorithm == "awq":  # the activation scaling was already folded into the graph (awq_fold)
            fn = functools.partial(fn, allow_input_scale=False)
        if spec.float_zero_points and self.config.zero_points == "auto" and not uses_float_zero_points(algorithm):
            spec = replace(spec, float_zero_points=False)
        stats = self.stats.get(activation.name) if activation is not None and activation.name else None
        emitter = _emitters.get(fmt)
        dtype = np.float16 if ref.dtype == ir.DataType.FLOAT16 else np.float32

        layout = emitter.layout(ref.k, ref.n, spec, dtype)
        base = ref.value.name or "weight"
        names = {key_name: self.unique_name(f"{base}{suffix}") for key_name, (suffix, _, _) in layout.items()}

        def job() -> dict[str, ir.TensorProtocol]:
            w = ref.numpy()
            result: QuantizedWeight = fn(w, spec, stats)
            del w
            release(ref.tensor)  # the fp32 weight leaves memory once it is quantized
            arrays = emitter.pack(result, ref.k, ref.n, spec, dtype)
            del result
            return {key_name: self._store(names[key_name], arr) for key_name, arr in arrays.items()}

        future = self.executor.submit(job)
        entry = QuantEntry(ref, spec, emitter, algorithm, future, notes=notes, users=1)
        graph = _owner_graph(ref.value)
        for key_name, (_, ir_dtype, shape) in layout.items():
            entry.values[key_name] = _lazy_initializer(graph, names[key_name], future, key_name, ir_dtype, shape)
        self._entries[key] = entry
        return entry

    def _store(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        """A finished array as a tensor: streamed to the output's data file when there is one."""
        if self.sink is not None and array.nbytes >= 1024:
            return self.sink.put(name, array)
        return ir.Tensor(array, name=name)

    def _algorithm_for(self, activation: ir.Value | None) -> tuple[str, list[str]]:
        name = self.config.algorithm
        _, needs = get_algorithm(name)
        if needs and (activation is None or activation.name not in self.stats):
            return "rtn", [f"no calibration statistics for this input: {name} replaced by rtn"]
        return name, []

    def record(self, node: ir.Node, new_op: str, entry: QuantEntry) -> None:
        ref, spec = entry.ref, entry.spec
        before = ref.tensor.nbytes
        after = sum(_nbytes(v) for v in entry.values.values())
        self.report.converted.append(
            ConvertedNode(
                node=node.name or "", op_type=node.op_type, new_op=new_op, weight=ref.value.name or "",
                k=ref.k, n=ref.n, bits=spec.bits, block_size=spec.block_size, symmetric=spec.symmetric,
                algorithm=entry.algorithm, bytes_before=before, bytes_after=after, shared=entry.users > 1,
                notes=[*entry.notes, *self.node_notes.get(node.name or "", [])],
            )
        )

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
                    tensors = fut.result()
                except Exception as exc:
                    raise RuntimeError(f"quantizing weight {entry.ref.value.name!r} failed: {exc}") from exc
                for key_name, value in entry.values.items():
                    value.const_value = tensors[key_name]
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


def _nbytes(value: ir.Value) -> int:
    shape = value.shape
    count = int(np.prod([int(d) for d in shape])) if shape is not None else 0
    return (count * value.dtype.bitwidth + 7) // 8 if value.dtype is not None else 0


def _owner_graph(value: ir.Value) -> ir.Graph | None:
    if value.graph is not None:
        return value.graph
    producer = value.producer()
    return producer.graph if producer is not None else None


def _lazy_initializer(graph: ir.Graph | None, name: str, future: Future, key: str, dtype: ir.DataType, shape) -> ir.Value:
    shape = ir.Shape(shape)

    def load() -> ir.TensorProtocol:
        return future.result()[key]

    tensor = ir.LazyTensor(load, dtype=dtype, shape=shape, name=name)
    value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype), const_value=tensor)
    if graph is not None:
        graph.register_initializer(value)
    return value
