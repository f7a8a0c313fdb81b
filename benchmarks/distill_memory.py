"""Peak memory and time of the distill pass by micro-batch: the embedded SmolLM2 pruned by a budget, then distilled
on a few windows of 512, once per `micro_batch` (the job's --batch-size 4 is one step either way). One
`dotresize-fx compress` process per row, so each peak RSS is its own; writes
benchmarks/results/distill-memory-DATE.json.

    .venv/bin/python benchmarks/distill_memory.py [--micro-batches 4 2 1] [--samples 16]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--samples", type=int, default=16, help="distillation windows (a quarter are held out)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    for mb in args.micro_batches:
        passes = f"prune:budget=0.187,unmerge=ls distill:samples={args.samples},epochs=1,micro_batch={mb}"
        r = _compress(passes, args)
        d = next(x for x in r["passes"] if x["method"] == "distill")
        rows.append({"micro_batch": mb, "passes": passes, "peak_rss_mb": r["peak_rss_mb"],
                     "peak_anon_mb": r["peak_anon_mb"], "train_s": d["train_s"], "held_out_loss": d["held_out_loss"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    today = datetime.date.today().isoformat()
    out = HERE / "results" / f"distill-memory-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": f"{platform.machine()}, {args.threads} threads",
                               "model": "smollm2-135m", "seq_len": 512, "batch_size": 4, "rows": rows}, indent=1))
    print(out)


def _compress(passes: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dotresize_fx.cli", "--threads", str(args.threads), "compress", "smollm2-135m",
               "--passes", passes, "--data", "sotu", "--seq-len", "512", "--calib-samples", str(args.calib_samples),
               "--eval-tokens", "2048", "--out", f"{tmp}/out", "--json", f"{tmp}/report.json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(f"{tmp}/report.json").read_text())


if __name__ == "__main__":
    main()
