"""Text to token windows, for calibration from text and for evaluation.

Tokenizes with the Hugging Face ``tokenizers`` library (``pip install 'ort-wq[llm]'``), with the
model's ``tokenizer.json`` (found beside the model by default), without special tokens, and cuts
the ids into consecutive windows of ``seq_len`` tokens (the last partial window is dropped
unless it is the only one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .model_io import ModelInputError

__all__ = ["CalibrationText", "load_tokenizer", "token_windows", "default_tokenizer"]

EXTRA_HINT = "pip install 'ort-wq[llm]'"


def default_tokenizer(model: str | os.PathLike) -> Path:
    """``tokenizer.json`` beside the model (or in the model folder)."""
    from .folders import model_folder

    return model_folder(model) / "tokenizer.json"


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a folder holding one)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelInputError(f"tokenizing text needs the 'tokenizers' package: {EXTRA_HINT}") from None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ModelInputError(f"{p}: no tokenizer file; give one with --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise ModelInputError(f"{p}: not a readable tokenizer.json ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise ModelInputError(f"{p}: no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelInputError(f"{p}: not UTF-8 text") from None
    if not text.strip():
        raise ModelInputError(f"{p}: the text file is empty")
    return text


def token_windows(text_file: str | os.PathLike, tokenizer: Any, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """int64 ``[windows, seq_len]`` of consecutive token ids (one shorter window for a short text)."""
    if seq_len < 2:
        raise ModelInputError(f"sequence length {seq_len} is too short; use at least 2 tokens")
    ids = np.asarray(tokenizer.encode(read_text(text_file), add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < 2:
        raise ModelInputError(f"{text_file}: the text gives {ids.size} token(s); at least 2 are needed")
    n = max(ids.size // seq_len, 1)
    n = min(n, max_windows) if max_windows else n
    width = min(seq_len, ids.size)
    return ids[: n * width].reshape(n, width)


@dataclass
class CalibrationText:
    """Calibration from a text file: ``quantize(..., calibration=CalibrationText("text.txt"))``.

    ``tokenizer``: a ``tokenizer.json`` path (default: the one beside the model); the text is cut
    into ``batches`` windows (default: all) of ``seq_len`` tokens, each fed as one batch of one
    row with the model's other decoder inputs (mask, positions, empty KV cache) filled in.
    """

    text: str | os.PathLike
    tokenizer: str | os.PathLike | None = None
    seq_len: int = 512
    batches: int | None = None

    def windows(self, model_path: str | os.PathLike | None) -> np.ndarray:
        tok = self.tokenizer
        if tok is None:
            if model_path is None:
                raise ModelInputError("CalibrationText needs tokenizer=... when the model is not a file")
            tok = default_tokenizer(model_path)
        return token_windows(self.text, load_tokenizer(tok), self.seq_len, self.batches)
