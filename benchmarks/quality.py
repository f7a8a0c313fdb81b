"""Side-by-side quality of prune, prune+ls, pca and DOTResize on the embedded model (DESIGN §7 protocol).

Writes benchmarks/results/quality-YYYY-MM-DD.json and a Markdown table (stdout and .md beside the JSON).
Each row is one `dotresize_fx.compress.run` job, exactly what `dotresize-fx compress --passes …` runs.

    .venv/bin/python benchmarks/quality.py [--seq-len 512 --eval-tokens 16384 --calib-samples 64] [--rows NAME…]
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dotresize_fx.compress import Job, PassSpec, public, run

ROWS = {
    "prune": "prune:mlp=0.25",
    "prune+ls": "prune:mlp=0.25,unmerge=ls",
    "dotresize-mlp": "dotresize:mlp=0.25",
    "dotresize-mlp-uniform-ot": "dotresize:mlp=0.25,marginals=uniform,unmerge=ot",
    "dotresize-mlp-energy-ls": "dotresize:mlp=0.25,marginals=energy,unmerge=ls",
    "prune>dotresize": "prune:mlp=0.25 dotresize:mlp=0.25",
    "prune-residual": "prune:residual=0.22",
    "pca-global": "pca:residual=0.22",
    "dotresize-residual": "dotresize:residual=0.22,unmerge=pinv",
    "dotresize-heads": "dotresize:heads=0.34",
    "prune-heads": "prune:heads=0.34",
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", nargs="*", default=list(ROWS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, dense = [], None
    for name in args.rows:
        t0 = time.perf_counter()
        r = public(run(Job(args.model, PassSpec.parse(ROWS[name]), seq_len=args.seq_len,
                           eval_tokens=args.eval_tokens, calib_samples=args.calib_samples, progress=False)))
        dense = r["ppl_before"]
        rows.append({"method": name, "config": ROWS[name], "nonembed_reduction": r["nonembed_reduction"],
                     "params": r["params_after"], "nonembed_params": r["nonembed_params_after"],
                     "ppl": r["ppl_after"], "ratio_to_dense": r["ppl_after"] / dense,
                     "compress_s": r["timing"]["compress_s"], "calib_forward_s": r["timing"]["calib_forward_s"],
                     "peak_rss_mb": r["peak_rss_mb"], "wall_s": time.perf_counter() - t0})
        print(f"{name:<28} ppl {r['ppl_after']:9.2f}  non-emb -{100 * r['nonembed_reduction']:.1f}%", file=sys.stderr)
        protocol = r["protocol"]
    today = datetime.date.today().isoformat()
    out = {"date": today, "machine": f"{platform.machine()}, {args.threads} threads", "dense_ppl": dense,
           "protocol": protocol, "rows": rows}
    path = Path(__file__).parent / "results" / f"quality-{today}.json"
    path.write_text(json.dumps(out, indent=1))
    table = ["| method | config | non-emb. params | reduction | ppl | × dense | compress s | calib fwd s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense | — | {rows[0]['nonembed_params'] / (1 - rows[0]['nonembed_reduction']) / 1e6:.1f}M | 0 | "
             f"{dense:.2f} | 1.00 | — | — | — |"]
    for r in rows:
        table.append(f"| {r['method']} | `{r['config']}` | {r['nonembed_params'] / 1e6:.1f}M | "
                     f"{100 * r['nonembed_reduction']:.1f}% | {r['ppl']:.2f} | {r['ratio_to_dense']:.2f} | "
                     f"{r['compress_s']:.0f} | {r['calib_forward_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    path.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
