"""Cost at size: random Llama models of ~135M, ~400M and ~835M parameters (benchmarks/scale_models.py), one
pass (`prune:mlp=0.25,unmerge=ls`, 4 × 128 calibration tokens), float32 and bfloat16, one process and two
torchrun (gloo) processes. Each row is its own `dotresize-fx compress` process, so its peak RSS is its own
(rank 0's for torchrun). Writes benchmarks/results/scale-DATE.json after every row.

    .venv/bin/python benchmarks/scale.py                     # every row (about an hour on 2 cores)
    .venv/bin/python benchmarks/scale.py --sizes 135m 400m --dtypes float32 --ranks 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSES = "prune:mlp=0.25,unmerge=ls"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="*", default=["135m", "400m", "835m"])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--ranks", nargs="*", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the ranks)")
    args = p.parse_args()
    today = datetime.date.today().isoformat()
    path = HERE / "results" / f"scale-{today}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for size in args.sizes:
        for dtype in args.dtypes:
            for ranks in args.ranks:
                row = _run(size, dtype, ranks, args.threads)
                rows = [r for r in rows if (r["size"], r["dtype"], r["ranks"]) != (size, dtype, ranks)] + [row]
                print(json.dumps(row), file=sys.stderr, flush=True)
                out = {"date": today, "machine": f"{platform.machine()}, {args.threads} threads in all",
                       "passes": PASSES, "calibration": "4 x 128 tokens, --data random", "rows": rows}
                path.write_text(json.dumps(out, indent=1))


def _run(size: str, dtype: str, ranks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cli = ["--threads", str(max(1, threads // ranks)), "compress", f"{HERE}/scale_models.py:llama_{size}",
               "--passes", PASSES, "--data", "random", "--calib-samples", "4", "--seq-len", "128",
               "--eval-tokens", "512", "--dtype", dtype, "--out", f"{tmp}/out", "--json", f"{tmp}/report.json"]
        launcher = [sys.executable, "-m", "dotresize_fx.cli"] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "dotresize_fx.cli"]
        t0 = time.perf_counter()
        subprocess.run(launcher + cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        r = json.loads(Path(f"{tmp}/report.json").read_text())
    t = r["timing"]
    weights_mb = r["params_before"] * (2 if dtype in ("bfloat16", "float16") else 4) / 2 ** 20
    return {"size": size, "dtype": dtype, "ranks": ranks, "params": r["params_before"], "weights_mb": weights_mb,
            "peak_rss_mb": r["peak_rss_mb"], "rss_over_weights": r["peak_rss_mb"] / weights_mb,
            "baseline_rss_mb": r["baseline_rss_mb"],
            "rss_above_baseline_over_weights": (r["peak_rss_mb"] - r["baseline_rss_mb"]) / weights_mb,
            "compress_s": t["compress_s"], "calib_forward_s": t["calib_forward_s"],
            "compress_over_forward": t["compress_s"] / max(t["calib_forward_s"], 1e-9), "wall_s": wall,
            "ppl_before": r.get("ppl_before"), "ppl_after": r.get("ppl_after")}

if __name__ == "__main__":
    main()
