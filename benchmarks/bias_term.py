"""Would a bias term (FLAP's: what the removed neurons contribute on average, into the consumer's bias) help
pruning with least squares? On SmolLM2's MLPs at 1536 → 1152 (act × weight importance): the relative error of
the down projection's output on held-out calibration tokens, for pruning alone, pruning + the bias, least
squares, and least squares with an intercept (fitted on centred activations). Writes
benchmarks/results/bias-term-DATE.json.

    .venv/bin/python benchmarks/bias_term.py [--layers 3 15 26] [--windows 24]
"""
import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from dotresize_fx import data
from dotresize_fx.load import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="*", default=[3, 15, 26])
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--keep", type=int, default=1152)
    p.add_argument("--ridge", type=float, default=1e-3, help="λ relative to the Gram's mean diagonal")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, _ = load("smollm2-135m")
    ids = data.tokenize(tok, data.text("sotu", "calibration"), 400_000)
    windows = data.calibration_windows(ids, data.bos_id(tok), args.windows, args.seq_len, 0, "sotu")
    rows = [_layer(model, windows, layer, args.keep, args.ridge) for layer in args.layers]
    for r in rows:
        print(r)
    today = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"bias-term-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": f"{platform.machine()}, {args.threads} threads",
                               "protocol": vars(args), "rows": rows}, indent=1))


def _layer(model, windows, layer: int, keep: int, ridge: float) -> dict:
    mlp = model.model.layers[layer].mlp
    rows = []
    hook = mlp.down_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].flatten(0, -2).double()))
    with torch.no_grad():
        for w in windows.split(4):
            model(w)
    hook.remove()
    H = torch.cat(rows)
    train, test = H[: len(H) * 3 // 4], H[len(H) * 3 // 4:]   # fit on the first windows, score on the rest
    W = mlp.down_proj.weight.double()
    kept = (train.square().mean(0).sqrt() * W.norm(dim=0)).argsort(descending=True)[:keep].sort().values
    removed = torch.tensor(sorted(set(range(W.shape[1])) - set(kept.tolist())))
    target = test[:, removed] @ W[:, removed].T           # what the removed neurons wrote
    scale = (test @ W.T).norm()
    mean_removed = (train[:, removed] @ W[:, removed].T).mean(0)

    def ls(intercept: bool) -> float:
        Xk, Yr = train[:, kept], train[:, removed] @ W[:, removed].T
        mx, my = (Xk.mean(0), Yr.mean(0)) if intercept else (torch.zeros(len(kept), dtype=W.dtype), torch.zeros(W.shape[0], dtype=W.dtype))
        Xc = Xk - mx
        G = Xc.T @ Xc
        R = torch.linalg.solve(G + ridge * G.diagonal().mean() * torch.eye(len(kept), dtype=G.dtype),
                               Xc.T @ (Yr - my))
        return ((test[:, kept] @ R + (my - mx @ R) - target).norm() / scale).item()
    return {"layer": layer, "prune": (target.norm() / scale).item(),
            "prune+bias": ((target - mean_removed).norm() / scale).item(),
            "ls": ls(False), "ls+bias": ls(True)}


if __name__ == "__main__":
    main()
