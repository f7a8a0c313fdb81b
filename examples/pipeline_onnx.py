"""A pipeline: prune picks the kept neurons, DOTResize merges the rest in (one calibration per block), int8
quantization after ONNX export.

    python examples/pipeline_onnx.py --model smollm2-135m --out out/pipeline
    python examples/pipeline_onnx.py --out /tmp/pipe                  # tiny random Llama
"""
import argparse
import sys
from pathlib import Path

from dotresize_fx.compress import Pipeline, public

TINY = str(Path(__file__).with_name("factories.py")) + ":tiny_llama"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=TINY)
    p.add_argument("--passes", default="prune:mlp=0.2 dotresize:mlp=0.2 quantize:int8")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tiny = args.model == TINY
    report = public(Pipeline(args.passes).run(args.model, data="random" if tiny else "sotu",
                                              calib_samples=4 if tiny else 32, seq_len=256, eval_tokens=4096,
                                              out=args.out, overwrite=True, progress=not tiny))
    o, q = report["onnx"], report["quantized"]
    print(f"ONNX parity {o['max_abs_diff']:.2g}, latency compressed/dense {o.get('latency_ratio', float('nan')):.2f}; "
          f"int8: {q['quantized_nodes']} MatMuls, {q['size_mb_before']:.1f} -> {q['size_mb_after']:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
