"""Tied embedding / LM head on a real LLM: size on disk and quality per setting, side by side.

    python benchmarks/bench_embeddings.py [--model DIR] [--builder-int4 DIR] [--write-readme]

On the full SmolLM2-135M (onnxruntime-genai fp32 folder, ``../shared/llm/build_smollm2.sh``):
teacher-forced NLL, perplexity, mean KL(fp32 || quantized) and top-1 agreement of the
next-token distributions on ``../shared/models/smollm2-2l/dev_tokens.npz`` (8 windows of 256
tokens, each window on its own), and the bytes of the model files. Rows: fp32, onnxruntime's
``MatMulNBitsQuantizer`` (it leaves the embedding table in fp32), the onnxruntime-genai
builder's own int4 when ``--builder-int4`` names a folder it wrote, and ort-wq with the tied
table at several precisions (``--override lm_head=bits:B,block:S`` applies to the one shared
tensor, embedding included). ``--write-readme`` puts the table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, machine, md_table, update_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = Path(os.environ.get("ORT_WQ_DEV_CACHE", Path.home() / ".cache" / "ort-wq-dev")) / "smollm2-135m"
TOKENS = SHARED / "models" / "smollm2-2l" / "dev_tokens.npz"


def feeds_for(session, ids: np.ndarray, config: dict) -> dict[str, np.ndarray]:
    """A plain forward pass of a genai decoder: mask of ones, empty KV cache (sizes from genai_config.json)."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name.startswith("past_key_values"):
            heads, head_size = config["num_key_value_heads"], config["head_size"]
            feeds[inp.name] = np.zeros((ids.shape[0], heads, 0, head_size), dtype=np.float32)
        else:
            raise SystemExit(f"input {inp.name!r} is not one of a genai decoder's")
    return feeds


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def window_logprobs(path: Path, tokens: np.ndarray):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    config = json.loads((DEFAULT_MODEL / "genai_config.json").read_text())["model"]["decoder"]
    for row in tokens:
        ids = row[None, :].astype(np.int64)
        (logits,) = sess.run(["logits"], feeds_for(sess, ids, config))
        yield log_softmax(logits[0, :-1].astype(np.float64)).astype(np.float32), row[1:]


def evaluate(path: Path, tokens: np.ndarray, reference: list[np.ndarray] | None):
    nll, kl, top1, out = [], [], [], []
    for i, (lp, target) in enumerate(window_logprobs(path, tokens)):
        nll.append(-lp[np.arange(len(target)), target].mean())
        if reference is not None:
            ref = reference[i]
            kl.append(float((np.exp(ref) * (ref - lp)).sum(-1).mean()))
            top1.append(float((ref.argmax(-1) == lp.argmax(-1)).mean()))
        else:
            out.append(lp)
    m = float(np.mean(nll))
    return dict(nll=m, ppl=float(np.exp(m)), kl=float(np.mean(kl)) if kl else 0.0,
                top1=float(np.mean(top1)) if top1 else 1.0), out


def files_bytes(model: Path) -> int:
    total = model.stat().st_size
    for p in model.parent.iterdir():
        if p.name.startswith(model.name) and p != model and not p.name.endswith(".tmp"):
            total += p.stat().st_size
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="genai fp32 model folder")
    ap.add_argument("--builder-int4", type=Path, help="folder written by the genai builder with -p int4")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    src = args.model / "model.onnx"
    if not src.exists():
        raise SystemExit(f"{src} not found: build it with ../shared/llm/build_smollm2.sh")
    tokens = np.load(TOKENS)["input_ids"]

    import ort_wq

    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="bench_emb_") as tmp:
        tmp = Path(tmp)
        variants: list[tuple[str, Path | None, dict | None]] = [("fp32 (genai builder export)", src, None)]
        if args.builder_int4 and (args.builder_int4 / "model.onnx").exists():
            variants.append(("onnxruntime-genai builder int4", args.builder_int4 / "model.onnx", None))
        variants.append(("onnxruntime MatMulNBitsQuantizer 4-bit b32 asym", None, "ort"))
        for label, over in [("ort-wq default: table 4-bit b32 asym", None),
                            ("ort-wq, table 8-bit b32", "lm_head=bits:8,block:32"),
                            ("ort-wq, table 8-bit b64", "lm_head=bits:8,block:64"),
                            ("ort-wq, table 8-bit b128", "lm_head=bits:8,block:128"),
                            ("ort-wq, table 4-bit b16", "lm_head=bits:4,block:16")]:
            variants.append((label, None, {"override": over}))
        for label, path, how in variants:
            seconds = 0.0
            if how == "ort":
                path = tmp / "ort.onnx"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_ort_quantize.py"), str(src), str(path),
                                "--asym", "--block-size", "32"], check=True)
                seconds = time.perf_counter() - t0
            elif how is not None:
                path = tmp / f"q{len(rows)}.onnx"
                overrides = [ort_wq.NodeOverride.parse(how["override"])] if how["override"] else []
                t0 = time.perf_counter()
                ort_wq.quantize(str(src), ort_wq.WeightOnlyConfig(overrides=overrides), output=path)
                seconds = time.perf_counter() - t0
            metrics, logprobs = evaluate(path, tokens, reference)
            if reference is None:
                reference = logprobs
            rows.append([label, f"{files_bytes(path) / 1e6:.1f}", f"{metrics['nll']:.4f}", f"{metrics['ppl']:.2f}",
                         f"{metrics['kl']:.4f}", f"{metrics['top1']:.3f}", f"{seconds:.1f}" if seconds else ""])
            print(" | ".join(rows[-1]), flush=True)
            if how is not None:
                for p in tmp.iterdir():
                    if p.name.startswith(path.name):
                        p.unlink()
    headers = ["model", "MB on disk", "NLL", "perplexity", "KL vs fp32", "top-1 vs fp32", "quantize s"]
    table = md_table(headers, rows)
    body = (f"### Tied embedding / LM head on SmolLM2-135M\n\n`{command_line()}` on {machine()}.\n"
            f"Teacher-forced on `smollm2-2l/dev_tokens.npz` (8 x 256 tokens), accuracy_level 4 unless the tool "
            f"sets otherwise.\n\n{table}\n")
    print(table)
    if args.write_readme:
        update_readme("embeddings", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
