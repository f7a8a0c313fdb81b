"""Where onnxruntime spends a forward of the dense embedded model: kernel seconds per op type and the slowest
nodes (onnxruntime's own profiler), averaged over the timed runs after one warm-up.

    .venv/bin/python benchmarks/onnx_profile.py [--model smollm2-135m] [--batch 8] [--seq 512] [--runs 2]
"""
import argparse
import collections
import datetime
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dotresize_fx.export import OPSET, _feed, dense_onnx
from dotresize_fx.load import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _, inputs = load(args.model)
    path = dense_onnx(model, inputs, OPSET)
    vocab = model.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq), dtype=np.int64)
        feed = _feed(sess, ids)
        for _ in range(1 + args.runs):
            sess.run(["logits"], feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    warmup, *timed = [e for e in events if e.get("name") == "model_run"]
    runs = [e["dur"] / 1e6 for e in timed]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] > warmup["ts"] + warmup["dur"]]
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in kernels:
        by_op[e["args"]["op_name"]] += e["dur"] / 1e6 / args.runs
        by_node[f'{e["args"]["op_name"]} {e["name"].removesuffix("_kernel_time")}'] += e["dur"] / 1e6 / args.runs
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                      f"{args.threads} threads", "model": args.model, "opset": OPSET, "shape": [args.batch, args.seq],
                      "run_s": runs, "kernel_s_by_op": {k: round(v, 3) for k, v in by_op.most_common()},
                      "slowest_nodes_s": {k: round(v, 3) for k, v in by_node.most_common(5)}}, indent=1))


if __name__ == "__main__":
    main()
