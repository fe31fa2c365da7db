"""One calibrated quantization run in a fresh process, for ``bench_gptq_llm.py``.

    python benchmarks/_gptq_child.py layer ours|ort MODEL OUT --batches B --rows R
    python benchmarks/_gptq_child.py llm ours-rtn|ours-gptq|ours-awq|ort-gptq FOLDER OUT --windows W --seq-len S

``layer``: the model has one input ``x`` ``[batch, rows, K]``; both tools get the same ``B``
batches of ``[1, R, K]`` (generated from a fixed seed, heavy-tailed channels as real
activations have). ``llm``: both tools get the same ``W`` windows of ``S`` tokens of the
shared ``dev_text.txt`` with the model's own tokenizer (ours: ``--calibration-text``;
onnxruntime: a CalibrationDataReader feeding those ids with ones as the mask and empty KV caches).
4-bit, block 32, asymmetric, accuracy_level 4 for every tool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SHARED_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "smollm2-2l" / "dev_text.txt"


class Batches:
    """A CalibrationDataReader (get_next/rewind) over generated or given feed dicts."""

    def __init__(self, make, n: int) -> None:
        self.make, self.n, self.i = make, n, 0

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return self.make(self.i - 1)

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # onnxruntime's GPTQ iterates the reader
        return (self.make(i) for i in range(self.n))


def layer_batches(k: int, batches: int, rows: int) -> Batches:
    scale = np.exp(np.random.default_rng(123).standard_normal(k)).astype(np.float32)

    def make(i: int) -> dict:
        rng = np.random.default_rng(1000 + i)
        return {"x": (rng.standard_normal((1, rows, k), dtype=np.float32) * scale)}

    return Batches(make, batches)


def ort_gptq(model_path: str, out: str, reader) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    model = onnx.load(model_path)
    cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False, accuracy_level=4, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=True)


def llm_windows(folder: Path, windows: int, seq_len: int) -> np.ndarray:
    from ort_wq.text import load_tokenizer, token_windows

    return token_windows(SHARED_TEXT, load_tokenizer(folder / "tokenizer.json"), seq_len, windows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=("layer", "llm"))
    ap.add_argument("tool")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    import ort_wq

    cfg = dict(bits=4, block_size=32, symmetric=False, accuracy_level=4)
    if args.case == "layer":
        import onnx

        k = onnx.load(args.model, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[2].dim_value
        reader = layer_batches(k, args.batches, args.rows)
        if args.tool == "ours":
            ort_wq.quantize(args.model, ort_wq.WeightOnlyConfig(algorithm="gptq", **cfg), output=args.out,
                            calibration=reader)  # fmt: skip
        else:
            ort_gptq(args.model, args.out, reader)
        return 0
    folder = Path(args.model)
    if args.tool.startswith("ours-"):
        algo = args.tool.split("-", 1)[1]
        calib = ort_wq.CalibrationText(SHARED_TEXT, folder / "tokenizer.json", args.seq_len, args.windows)
        ort_wq.quantize(str(folder), ort_wq.WeightOnlyConfig(algorithm=algo, **cfg), output=args.out,
                        calibration=calib if algo != "rtn" else None)  # fmt: skip
        return 0
    from ort_wq.feeds import decoder_layout, make_feeds
    from ort_wq.model_io import load_model

    model = load_model(folder / "model.onnx")
    layout = decoder_layout(model, folder)
    ids = llm_windows(folder, args.windows, args.seq_len)
    reader = Batches(lambda i: make_feeds(model, input_ids=ids[i][None], layout=layout), len(ids))
    Path(args.out).mkdir(exist_ok=True)
    ort_gptq(str(folder / "model.onnx"), str(Path(args.out) / "model.onnx"), reader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
