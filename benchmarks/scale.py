"""Cost at size: random Llama models of ~135M, ~400M and ~835M parameters (benchmarks/scale_models.py), one
pass (`prune:mlp=0.25,unmerge=ls`, 4 × 128 calibration tokens), float32 and bfloat16, one process and two
torchrun (gloo) processes; `--source checkpoint` compresses the same model saved as a Hugging Face checkpoint
(loaded memory-mapped), and `--offload 1` keeps the weights on disk (`--offload-folder`). Each row is its own `dotresize-fx compress` process, so its peak RSS is its own
(rank 0's for torchrun). Writes benchmarks/results/scale-DATE.json after every row.

    .venv/bin/python benchmarks/scale.py                     # every row (about an hour on 2 cores)
    .venv/bin/python benchmarks/scale.py --sizes 135m 400m --dtypes float32 --ranks 1
    .venv/bin/python benchmarks/scale.py --sizes 835m --dtypes float32 --ranks 1 --source checkpoint --offload 0 1
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
    p.add_argument("--offload", nargs="*", type=int, default=[0], help="1: weights on disk (--offload-folder)")
    p.add_argument("--source", default="factory", choices=["factory", "checkpoint"])
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the ranks)")
    args = p.parse_args()
    today = datetime.date.today().isoformat()
    path = HERE / "results" / f"scale-{today}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for size in args.sizes:
        for dtype in args.dtypes:
            for ranks in args.ranks:
                for offload in args.offload:
                    row = _run(size, dtype, ranks, args.threads, bool(offload), args.source)
                    rows = [r for r in rows if _key(r) != _key(row)] + [row]
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    out = {"date": today, "machine": f"{platform.machine()}, {args.threads} threads in all",
                           "passes": PASSES, "calibration": "4 x 128 tokens, --data random", "rows": rows}
                    path.write_text(json.dumps(out, indent=1))


def _key(row: dict) -> tuple:
    return row["size"], row["dtype"], row["ranks"], row.get("offload", False), row.get("source", "factory")


def checkpoint(size: str, dtype: str, folder: str) -> str:
    """The factory's model written as a Hugging Face checkpoint in `dtype` (a child process, so that this one
    does not hold the model while the row runs)."""
    code = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); import scale_models as s; "
            f"m, _ = s.llama_{size}(); m.to(getattr(torch, {dtype!r})).save_pretrained({folder!r})")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder


def _run(size: str, dtype: str, ranks: int, threads: int, offload: bool, source: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = checkpoint(size, dtype, f"{tmp}/ckpt") if source == "checkpoint" else \
            f"{HERE}/scale_models.py:llama_{size}"
        cli = ["--threads", str(max(1, threads // ranks)), "compress", model,
               "--passes", PASSES, "--data", "random", "--calib-samples", "4", "--seq-len", "128",
               "--eval-tokens", "512", "--dtype", dtype, "--out", f"{tmp}/out", "--json", f"{tmp}/report.json",
               *(["--offload-folder", f"{tmp}/offload"] if offload else [])]
        launcher = [sys.executable, "-m", "dotresize_fx.cli"] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "dotresize_fx.cli"]
        t0 = time.perf_counter()
        subprocess.run(launcher + cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        r = json.loads(Path(f"{tmp}/report.json").read_text())
    t = r["timing"]
    weights_mb = r["params_before"] * (2 if dtype in ("bfloat16", "float16") else 4) / 2 ** 20
    return {"size": size, "dtype": dtype, "ranks": ranks, "offload": offload, "source": source,
            "params": r["params_before"],
            "weights_mb": weights_mb, "peak_anon_mb": r["peak_anon_mb"],
            "anon_over_weights": r["peak_anon_mb"] / weights_mb,
            "peak_rss_mb": r["peak_rss_mb"], "rss_over_weights": r["peak_rss_mb"] / weights_mb,
            "baseline_rss_mb": r["baseline_rss_mb"],
            "rss_above_baseline_over_weights": (r["peak_rss_mb"] - r["baseline_rss_mb"]) / weights_mb,
            "compress_s": t["compress_s"], "calib_forward_s": t["calib_forward_s"],
            "compress_over_forward": t["compress_s"] / max(t["calib_forward_s"], 1e-9), "wall_s": wall,
            "ppl_before": r.get("ppl_before"), "ppl_after": r.get("ppl_after")}

if __name__ == "__main__":
    main()
