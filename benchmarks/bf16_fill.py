"""A least-squares fill of a bfloat16 weight, W[:, kept] + W[:, removed]·Rᵀ with R = A·B (the row-space
factors), done in bfloat16 (what `rewrite` does) against float32 then a cast, on an 836M-shaped MLP block
(down projection 2048 × 5632, 4224 kept, 512 calibration rows): seconds of the two products, and the error of
the weight and of its output on the calibration rows, relative to the float64 result and to bfloat16's own
storage error. Writes benchmarks/results/bf16-fill-DATE.json.

    .venv/bin/python benchmarks/bf16_fill.py [--threads 2]
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, n, m, rows = 2048, 5632, 4224, 512
    W = (torch.randn(d, n) * 0.02).to(torch.bfloat16)
    X = torch.randn(rows, n, dtype=torch.float64)
    kept = torch.randperm(n)[:m].sort().values
    removed = torch.tensor(sorted(set(range(n)) - set(kept.tolist())))
    Xk = X[:, kept]
    A = Xk.T @ torch.linalg.inv(Xk @ Xk.T + 1e-2 * torch.eye(rows, dtype=torch.float64))   # m × rows
    B = X[:, removed]                                                                      # rows × removed
    exact = W.double()[:, kept] + W.double()[:, removed] @ (A @ B).T

    def fill(P):
        return P[:, kept] + (P[:, removed] @ B.T.to(P.dtype)) @ A.T.to(P.dtype)

    def seconds(P):
        fill(P)
        t = time.perf_counter()
        for _ in range(args.repeats):
            fill(P)
        return (time.perf_counter() - t) / args.repeats

    def errors(got):
        diff = got.double() - exact
        return {"weight": (diff.norm() / exact.norm()).item(),
                "output": ((diff @ Xk.T).norm() / (exact @ Xk.T).norm()).item()}
    storage = errors(exact.to(torch.bfloat16))
    rows_out = {
        "bfloat16": {"seconds": seconds(W), **errors(fill(W))},
        "float32 then cast": {"seconds": seconds(W.float()), **errors(fill(W.float()).to(torch.bfloat16))},
        "bfloat16 storage of the exact result": storage,
    }
    for r in rows_out.values():
        r["weight_over_storage"] = r["weight"] / storage["weight"]
        r["output_over_storage"] = r["output"] / storage["output"]
    for name, r in rows_out.items():
        print(name, {k: round(v, 6) for k, v in r.items()})
    today = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"bf16-fill-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": f"{platform.machine()}, {args.threads} threads",
                               "shapes": {"d": d, "n": n, "kept": m, "rows": rows}, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
