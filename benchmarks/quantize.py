"""Weight quantization of a compressed model's KV-cache ONNX file: perplexity under onnxruntime, file size, and
prefill / decode speed at batch 1 and 8 against the dense float file — one row per scheme, in one run.

    .venv/bin/python benchmarks/quantize.py [OUT] [--schemes float int8 int8-channel int4-32 int4-128 …]

OUT is a `compress --onnx` directory of a model with a tokenizer (default `out/demo`, the demo's output; its
`model.onnx` must have a KV cache, i.e. come from this version). Perplexity uses the demo's protocol on SOTU
(seq 512, 8192 evaluation tokens). Writes benchmarks/results/quantize-YYYY-MM-DD.json and prints a Markdown table.
"""
import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dotresize_fx import data, kvcache  # noqa: E402
from dotresize_fx.evaluate import perplexity  # noqa: E402
from dotresize_fx.export import OPSET, dense_onnx, ort_forward, session  # noqa: E402
from dotresize_fx.generate import decode_speed  # noqa: E402
from dotresize_fx.load import load  # noqa: E402
from dotresize_fx.quiet import silence_known  # noqa: E402
from passes.quantize import QuantizeConfig, quantize_onnx  # noqa: E402

SCHEMES = {
    "int8": QuantizeConfig("int8"),
    "int8-channel": QuantizeConfig("int8", per_channel=True),
    "int8-weight-32": QuantizeConfig("int8", weight_only=True, block_size=32),
    "int8-weight-128": QuantizeConfig("int8", weight_only=True, block_size=128),
    "int8-weight-32-acc4": QuantizeConfig("int8", weight_only=True, block_size=32, accuracy_level=4),
    "int8-weight-128-acc4": QuantizeConfig("int8", weight_only=True, block_size=128, accuracy_level=4),
    "int4-32": QuantizeConfig("int4", block_size=32),
    "int4-128": QuantizeConfig("int4", block_size=128),
    "int4-32-acc4": QuantizeConfig("int4", block_size=32, accuracy_level=4),
    "int4-128-acc4": QuantizeConfig("int4", block_size=128, accuracy_level=4),
    "int4-32-hqq": QuantizeConfig("int4", block_size=32, algo="hqq"),
    "int4-32-head-float": QuantizeConfig("int4", block_size=32, head=False),
    "int4-16": QuantizeConfig("int4", block_size=16),
    "int4-32-gptq-acc4": QuantizeConfig("int4", block_size=32, algo="gptq", accuracy_level=4),
    "int4-32-gptq-head-float-acc4": QuantizeConfig("int4", block_size=32, algo="gptq", accuracy_level=4, head=False),
    "int4-16-gptq-acc4": QuantizeConfig("int4", block_size=16, algo="gptq", accuracy_level=4),
    "int4-16-gptq-head-float-acc4": QuantizeConfig("int4", block_size=16, algo="gptq", accuracy_level=4, head=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="out/demo")
    p.add_argument("--schemes", nargs="+", default=["float", *SCHEMES], choices=["float", *SCHEMES])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tag", default="", help="suffix of the JSON's name, so that a run of some schemes does not "
                                             "replace the day's full table")
    args = p.parse_args()
    silence_known()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    float_file = out / "model.onnx"
    model, tokenizer, inputs = load(out)
    if not float_file.is_file() or not kvcache.past_inputs(session(float_file)):
        sys.exit(f"{float_file} is missing or has no KV cache: run `dotresize-fx compress ... --onnx --out {out}` "
                 "with this version first")
    report = json.loads((out / "report.json").read_text())
    dense_model = load(report["model"]).model
    ev = data.text("sotu", "evaluation")
    windows = data.evaluation_windows(data.tokenize(tokenizer, ev), data.bos_id(tokenizer), args.seq_len,
                                      args.eval_tokens, ev.name)
    cal = data.text("sotu", "calibration")
    cal_ids = data.tokenize(tokenizer, cal, data.CALIB_MAX_CHARS)

    def calibration(n):   # GPTQ: the demo's calibration windows (seed 0), one per batch
        return list(data.calibration_windows(cal_ids, data.bos_id(tokenizer), n, args.seq_len, 0, cal.name).split(1))
    rows, sessions = {}, {"dense float": session(dense_onnx(dense_model, inputs, OPSET), args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.schemes:
            path = float_file if name == "float" else Path(tmp) / f"model.{name}.onnx"
            q = {} if name == "float" else quantize_onnx(float_file, path, SCHEMES[name], calibration)
            sess = session(path, args.threads)
            rows[name] = {"config": None if name == "float" else vars(SCHEMES[name]),
                          "size_mb": path.stat().st_size / 2**20,
                          "ppl_ort": perplexity(ort_forward(sess), windows, corpus=ev.name, progress=False)["ppl"],
                          "quantized_nodes": q.get("quantized_nodes")}
            sessions[name] = sess
            print(f"{name}: {rows[name]['size_mb']:.0f} MB, perplexity {rows[name]['ppl_ort']:.2f}", flush=True)
        speed = decode_speed(sessions, prompt_len=128, new=32, vocab=dense_model.config.vocab_size,
                             repeats=args.repeats)
    for name, row in rows.items():
        row["speed"] = {b: s[name] for b, s in speed.items()}
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "threads": args.threads,
              "model": str(out), "passes": report.get("passes"), "seq_len": args.seq_len,
              "eval_tokens": args.eval_tokens, "dense": {b: s["dense float"] for b, s in speed.items()},
              "rows": rows}
    dest = ROOT / "benchmarks" / "results" / f"quantize-{result['date']}{'-' + args.tag if args.tag else ''}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {dest}")


def table(result: dict) -> str:
    base = result["rows"]["float"]["ppl_ort"] if "float" in result["rows"] else None
    d1, d8 = result["dense"]["batch1"], result["dense"]["batch8"]
    lines = ["| file | MB | ppl ORT | × float | prefill tok/s b1 | decode tok/s b1 | × dense b1 | decode tok/s b8 "
             "| × dense b8 |", "|---|---|---|---|---|---|---|---|---|",
             f"| dense float | | | | {d1['prefill_tokens_per_s']:.0f} | {d1['decode_tokens_per_s']:.1f} (±"
             f"{100 * d1['decode_spread']:.0f}%) | 1.00 | {d8['decode_tokens_per_s']:.1f} (±"
             f"{100 * d8['decode_spread']:.0f}%) | 1.00 |"]
    for name, r in result["rows"].items():
        s1, s8 = r["speed"]["batch1"], r["speed"]["batch8"]
        rel = f"{r['ppl_ort'] / base:.3f}" if base else ""
        lines.append(f"| {name} | {r['size_mb']:.0f} | {r['ppl_ort']:.2f} | {rel} | {s1['prefill_tokens_per_s']:.0f} "
                     f"| {s1['decode_tokens_per_s']:.1f} | {s1['decode_tokens_per_s'] / d1['decode_tokens_per_s']:.2f}"
                     f" | {s8['decode_tokens_per_s']:.1f} | {s8['decode_tokens_per_s'] / d8['decode_tokens_per_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
