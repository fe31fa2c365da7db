"""onnxruntime's own quantizer as a command, the anchor of ``bench_quantize.py``.

    python benchmarks/_ort_quantize.py IN OUT --bits 4 --block-size 32 --sym --accuracy-level 4

Does what ``python -m onnxruntime.quantization.matmul_nbits_quantizer --quant_method default``
does: ``onnx.load`` (external data included), ``MatMulNBitsQuantizer(...).process()`` with
``DefaultWeightOnlyQuantConfig`` (its C++ round-to-nearest), then
``model.save_model_to_file(OUT, use_external_data_format=True)`` (``OUT.data`` beside ``OUT``).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="symmetric", action="store_true", default=True)
    g.add_argument("--asym", dest="symmetric", action="store_false")
    ap.add_argument("--accuracy-level", type=int, default=4)
    args = ap.parse_args()

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    model = onnx.load(args.input)  # as the module's own command line does
    config = DefaultWeightOnlyQuantConfig(block_size=args.block_size, is_symmetric=args.symmetric,
                                          accuracy_level=args.accuracy_level, bits=args.bits)
    quant = MatMulNBitsQuantizer(model, bits=args.bits, block_size=args.block_size, is_symmetric=args.symmetric,
                                 accuracy_level=args.accuracy_level, algo_config=config)
    quant.process()
    quant.model.save_model_to_file(args.output, use_external_data_format=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
