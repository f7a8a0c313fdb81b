"""onnxruntime latency of the dense embedded model exported at two opsets (attention as MatMul/Softmax at 18,
one ONNX Attention node at 23), on the same random ids, runs interleaved.

    .venv/bin/python benchmarks/onnx_opset.py [--model smollm2-135m] [--opsets 18 23] [--batch 8] [--seq 512]
"""
import argparse
import datetime
import json
import platform

import torch

from dotresize_fx.export import dense_onnx, latency, session
from dotresize_fx.load import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--opsets", type=int, nargs="+", default=[18, 23])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _, inputs = load(args.model)
    sessions = [session(dense_onnx(model, inputs, opset), args.threads) for opset in args.opsets]
    seconds = latency(sessions, args.batch, args.seq, model.config.vocab_size, repeats=args.repeats)
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                      f"{args.threads} threads", "model": args.model, "shape": [args.batch, args.seq],
                      "median_s": dict(zip(map(str, args.opsets), seconds))}, indent=1))


if __name__ == "__main__":
    main()
