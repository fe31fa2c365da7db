"""Shared by the MiniLM benchmarks: the shared model, its inputs, embeddings and quality measures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

SHARED = Path(os.environ.get("ORT_WQ_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "minilm" / "minilm_l6.onnx"
INPUTS = SHARED / "models" / "minilm" / "dev_inputs.npz"


def available() -> bool:
    return MINILM.exists() and INPUTS.exists()


def inputs(rows: slice = slice(None)) -> dict[str, np.ndarray]:
    data = np.load(INPUTS)
    return {k: data[k][rows] for k in ("input_ids", "attention_mask")}


def embed(model, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out).astype(np.float64)


def quality(ref: np.ndarray, emb: np.ndarray) -> tuple[float, float]:
    """Mean cosine similarity and nearest-neighbour agreement (each row's closest other row)."""
    cos = np.sum(ref * emb, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1))

    def nn(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return float(cos.mean()), float(np.mean(nn(ref) == nn(emb)))
