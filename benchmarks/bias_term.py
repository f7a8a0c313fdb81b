"""Would a bias term (FLAP's: what the removed neurons contribute on average, into the consumer's bias) help
pruning with least squares? On SmolLM2's MLPs at 1536 → 1152 (act × weight importance): the relative error of
the down projection's output on held-out calibration tokens, for pruning alone, pruning + the bias, least
squares, and least squares with an intercept (fitted on centred activations). Writes
benchmarks/results/bias-term-DATE.json.

    .venv/bin/python benchmarks/bias_term.py [--layers 3 15 26] [--windows 24]
"""
import torch

import mlp_layers


def main():
    p = mlp_layers.parser(__doc__)
    p.add_argument("--ridge", type=float, default=1e-3, help="λ relative to the Gram's mean diagonal")
    args = p.parse_args()
    model, windows = mlp_layers.model_and_windows(args)
    rows = [_layer(model, windows, layer, args.keep, args.ridge) for layer in args.layers]
    for r in rows:
        print(r)
    mlp_layers.write("bias-term", args, rows)


def _layer(model, windows, layer: int, keep: int, ridge: float) -> dict:
    mlp = model.model.layers[layer].mlp
    train, test = mlp_layers.fit_and_held_out(model, mlp.down_proj, windows)
    W = mlp.down_proj.weight.double()
    kept, removed = mlp_layers.kept_and_removed(train, W, keep)
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
