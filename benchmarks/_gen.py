"""LLM-shaped benchmark models with external data, generated one weight at a time and cached.

The model (opset 21): ``input_ids`` int64 ``[batch, seq]`` -> token embedding (``Gather``) ->
``layers`` pre-norm blocks (LayerNorm, Q/K/V/O projections, single-head attention, LayerNorm,
``up`` [hidden, mlp] -> Gelu -> ``down`` [mlp, hidden], residuals) -> final LayerNorm ->
untied ``lm_head`` [hidden, vocab] -> ``logits``. No biases, no tied or transposed weights: every
projection is a plain ``MatMul`` with a 2-D fp32 initializer, the case both ort-wq and
onnxruntime's ``MatMulNBitsQuantizer`` handle, so the two are compared on the same work.

Weights are random normal (fixed seed, one generator per tensor) scaled by ``1/sqrt(K)`` and
written straight into ``model.onnx.data`` tensor by tensor (4 KiB aligned); the graph proto only
holds external-data references. Generating a 2.5 GB model needs the memory of one weight (64 MiB
at hidden 2048 / MLP 8192), not of the model.

Models are cached under ``$ORT_WQ_BENCH_DIR`` (default ``/tmp/ort-wq-bench``) in a folder named
after their shape; a folder appears only when it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ort_wq.demo import transformer_layers

ALIGN = 4096


def bench_dir() -> Path:
    d = Path(os.environ.get("ORT_WQ_BENCH_DIR", "/tmp/ort-wq-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class LLMSpec:
    layers: int
    hidden: int = 2048
    mlp: int = 8192
    vocab: int = 8192
    seed: int = 0

    @property
    def name(self) -> str:
        return f"llm_h{self.hidden}_m{self.mlp}_L{self.layers}_v{self.vocab}_s{self.seed}"

    @property
    def matmul_shapes(self) -> list[tuple[str, int, int]]:
        """``(name, K, N)`` of every quantizable MatMul weight, in graph order."""
        out = []
        h, m = self.hidden, self.mlp
        for i in range(self.layers):
            p = f"layers.{i}"
            out += [(f"{p}.attn.{t}.weight", h, h) for t in ("q", "k", "v", "o")]
            out += [(f"{p}.mlp.up.weight", h, m), (f"{p}.mlp.down.weight", m, h)]
        out.append(("lm_head.weight", h, self.vocab))
        return out

    @property
    def matmul_bytes(self) -> int:
        return sum(4 * k * n for _, k, n in self.matmul_shapes)

    @property
    def matmul_weights(self) -> int:
        return sum(k * n for _, k, n in self.matmul_shapes)

    @property
    def largest_weight_bytes(self) -> int:
        return max([4 * k * n for _, k, n in self.matmul_shapes] + [4 * self.vocab * self.hidden])

    @property
    def embedding_bytes(self) -> int:
        return 4 * self.vocab * self.hidden

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, MLP {self.mlp}, vocab {self.vocab}: "
                f"{len(self.matmul_shapes)} MatMuls, {self.matmul_bytes / 1e9:.2f} GB fp32 MatMul weights "
                f"(+{self.embedding_bytes / 1e6:.0f} MB embedding)")


def spec_for_size(gb: float, hidden: int = 2048, mlp: int = 8192, vocab: int = 8192, seed: int = 0) -> LLMSpec:
    """The layer count whose fp32 MatMul weights come closest to ``gb`` GB (at least one layer)."""
    per_layer = 4 * (4 * hidden * hidden + 2 * hidden * mlp)
    head = 4 * hidden * vocab
    layers = max(1, round((gb * 1e9 - head) / per_layer))
    return LLMSpec(layers=layers, hidden=hidden, mlp=mlp, vocab=vocab, seed=seed)


class _ExternalWriter:
    """Appends tensors to one external-data file and returns protos that reference them."""

    def __init__(self, path: Path) -> None:
        self.location = path.name
        self.f = open(path, "wb")  # noqa: SIM115
        self.offset = 0

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        pad = -self.offset % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        arr.tofile(self.f)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, value
        self.offset += arr.nbytes
        return t

    def close(self) -> None:
        self.f.close()


def _build(spec: LLMSpec, folder: Path) -> None:
    writer = _ExternalWriter(folder / "model.onnx.data")
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    index = [0]
    h = spec.hidden

    def weight(name: str, shape: tuple[int, int], scale: float) -> str:
        rng = np.random.default_rng((spec.seed, index[0]))
        index[0] += 1
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(scale)
        inits.append(writer.add(name, arr))
        del arr
        return name

    def small(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def linear(x: str, name: str, k: int, n: int) -> str:
        w = weight(f"{name}.weight", (k, n), k**-0.5)
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}.out"], name=f"{name}/MatMul"))
        return f"{name}.out"

    ones, zeros = small("ln.weight", np.ones(h)), small("ln.bias", np.zeros(h))

    def norm(x: str, name: str) -> str:
        nodes.append(helper.make_node("LayerNormalization", [x, ones, zeros], [f"{name}.out"], axis=-1,
                                      epsilon=1e-5, name=f"{name}/LayerNorm"))
        return f"{name}.out"

    try:
        weight("embed.weight", (spec.vocab, h), 1.0)
        nodes.append(helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed/Gather"))
        f = transformer_layers(nodes, "h0", spec.layers, h, spec.mlp, linear, norm, small("attn.scale", np.array(h**-0.5)))
        linear(f, "lm_head", h, spec.vocab)
        nodes[-1].output[0] = "logits"
    finally:
        writer.close()
    graph = helper.make_graph(
        nodes, spec.name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", spec.vocab])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10,
                              producer_name="ort-wq benchmarks")
    onnx.save_model(model, str(folder / "model.onnx"))
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=1))


def generate(spec: LLMSpec, root: Path | None = None, log=print) -> Path:
    """Path of ``model.onnx`` for ``spec``, generated into the cache when missing."""
    root = root or bench_dir()
    folder = root / spec.name
    model = folder / "model.onnx"
    if model.exists() and (folder / "spec.json").exists():
        return model
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=root))
    try:
        if log:
            log(f"generating {spec.describe()} in {folder} ...")
        _build(spec, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def file_bytes(model: Path) -> int:
    """Bytes of a model file plus every file beside it whose name starts with the model's (its data)."""
    model = Path(model)
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith(model.name) and p.is_file())


def warm_cache(model: Path) -> None:
    """Read the model and its data once so every timed run starts with the files in the page cache."""
    for p in Path(model).parent.iterdir():
        if p.is_file() and p.name.startswith(Path(model).name):
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
