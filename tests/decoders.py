"""A tiny decoder with KV-cache inputs (genai/optimum names), a batch-1-only model, a [-1, K] model,
and a word-level tokenizer for it: built here, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HEADS, HEAD, HIDDEN = 64, 2, 32, 96
DIM = HEADS * HEAD
WORDS = [f"w{i}" for i in range(VOCAB)]


def tiny_decoder(head_dim="kv_cache_dim", ids_shape=("batch_size", "sequence_length"), layers=1) -> onnx.ModelProto:
    """ids + positions -> embeddings -> per layer: K/V projections concatenated to the past
    (``past_key_values.L.key|value`` [batch, 2, past, head]) -> MLP -> logits, scaled by the mask and
    shifted by the mean of the present keys (so every input matters)."""
    rng = np.random.default_rng(0)
    init = lambda name, a: numpy_helper.from_array(np.asarray(a), name)  # noqa: E731
    inits = [init("E", rng.standard_normal((VOCAB, DIM)).astype(np.float32)),
             init("P", (rng.standard_normal((128, DIM)) / 4).astype(np.float32)),
             init("W1", (rng.standard_normal((DIM, HIDDEN)) / 8).astype(np.float32)),
             init("W2", (rng.standard_normal((HIDDEN, VOCAB)) / 10).astype(np.float32)),
             init("kv_shape", np.array([0, 0, HEADS, HEAD], np.int64)), init("ax1", np.array([1], np.int64)),
             init("ax123", np.array([1, 2, 3], np.int64)), init("ax12", np.array([1, 2], np.int64))]  # fmt: skip
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["tok"]),
             helper.make_node("Gather", ["P", "position_ids"], ["pos"]),
             helper.make_node("Add", ["tok", "pos"], ["x"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, list(ids_shape)),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, list(ids_shape))]  # fmt: skip
    outputs, shifts = [], []
    for layer in range(layers):
        for kind in ("key", "value"):
            w = f"W{kind[0]}{layer}"
            inits.append(init(w, (rng.standard_normal((DIM, DIM)) / 8).astype(np.float32)))
            past, present = f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"
            nodes += [helper.make_node("MatMul", ["x", w], [f"{w}_y"], name=f"layers.{layer}.{kind}_proj"),
                      helper.make_node("Reshape", [f"{w}_y", "kv_shape"], [f"{w}_r"]),
                      helper.make_node("Transpose", [f"{w}_r"], [f"{w}_t"], perm=[0, 2, 1, 3]),
                      helper.make_node("Concat", [past, f"{w}_t"], [present], axis=2)]  # fmt: skip
            dims = ["batch_size", HEADS, "past_sequence_length", head_dim]
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, dims))
            dims = ["batch_size", HEADS, "total_sequence_length", head_dim]
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, dims))
        nodes.append(helper.make_node("ReduceMean", [f"present.{layer}.key", "ax123"], [f"shift{layer}"], keepdims=0))
        shifts.append(f"shift{layer}")
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mlp.up"),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "W2"], ["raw"], name="lm_head"),
              helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
              helper.make_node("ReduceMin", ["m", "ax1"], ["m1"], keepdims=0),
              helper.make_node("Sum", shifts + ["m1"], ["s"]),
              helper.make_node("Unsqueeze", ["s", "ax12"], ["s3"]),
              helper.make_node("Add", ["raw", "s3"], ["logits"])]  # fmt: skip
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*ids_shape, VOCAB])
    graph = helper.make_graph(nodes, "decoder", inputs, [logits, *outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def batch1_model(k: int = 64, n: int = 32) -> onnx.ModelProto:
    """x [batch, k] reshaped to [1, k] (as a trace at batch 1 does): runs only at batch 1."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1, k], np.int64), "shape")]  # fmt: skip
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x1"]), helper.make_node("MatMul", ["x1", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "b1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def dynamic_k_model(k: int = 64, n: int = 32) -> onnx.ModelProto:
    """onnxruntime's own test-model input shape: ``[-1, K]``."""
    w = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, n])],
                              [numpy_helper.from_array(w, "W")])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json over ``WORDS`` (whitespace pre-tokenizer)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path


def write_text(path: Path, words: int = 600, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(WORDS[i] for i in rng.integers(0, VOCAB, words)) + "\n")
    return path


def decoder_folder(folder: Path, **kwargs) -> Path:
    """A model folder: model.onnx, tokenizer.json, genai_config.json (head size), a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_decoder(**kwargs), folder / "model.onnx")
    cfg = {"model": {"decoder": {"filename": "model.onnx", "head_size": HEAD, "num_key_value_heads": HEADS}}}
    (folder / "genai_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    try:
        write_tokenizer(folder / "tokenizer.json")
    except ImportError:  # the tokenizers package (ort-wq[llm]) is absent: tests that need it skip
        pass
    return folder
