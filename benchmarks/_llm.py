"""Shared by the LLM benchmarks: teacher-forced NLL / KL of onnxruntime-genai decoder folders.

A genai-format decoder (``model.onnx`` with ``input_ids``, ``attention_mask`` and
``past_key_values.{i}.{key,value}``) runs one forward pass per window: attention mask of ones,
empty past ``[b, kv_heads, 0, head_size]``. Evaluation tokens: ``smollm2-2l/dev_tokens.npz``
(8 windows x 256 tokens of ``dev_text.txt``). Calibration tokens come from the same text after
those 2,048 tokens (no overlap), tokenized with the model's ``tokenizer.json`` when the optional
``tokenizers`` package is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("ORT_WQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SMOLLM2_2L = SHARED / "models" / "smollm2-2l"
SMOLLM2 = Path(os.environ.get("ORT_WQ_DEV_CACHE", Path.home() / ".cache" / "ort-wq-dev")) / "smollm2-135m"
DEV_TOKENS = SMOLLM2_2L / "dev_tokens.npz"


def available(folder: Path) -> bool:
    return (folder / "model.onnx").exists() and DEV_TOKENS.exists()


def dev_tokens() -> np.ndarray:
    return np.load(DEV_TOKENS)["input_ids"]


def _text_ids() -> list[int] | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tok = Tokenizer.from_file(str(SMOLLM2_2L / "tokenizer.json"))
    return tok.encode((SMOLLM2_2L / "dev_text.txt").read_text(), add_special_tokens=False).ids


def _windows(ids: list[int], start: int, count: int | None, seq: int) -> np.ndarray:
    ids = np.asarray(ids[start : None if count is None else start + count], dtype=np.int64)
    return ids[: (ids.size // seq) * seq].reshape(-1, seq)


def calibration_tokens(rows: int = 8, seq: int = 256) -> np.ndarray | None:
    """``[rows, seq]`` token windows of dev_text.txt after the evaluation tokens (None without ``tokenizers``)."""
    ids = _text_ids()
    return None if ids is None else _windows(ids, dev_tokens().size, rows * seq, seq)


def held_out_tokens(seq: int = 256) -> np.ndarray | None:
    """Every whole ``seq`` window of dev_text.txt after the evaluation and the default calibration
    tokens (``2 x 2,048``): text no choice was measured on (None without ``tokenizers``)."""
    ids = _text_ids()
    return None if ids is None else _windows(ids, 2 * dev_tokens().size, None, seq)


def feeds_for(model_path: str | os.PathLike, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Forward-pass feeds for ``ids [b, s]``: mask of ones, empty KV cache (``ort_wq.feeds``)."""
    from ort_wq.feeds import make_feeds
    from ort_wq.model_io import load_model

    path = Path(model_path)
    return make_feeds(load_model(path), input_ids=ids.astype(np.int64), folder=path.parent)


def log_probs(model_path: str | os.PathLike, ids: np.ndarray, batch: int = 2) -> np.ndarray:
    """``log_softmax(logits)`` float32 ``[b, s, V]`` of a forward pass over every window."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(ids), batch):
        feeds = feeds_for(model_path, ids[i : i + batch])
        logits = sess.run(["logits"], {k: v for k, v in feeds.items() if k in {x.name for x in sess.get_inputs()}})[0]
        logits = logits.astype(np.float32)
        logits -= logits.max(-1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append(logits)
    return np.concatenate(out)


def nll(lp: np.ndarray, ids: np.ndarray) -> float:
    """Mean teacher-forced negative log-likelihood of ``ids[:, 1:]`` (perplexity = exp)."""
    tgt = ids[:, 1:]
    return float(-np.take_along_axis(lp[:, :-1], tgt[..., None], -1).mean())


def kl(ref: np.ndarray, lp: np.ndarray) -> float:
    """Mean KL(ref || quantized) per token, from log-probabilities."""
    return float((np.exp(ref) * (ref - lp)).sum(-1).mean())


def top1(ref: np.ndarray, lp: np.ndarray) -> float:
    """Share of positions where both models predict the same next token."""
    return float((ref.argmax(-1) == lp.argmax(-1)).mean())


def model_bytes(model_path: str | os.PathLike) -> int:
    p = Path(model_path)
    return sum(f.stat().st_size for f in p.parent.iterdir() if f.name.startswith(p.name))
