"""onnxruntime latency of the dense embedded model exported at two opsets (attention as MatMul/Softmax at 18,
one ONNX Attention node at 23), on the same random ids, runs interleaved. `--repeat-kv` adds the opset-23 file
as Hugging Face writes it when a mask is passed: grouped-query keys and values repeated once per query head
(the export otherwise hands them to the Attention node unrepeated).

    .venv/bin/python benchmarks/onnx_opset.py [--model smollm2-135m] [--opsets 18 23] [--repeat-kv] [--batch 8]
        [--seq 512]
"""
import argparse
import contextlib
import datetime
import json
import platform
import tempfile
from pathlib import Path
from unittest import mock

import torch

from dotresize_fx import export
from dotresize_fx.export import dense_onnx, latency, session
from dotresize_fx.load import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--opsets", type=int, nargs="+", default=[18, 23])
    p.add_argument("--repeat-kv", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _, inputs = load(args.model)
    names, paths = [str(o) for o in args.opsets], [dense_onnx(model, inputs, opset) for opset in args.opsets]
    with tempfile.TemporaryDirectory() as tmp:
        if args.repeat_kv:
            with mock.patch.object(export, "_native_gqa", contextlib.nullcontext):
                paths.append(export.to_onnx(model, inputs, Path(tmp) / "repeat-kv.onnx", 23))
            names.append("23-repeat-kv")
        sessions = [session(path, args.threads) for path in paths]
        seconds = latency(sessions, args.batch, args.seq, model.config.vocab_size, repeats=args.repeats)
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                      f"{args.threads} threads", "model": args.model, "shape": [args.batch, args.seq],
                      "median_s": dict(zip(names, seconds))}, indent=1))


if __name__ == "__main__":
    main()
