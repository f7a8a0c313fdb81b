"""onnxruntime latency of the embedded model cut to several MLP widths, against the dense model: the latency
ratio beside the non-embedding parameter ratio (+ 0.05: the bound `report.json` checks) and the FLOPs ratio.

The cuts are weight-magnitude pruning without calibration: latency depends on the widths, not on how the
neurons were chosen. All files are exported at the same opset and timed on the same random ids, interleaved.

    .venv/bin/python benchmarks/latency_width.py [--mlp 0.125 0.1875 0.25] [--repeats 8] [--batch 8] [--seq 512]

Prints and writes benchmarks/results/latency-width-YYYY-MM-DD.json.
"""
import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from dotresize_fx.analyze import analyze
from dotresize_fx.compress import PassSpec
from dotresize_fx.evaluate import parameter_counts
from dotresize_fx.export import LATENCY_SLACK, OPSET, dense_onnx, forward_flops, latency, session, to_onnx
from dotresize_fx.load import load
from passes import build_pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mlp", type=float, nargs="+", default=[0.125, 0.1875, 0.25])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--opset", type=int, default=OPSET)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _, inputs = load(args.model)
    analysis = analyze(model, inputs)
    vocab = model.config.vocab_size
    dense_params, dense_flops = parameter_counts(model)["non_embedding"], forward_flops(model, 1, args.seq, vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [dense_onnx(model, inputs, args.opset)]
        for f in args.mlp:
            spec = PassSpec("prune", {"mlp": f, "importance": "weight"})
            cut = build_pass(spec, analysis, inputs, [inputs])(model).graph_module
            paths.append(to_onnx(cut, inputs, Path(tmp) / f"mlp{f}.onnx", args.opset))
            param_ratio = parameter_counts(cut)["non_embedding"] / dense_params
            rows.append({"mlp": f, "param_ratio": param_ratio, "bound": param_ratio + LATENCY_SLACK,
                         "flops_ratio": forward_flops(cut, 1, args.seq, vocab) / dense_flops})
        seconds = latency([session(path, args.threads) for path in paths], args.batch, args.seq, vocab,
                          repeats=args.repeats)
    for row, s in zip(rows, seconds[1:]):
        row.update(seconds=s, latency_ratio=s / seconds[0], within_bound=s / seconds[0] <= row["bound"])
    today = datetime.date.today().isoformat()
    text = json.dumps({"date": today, "machine": f"{platform.machine()}, {args.threads} threads", "model": args.model,
                       "opset": args.opset, "shape": [args.batch, args.seq], "dense_seconds": seconds[0],
                       "rows": rows}, indent=1)
    (Path(__file__).parent / "results" / f"latency-width-{today}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
