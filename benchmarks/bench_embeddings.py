"""Tied embedding / LM head on a real LLM: size on disk and quality per setting, side by side.

    python benchmarks/bench_embeddings.py [--model DIR] [--builder-int4 DIR] [--write-readme]

On the full SmolLM2-135M (onnxruntime-genai fp32 folder, ``../shared/llm/build_smollm2.sh``):
teacher-forced NLL, perplexity, mean KL(fp32 || quantized) and top-1 agreement of the
next-token distributions on ``../shared/models/smollm2-2l/dev_tokens.npz`` (8 windows of 256
tokens, each window on its own), and the bytes of the model files. Rows: fp32, onnxruntime's
``MatMulNBitsQuantizer`` (it leaves the embedding table in fp32), the onnxruntime-genai
builder's own int4 when ``--builder-int4`` names a folder it wrote, and ort-wq with the tied
table at several precisions (``--override lm_head=bits:B,block:S`` applies to the one shared
tensor, embedding included). A second table compares the file sizes at onnxruntime's own
settings: MatMuls only (the table left in fp32, as onnxruntime leaves it), 4-bit, block 32/128,
sym/asym, each tool writing ``model.onnx`` + external data in a folder of its own: total bytes on
disk, ours/onnxruntime's and the difference (``--sizes-only``: just that table, ~1 min).
``--write-readme`` puts the tables in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llm as L  # noqa: E402
from _report import command_line, machine, md_table, update_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = L.SMOLLM2


def evaluate(path: Path, tokens: np.ndarray, reference: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """NLL, perplexity, KL and top-1 against ``reference`` log-probabilities (``_llm``)."""
    lp = L.log_probs(path, tokens)
    m = L.nll(lp, tokens)
    if reference is None:
        return dict(nll=m, ppl=float(np.exp(m)), kl=0.0, top1=1.0), lp
    return dict(nll=m, ppl=float(np.exp(m)), kl=L.kl(reference[:, :-1], lp[:, :-1]),
                top1=L.top1(reference[:, :-1], lp[:, :-1])), lp


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def size_table(src: Path) -> str:
    """Bytes on disk, ort-wq vs onnxruntime's quantizer at the same flags (MatMuls only), per setting."""
    import ort_wq

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_size_") as tmp:
        for block in (32, 128):
            for sym in (True, False):
                ours, theirs = Path(tmp) / f"ours{block}{sym}", Path(tmp) / f"ort{block}{sym}"
                ours.mkdir()
                theirs.mkdir()
                cfg = ort_wq.WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, accuracy_level=4,
                                              op_types=("MatMul", "Gemm", "FusedMatMul"))
                ort_wq.quantize(str(src), cfg, output=ours / "model.onnx")
                # run in its folder: onnx checks the data file's name against the working folder
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_ort_quantize.py"), str(src), "model.onnx",
                                "--sym" if sym else "--asym", "--block-size", str(block)], check=True, cwd=theirs)
                a, b = folder_bytes(ours), folder_bytes(theirs)
                graphs = (ours / "model.onnx").stat().st_size, (theirs / "model.onnx").stat().st_size
                rows.append([f"4-bit b{block} {'sym' if sym else 'asym'}", f"{a:,}", f"{b:,}", f"{a / b:.6f}x",
                             f"{a - b:+,}", f"{graphs[0]:,} / {graphs[1]:,}"])
                print(" | ".join(rows[-1]), flush=True)
                for folder in (ours, theirs):
                    for f in folder.iterdir():
                        f.unlink()
    headers = ["setting", "ort-wq bytes", "onnxruntime bytes", "ours/ort", "difference", "graph file bytes (ours / ort)"]
    table = md_table(headers, rows)
    print(table)
    return (f"### Output size at onnxruntime's flags, SmolLM2-135M\n\n`{command_line()}` on {machine()}.\n"
            f"MatMuls only (the embedding table left fp32 on both sides), accuracy_level 4; each tool writes "
            f"`model.onnx` + external data into its own folder; bytes = all files. The quantized bytes are "
            f"identical; what differs is names, value_info and metadata in the graph file.\n\n{table}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="genai fp32 model folder")
    ap.add_argument("--builder-int4", type=Path, help="folder written by the genai builder with -p int4")
    ap.add_argument("--sizes-only", action="store_true", help="only the same-flags size table")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    src = args.model / "model.onnx"
    if not src.exists():
        raise SystemExit(f"{src} not found: build it with ../shared/llm/build_smollm2.sh")
    sizes = size_table(src)
    if args.write_readme:
        update_readme("output_size", sizes)
    if args.sizes_only:
        return 0
    tokens = L.dev_tokens()

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
            del logprobs
            rows.append([label, f"{L.model_bytes(path) / 1e6:.1f}", f"{metrics['nll']:.4f}", f"{metrics['ppl']:.2f}",
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
