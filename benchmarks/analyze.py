"""Capture and analysis time on the embedded model (issue: capture ≤ 5 s, analysis ≤ 1 s on 2 cores).

    .venv/bin/python benchmarks/analyze.py [--model smollm2-135m] [--threads 2] [--repeats 3]
"""
import argparse
import json
import statistics
import time

import torch

from dotresize_fx.analyze import analyze
from dotresize_fx.load import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model, _, inputs = load(args.model)
    load_s = time.perf_counter() - t
    runs = [analyze(model, inputs) for _ in range(args.repeats)]
    capture = [a.timing["capture_s"] for a in runs]
    analysis = [a.timing["analyze_s"] for a in runs]
    kinds = {}
    for g in runs[0].groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    result = {"model": args.model, "threads": args.threads, "load_s": load_s,
              "capture_s_median": statistics.median(capture), "analyze_s_median": statistics.median(analysis),
              "capture_s": capture, "analyze_s": analysis, "groups": kinds}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
