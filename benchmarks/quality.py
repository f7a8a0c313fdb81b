"""Side-by-side quality of prune, prune+ls, pca and DOTResize on the embedded model (DESIGN §7 protocol).

Writes benchmarks/results/quality-YYYY-MM-DD.json and a Markdown table (stdout and .md beside the JSON).
Each row is one `dotresize-fx compress --passes …` process (its own timings and peak RSS).

    .venv/bin/python benchmarks/quality.py [--seq-len 512 --eval-tokens 16384 --calib-samples 64] [--rows NAME…]
        [--data validation:sotu]   # pick choices on the calibration split's held-out tail (quality-validation-*)
        [--data moby]              # the second corpus, calibrated and evaluated on Moby-Dick (quality-moby-*)
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROWS = {
    # MLP 1536→1152 (-18.7% non-embedding)
    "prune": "prune:mlp=0.25",
    "prune+ls": "prune:mlp=0.25,unmerge=ls",
    "prune+ls-cholesky": "prune:mlp=0.25,unmerge=ls,importance=cholesky",
    "prune+ls-transport": "prune:mlp=0.25,unmerge=ls,importance=transport",
    "dotresize-mlp-pure-transport": "dotresize:mlp=0.25,pure_producers=1,refine=0,importance=transport",
    "dotresize-mlp-mass0.25-transport": "dotresize:mlp=0.25,mass=0.25,importance=transport",
    "dotresize-mlp": "dotresize:mlp=0.25",
    "dotresize-mlp-cholesky": "dotresize:mlp=0.25,importance=cholesky",
    "dotresize-mlp-mass0.5": "dotresize:mlp=0.25,mass=0.5",
    "dotresize-mlp-mass0.25": "dotresize:mlp=0.25,mass=0.25",
    "dotresize-mlp-ot": "dotresize:mlp=0.25,unmerge=ot",
    "dotresize-mlp-pure": "dotresize:mlp=0.25,pure_producers=1,refine=0",
    # the transport family at the same width: balanced (the paper's framing), and the target marginal KL-relaxed
    "dotresize-mlp-energy-sinkhorn": "dotresize:mlp=0.25,marginals=energy,reg=0.1",   # 0.01 does not converge
    "dotresize-mlp-energy-emd": "dotresize:mlp=0.25,marginals=energy,solver=emd",
    "dotresize-mlp-unbalanced-tau0.1": "dotresize:mlp=0.25,marginals=energy,solver=unbalanced,tau=0.1",
    "dotresize-mlp-unbalanced-tau1": "dotresize:mlp=0.25,marginals=energy,solver=unbalanced,reg=0.1",
    "dotresize-mlp-unbalanced-tau10": "dotresize:mlp=0.25,marginals=energy,solver=unbalanced,tau=10,reg=0.1",
    "prune>dotresize": "prune:mlp=0.25 dotresize:mlp=0.25,reg=0.05",
    # the same units kept, spread over the layers by measured sensitivity (dotresize_fx/allocate.py)
    "prune+ls-curve": "prune:mlp=0.25,unmerge=ls,allocation=curve",
    "prune+ls-importance": "prune:mlp=0.25,unmerge=ls,allocation=importance",
    "prune+ls-fisher": "prune:mlp=0.25,unmerge=ls,allocation=fisher",
    # the same budget (−18.7% non-embedding) spread over MLP and heads together
    "prune+ls-budget-fisher": "prune:budget=0.187,unmerge=ls,allocation=fisher",
    "dotresize-mlp-pure-budget-fisher": "dotresize:budget=0.187,pure_producers=1,refine=0,allocation=fisher",
    # then trained toward the dense model's outputs on the calibration windows (passes/distill.py)
    "prune+ls-distill": "prune:mlp=0.25,unmerge=ls distill",
    "prune+ls-budget-fisher-distill": "prune:budget=0.187,unmerge=ls,allocation=fisher distill",
    "prune+ls-budget-fisher-distill128": "prune:budget=0.187,unmerge=ls,allocation=fisher distill:samples=128",
    "prune+ls-budget20-fisher-distill128":
        "prune:budget=0.2,unmerge=ls,allocation=fisher distill:samples=128",
    "prune+ls-budget20-fisher-distill256":
        "prune:budget=0.2,unmerge=ls,allocation=fisher distill:samples=256",
    "prune+ls-budget20-fisher-distill256-lr4e-5":
        "prune:budget=0.2,unmerge=ls,allocation=fisher distill:samples=256,lr=4e-5",
    "prune+ls-budget20-fisher-distill256-lr4e-5-e5":
        "prune:budget=0.2,unmerge=ls,allocation=fisher distill:samples=256,lr=4e-5,epochs=5",
    "prune+ls-budget20-fisher-distill256-lr6e-5":
        "prune:budget=0.2,unmerge=ls,allocation=fisher distill:samples=256,lr=6e-5",
    "prune+ls-budget-fisher-distill128-e6":
        "prune:budget=0.187,unmerge=ls,allocation=fisher distill:samples=128,epochs=6",
    "dotresize-mlp-pure-budget-fisher-distill128":
        "dotresize:budget=0.187,pure_producers=1,refine=0,allocation=fisher distill:samples=128",
    "dotresize-mlp-pure-budget-fisher-distill":
        "dotresize:budget=0.187,pure_producers=1,refine=0,allocation=fisher distill",
    # least squares toward the dense model's own activations (it also corrects what earlier blocks left)
    "prune+ls-dense": "prune:mlp=0.25,unmerge=ls,ls_target=dense",
    "prune+ls-budget-fisher-dense": "prune:budget=0.187,unmerge=ls,allocation=fisher,ls_target=dense",
    "prune+ls-10-budget-fisher": "prune:budget=0.094,unmerge=ls,allocation=fisher",
    "dotresize-mlp-10-pure-budget-fisher": "dotresize:budget=0.094,pure_producers=1,refine=0,allocation=fisher",
    "prune+ls-30-budget-fisher": "prune:budget=0.281,unmerge=ls,allocation=fisher",
    "dotresize-mlp-30-pure-budget-fisher": "dotresize:budget=0.281,pure_producers=1,refine=0,allocation=fisher",
    "dotresize-mlp-mass0.25-fisher": "dotresize:mlp=0.25,mass=0.25,allocation=fisher",
    "dotresize-mlp-pure-fisher": "dotresize:mlp=0.25,pure_producers=1,refine=0,allocation=fisher",
    "dotresize-mlp-mass0.25-curve": "dotresize:mlp=0.25,mass=0.25,allocation=curve",
    "dotresize-mlp-pure-curve": "dotresize:mlp=0.25,pure_producers=1,refine=0,allocation=curve",
    "prune+ls-10-curve": "prune:mlp=0.125,unmerge=ls,allocation=curve",
    "dotresize-mlp-10-pure-curve": "dotresize:mlp=0.125,pure_producers=1,refine=0,allocation=curve",
    "prune+ls-30-curve": "prune:mlp=0.375,unmerge=ls,allocation=curve",
    "dotresize-mlp-30-pure-curve": "dotresize:mlp=0.375,pure_producers=1,refine=0,allocation=curve",
    # residual 576→432 (one global map; a multiple of 9 heads for a stock config; the head is untied, counted)
    "prune-residual": "prune:residual=0.25",
    "pca-global": "pca:residual=0.25",
    "pca-global-20": "pca:residual=0.375",   # 576→360: about −20% non-embedding once the head is untied
    "dotresize-residual": "dotresize:residual=0.25,unmerge=pinv",
    # the stream's readers refitted block by block on the resized prefix. A stock Llama's width is a multiple of
    # its 9 heads (and of round_to 8): 576→512 rounds to 504, SliceGPT's 456 is not reachable, 432 is
    "pca-504": "pca:residual=0.111",
    "pca-504-refit": "pca:residual=0.111,residual_refit=1",
    "pca-global-refit": "pca:residual=0.25,residual_refit=1",
    "dotresize-residual-refit": "dotresize:residual=0.25,unmerge=pinv,residual_refit=1",
    # a basis per block, calibrated on the resized prefix, and an adapter on each skip (not a stock architecture)
    "pca-per_layer": "pca:residual=0.25,residual_maps=per_layer",
    "pca-per_layer-refit": "pca:residual=0.25,residual_maps=per_layer,residual_refit=1",
    "pca-504-per_layer": "pca:residual=0.111,residual_maps=per_layer",
    "pca-504-per_layer-refit": "pca:residual=0.111,residual_maps=per_layer,residual_refit=1",
    # our format need not keep hidden_size a multiple of the heads: SliceGPT's own 512 and 456
    "pca-512-per_layer": "pca:residual=0.1111,residual_maps=per_layer",
    "pca-512-per_layer-refit": "pca:residual=0.1111,residual_maps=per_layer,residual_refit=1",
    "pca-456-per_layer": "pca:residual=0.2083,residual_maps=per_layer",
    "pca-456-per_layer-refit": "pca:residual=0.2083,residual_maps=per_layer,residual_refit=1",
    "dotresize-residual-per_layer": "dotresize:residual=0.25,unmerge=pinv,residual_maps=per_layer",
    # heads 9→6 per layer (one q head per GQA group)
    "prune-heads+ls": "prune:heads=0.34,unmerge=ls",
    "dotresize-heads": "dotresize:heads=0.34",
    # mixed, and the 10% / 30% levels
    "dotresize-mixed": "dotresize:mlp=0.2,heads=0.34",
    "prune+ls-mixed": "prune:mlp=0.2,heads=0.34,unmerge=ls",
    "prune+ls-14": "prune:mlp=0.1875,unmerge=ls",   # MLP 1536→1248 (−14.1%)
    "dotresize-mlp-14-mass0.25": "dotresize:mlp=0.1875,mass=0.25",
    "dotresize-mlp-14-pure": "dotresize:mlp=0.1875,pure_producers=1,refine=0",
    "prune+ls-10": "prune:mlp=0.125,unmerge=ls",
    "dotresize-mlp-10": "dotresize:mlp=0.125",
    "dotresize-mlp-10-mass0.25": "dotresize:mlp=0.125,mass=0.25",
    "dotresize-mlp-10-pure": "dotresize:mlp=0.125,pure_producers=1,refine=0",
    "prune+ls-30": "prune:mlp=0.375,unmerge=ls",
    "dotresize-mlp-30": "dotresize:mlp=0.375",
    "dotresize-mlp-30-pure": "dotresize:mlp=0.375,pure_producers=1,refine=0",
}

# Gemma-3-270M: 168M of its 268M parameters are the embedding; its 18 MLPs (640×2048×3) are 70.8M of the
# 100.3M non-embedding ones, so MLP 2048→1760 is −9.9% and 2048→1472 −19.9% of the non-embedding parameters.
GEMMA3_ROWS = {
    f"{method}-{level}": f"{config.format(f=f)}"
    for level, f in (("10", 0.140625), ("20", 0.28125))
    for method, config in (("prune", "prune:mlp={f}"), ("prune+ls", "prune:mlp={f},unmerge=ls"),
                           ("dotresize-mass0.25", "dotresize:mlp={f},mass=0.25"),
                           ("dotresize-pure", "dotresize:mlp={f},pure_producers=1,refine=0"))
} | {   # the same −19.8% as one budget over MLPs and heads (allocation fisher, the budget's default)
    "prune+ls-budget-20": "prune:budget=0.198,unmerge=ls",
    "dotresize-pure-budget-20": "dotresize:budget=0.198,pure_producers=1,refine=0",
}
ROWS_BY_MODEL = {"gemma3-270m": GEMMA3_ROWS}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="sotu")
    p.add_argument("--rows", nargs="*", help="row names (default: every row of the model)")
    args = p.parse_args()
    table = ROWS_BY_MODEL.get(args.model, ROWS)
    rows, dense = [], None
    for name in args.rows or list(table):
        t0 = time.perf_counter()
        r = _compress(args, table[name])
        dense = r["ppl_before"]
        rows.append({"method": name, "config": table[name], "nonembed_reduction": r["nonembed_reduction"],
                     "params": r["params_after"], "nonembed_params": r["nonembed_params_after"],
                     "ppl": r["ppl_after"], "ratio_to_dense": r["ppl_after"] / dense,
                     "compress_s": r["timing"]["compress_s"], "calib_forward_s": r["timing"]["calib_forward_s"],
                     "peak_rss_mb": r["peak_rss_mb"], "wall_s": time.perf_counter() - t0, "threads": args.threads,
                     "widths": r["widths"],
                     **_distilled(r)})
        print(f"{name:<28} ppl {r['ppl_after']:9.2f}  non-emb -{100 * r['nonembed_reduction']:.1f}%", file=sys.stderr,
              flush=True)
        protocol = r["protocol"]
        _write(args, dense, protocol, rows, table)  # after every row: a stopped run keeps what it measured


def _distilled(report: dict) -> dict:
    """A distill pass's held-out loss curve, chosen epoch and training time."""
    d = next((p for p in report["passes"] if p["method"] == "distill"), None)
    return {} if d is None else {"distill": {k: d[k] for k in ("held_out_loss", "best_epoch", "train_s", "lr")}}


def _compress(args, passes: str) -> dict:
    """One row = one `dotresize-fx compress` process, so its peak RSS and timings are its own."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dotresize_fx.cli", "--threads", str(args.threads), "compress", args.model,
               "--passes", passes, "--data", args.data, "--seq-len", str(args.seq_len), "--eval-tokens",
               str(args.eval_tokens), "--calib-samples", str(args.calib_samples), "--out", f"{tmp}/out",
               "--json", f"{tmp}/report.json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(f"{tmp}/report.json").read_text())


def _write(args, dense, protocol, rows, table):
    today = datetime.date.today().isoformat()
    out = {"date": today, "machine": f"{platform.machine()}, {os.cpu_count()} cores (threads: per row)", "dense_ppl": dense,
           "protocol": protocol, "rows": rows}
    kind = "quality-validation" if args.data.startswith("validation:") else "quality"
    if args.model in ROWS_BY_MODEL:
        kind += f"-{args.model}"
    corpus = args.data.removeprefix("validation:")
    if corpus != "sotu":
        kind += f"-{Path(corpus).name}"
    reduced = "" if (args.seq_len, args.calib_samples, args.eval_tokens) == (512, 64, 16384) else \
        f"-seq{args.seq_len}-calib{args.calib_samples}"  # the DESIGN §7 protocol has the plain name
    path = Path(__file__).parent / "results" / f"{kind}-{today}{reduced}.json"
    if path.exists():  # rows measured earlier today under the same protocol stay, re-measured ones are replaced
        old = json.loads(path.read_text())
        same = ("corpus", "seq_len", "calib_samples")
        if all(old.get("protocol", {}).get(k) == protocol.get(k) for k in same):
            names = {r["method"] for r in rows}
            order = {name: i for i, name in enumerate(table)}
            out["rows"] = rows = sorted([r for r in old["rows"] if r["method"] not in names] + rows,
                                        key=lambda r: order.get(r["method"], len(order)))
    path.write_text(json.dumps(out, indent=1))
    lines = ["| method | config | non-emb. params | reduction | ppl | × dense | compress s | calib fwd s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense | — | {rows[0]['nonembed_params'] / (1 - rows[0]['nonembed_reduction']) / 1e6:.1f}M | 0 | "
             f"{dense:.2f} | 1.00 | — | — | — |"]
    for r in rows:
        lines.append(f"| {r['method']} | `{r['config']}` | {r['nonembed_params'] / 1e6:.1f}M | "
                     f"{100 * r['nonembed_reduction']:.1f}% | {r['ppl']:.2f} | {r['ratio_to_dense']:.2f} | "
                     f"{r['compress_s']:.0f} | {r['calib_forward_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
