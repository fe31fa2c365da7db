"""How much did quantization change a language model? Perplexity and KL divergence on a text.

Both models read the same windows of ``seq_len`` consecutive tokens (one row each, past length 0,
the other decoder inputs filled in by :mod:`ort_wq.feeds`); for every position ``t`` below the
last, the next-token distributions ``p`` (original) and ``q`` (quantized) from the logits give

- NLL ``-log p(x[t+1])`` per model; perplexity = ``exp(mean NLL)``;
- ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, averaged over positions (nats per token),
  as llama.cpp's ``llama-perplexity --kl-divergence``;
- top-1 agreement: the share of positions where both models' argmax is the same token.

Memory is bounded by one window's logits per model: only the logits output is fetched, each
window is reduced to sums and dropped, and the float64 log-softmax runs on slices of rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .model_io import ModelInputError
from .model_io import first_line as _line

__all__ = ["ModelScore", "WindowScore", "EvalResult", "evaluate", "add_eval_arguments", "run_eval_command"]

_ROWS = 64  # positions per float64 log-softmax slice


@dataclass
class ModelScore:
    """One model's fit to the text."""

    perplexity: float
    nll: float


@dataclass
class WindowScore:
    index: int
    tokens: int
    original_nll: float
    quantized_nll: float
    kl_divergence: float
    top1_agreement: float


@dataclass
class EvalResult:
    """Result of :func:`evaluate`; overall values are means over all predicted positions."""

    original: ModelScore
    quantized: ModelScore
    kl_divergence: float
    top1_agreement: float
    tokens: int
    seq_len: int
    windows: list[WindowScore] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format_table(self) -> str:
        lines = [f"{'window':>6} {'tokens':>6} {'NLL orig':>9} {'NLL quant':>9} {'KL':>10} {'top-1':>7}"]
        for w in self.windows:
            lines.append(f"{w.index:>6} {w.tokens:>6} {w.original_nll:>9.4f} {w.quantized_nll:>9.4f} "
                         f"{w.kl_divergence:>10.3e} {w.top1_agreement:>7.4f}")  # fmt: skip
        lines += [
            "",
            f"original:  perplexity {self.original.perplexity:.4f} (NLL {self.original.nll:.4f})",
            f"quantized: perplexity {self.quantized.perplexity:.4f} (NLL {self.quantized.nll:.4f}, "
            f"{self.quantized.nll - self.original.nll:+.4f})",
            f"mean KL(original || quantized): {self.kl_divergence:.6f} nats/token; "
            f"top-1 agreement {self.top1_agreement:.4f}",
            f"{self.tokens} predicted tokens in {len(self.windows)} window(s) of {self.seq_len}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


class _LM:
    """A session plus what is needed to feed it token windows and read its logits."""

    def __init__(self, path: Any, label: str) -> None:
        import onnxruntime as ort

        from .feeds import decoder_layout
        from .folders import model_folder, resolve
        from .model_io import load_model

        self.path = resolve(path)
        self.label = f"{label} model {self.path}"
        self.model = load_model(self.path)
        self.layout = decoder_layout(self.model, model_folder(path))
        if self.layout.input_ids is None:
            raise ModelInputError(f"{self.label}: has no 'input_ids' input; eval needs a language model")
        outs = [v.name for v in self.model.graph.outputs]
        self.logits = next((n for n in outs if "logits" in n.lower()), outs[0])
        ids = next(v for v in self.model.graph.inputs if v.name == self.layout.input_ids)
        dims = tuple(ids.shape.dims) if ids.shape is not None else ()
        self.fixed_seq = dims[1] if len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 else None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelInputError(f"{self.label}: onnxruntime cannot load it: {_line(exc)}") from None

    def logits_of(self, window: np.ndarray) -> np.ndarray:
        from .feeds import make_feeds

        feeds = make_feeds(self.model, input_ids=window[None], layout=self.layout)
        try:
            (out,) = self.sess.run([self.logits], feeds)
        except Exception as exc:
            raise ModelInputError(f"{self.label} failed to run: {_line(exc)}") from None
        out = np.asarray(out)
        rows = out.reshape(-1, out.shape[-1])
        if rows.shape[0] != window.size:
            raise ModelInputError(f"{self.label}: output {self.logits!r} has shape {list(out.shape)}, "
                                  f"not one row of logits per token")  # fmt: skip
        return rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _score_window(lo: np.ndarray, lq: np.ndarray, targets: np.ndarray) -> tuple[float, float, float, int]:
    """Sums over positions: NLL original, NLL quantized, KL, top-1 matches (``lo``/``lq``: logits)."""
    nll_o = nll_q = kl = 0.0
    agree = 0
    for r0 in range(0, targets.size, _ROWS):
        r1 = min(r0 + _ROWS, targets.size)
        a, b = _log_softmax(lo[r0:r1]), _log_softmax(lq[r0:r1])
        t = targets[r0:r1]
        idx = np.arange(r1 - r0)
        nll_o -= float(a[idx, t].sum())
        nll_q -= float(b[idx, t].sum())
        kl += float(np.sum(np.exp(a) * (a - b)))
        agree += int(np.sum(np.argmax(a, -1) == np.argmax(b, -1)))
    return nll_o, nll_q, kl, agree


def evaluate(
    original: Any,
    quantized: Any,
    text: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    seq_len: int = 512,
    windows: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Perplexity of both models, mean KL(original || quantized) and top-1 agreement on ``text``.

    ``original``/``quantized``: model files or model folders; ``tokenizer``: a tokenizer.json
    (default: the one beside the original, else beside the quantized model); ``windows``: at most
    this many windows of ``seq_len`` tokens. Raises ``ValueError`` (``ModelInputError``) for
    unusable models, text or tokenizer.
    """
    from .text import default_tokenizer, load_tokenizer, read_text, token_windows

    read_text(text)  # a missing or empty text fails first
    if tokenizer is None:
        tokenizer = next((p for p in (default_tokenizer(original), default_tokenizer(quantized)) if p.is_file()),
                         default_tokenizer(original))  # fmt: skip
    tok = load_tokenizer(tokenizer)
    orig, quant = _LM(original, "original"), _LM(quantized, "quantized")
    notes = []
    fixed = orig.fixed_seq or quant.fixed_seq
    if fixed and fixed != seq_len:
        notes.append(f"the model takes {fixed} tokens per row: windows of {fixed}, not {seq_len}")
        seq_len = fixed
    ids = token_windows(text, tok, seq_len, windows)
    if fixed and ids.shape[1] != fixed:
        raise ModelInputError(f"{text}: gives {ids.shape[1]} tokens; the model takes rows of exactly {fixed}")
    rows = range(ids.shape[0])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="evaluating", unit="window", leave=False)
    scores, sums = [], np.zeros(4)
    for i in rows:
        w = ids[i]
        lo = orig.logits_of(w)
        lq = quant.logits_of(w)
        if lo.shape != lq.shape:
            raise ModelInputError(f"logits differ in shape: original {list(lo.shape)}, quantized {list(lq.shape)}")
        n = w.size - 1
        s = _score_window(lo[:n], lq[:n], w[1:])
        del lo, lq
        sums += s
        scores.append(WindowScore(i, n, s[0] / n, s[1] / n, s[2] / n, s[3] / n))
    total = int(sum(w.tokens for w in scores))
    nll_o, nll_q, kl, agree = (float(x) / total for x in sums)
    return EvalResult(
        original=ModelScore(_exp(nll_o), nll_o), quantized=ModelScore(_exp(nll_q), nll_q),
        kl_divergence=max(kl, 0.0), top1_agreement=agree, tokens=total, seq_len=int(ids.shape[1]),
        windows=scores, notes=notes,
    )  # fmt: skip


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ort-wq eval``."""
    from .cli import _positive_int

    parser.add_argument("original", help="the original model (file or model folder)")
    parser.add_argument("quantized", help="the quantized model (file or model folder)")
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score the models on")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (default: the one beside ORIGINAL, "
                        "else beside QUANTIZED); needs pip install 'ort-wq[llm]'")  # fmt: skip
    parser.add_argument("--seq-len", type=_positive_int, default=512, metavar="N",
                        help="tokens per window (default %(default)s)")
    parser.add_argument("--windows", type=_positive_int, default=None, metavar="N",
                        help="score at most N windows (default: the whole text)")
    parser.add_argument("--report-json", metavar="FILE", help="also write the result as JSON (schema in the README)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-window table")


def run_eval_command(args: argparse.Namespace) -> int:
    """``ort-wq eval``: print per-window and overall scores; 0 ok, 2 on bad input."""
    result = evaluate(args.original, args.quantized, args.text, tokenizer=args.tokenizer, seq_len=args.seq_len,
                      windows=args.windows, progress=not args.quiet and sys.stderr.isatty())  # fmt: skip
    if args.report_json:
        from .report_json import eval_report, write_report

        write_report(args.report_json, eval_report(result, original=args.original, quantized=args.quantized))
    text = result.format_table()
    print(text if not args.quiet else "\n".join(text.splitlines()[len(result.windows) + 2 :]))
    return 0
