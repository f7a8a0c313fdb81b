"""Would merging only SwiGLU's linear (up) branch beat pruning with least squares? On SmolLM2's MLPs at
1536 → 1152 (act × weight importance, the prune pass's choice of kept neurons): each removed neuron j is
assigned to the kept neuron i whose signal (the hidden h, or the gate activation silu(g)) is most like its
own, and its up row is added to i's, u_i ← u_i + μ·c_j·u_j (c_j = ⟨s_j, s_i⟩/‖s_i‖², so silu(g_i)·c_j·u_j
stands in for h_j); the gate rows stay the kept ones', so the nonlinearity never sees averaged weights. The down
projection is then fitted by ridge least squares on the new hidden (λ picked on the last quarter of the fit
rows), as prune+ls fits it on the kept neurons. Scored as the relative error of the MLP's output on held-out
calibration tokens. Writes benchmarks/results/up-merge-DATE.json.

    .venv/bin/python benchmarks/up_merge.py [--layers 3 15 26] [--windows 24]
"""
import torch

import mlp_layers

MASSES = (0.1, 0.25, 0.5, 1.0)
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)


def main():
    args = mlp_layers.parser(__doc__).parse_args()
    model, windows = mlp_layers.model_and_windows(args)
    rows = []
    for layer in args.layers:
        rows.append(_layer(model.model.layers[layer].mlp, windows, model, args.keep) | {"layer": layer})
        print(rows[-1], flush=True)
    mlp_layers.write("up-merge", args, rows)


def _ridge_error(H_fit, H_test, Y_fit, Y_test) -> float:
    """Relative held-out error of the down projection refitted on H (λ relative to mean diag of the Gram)."""
    def solve(H, Y, lam):
        G = H.T @ H
        return torch.linalg.solve(G + lam * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype), H.T @ Y)
    n = len(H_fit) * 3 // 4
    lam = min(RIDGES, key=lambda r: (H_fit[n:] @ solve(H_fit[:n], Y_fit[:n], r) - Y_fit[n:]).norm())
    return ((H_test @ solve(H_fit, Y_fit, lam) - Y_test).norm() / Y_test.norm()).item()


def _layer(mlp, windows, model, keep: int) -> dict:
    fit, test = mlp_layers.fit_and_held_out(model, mlp, windows)   # fit on the first windows, score on the rest
    Wg, Wu, Wd = (mlp.gate_proj.weight.double(), mlp.up_proj.weight.double(), mlp.down_proj.weight.double())
    act = torch.nn.functional.silu

    def hidden(x, gate, up):
        return act(x @ gate.T) * (x @ up.T)
    H_fit, H_test = hidden(fit, Wg, Wu), hidden(test, Wg, Wu)
    Y_fit, Y_test = H_fit @ Wd.T, H_test @ Wd.T
    kept, removed = mlp_layers.kept_and_removed(H_fit, Wd, keep)
    row = {"prune+ls": _ridge_error(H_fit[:, kept], H_test[:, kept], Y_fit, Y_test)}
    for signal, S in (("h", H_fit), ("gate", act(fit @ Wg.T))):
        unit = S / S.norm(dim=0).clamp_min(1e-12)
        to = (unit[:, removed].T @ unit[:, kept]).argmax(1)   # each removed neuron's most similar kept one
        coef = (S[:, removed] * S[:, kept[to]]).sum(0) / S[:, kept[to]].square().sum(0)
        for mass in MASSES:
            up = Wu[kept].index_add(0, to, mass * coef[:, None] * Wu[removed])
            row[f"up-merge {signal} mass {mass}"] = _ridge_error(hidden(fit, Wg[kept], up), hidden(test, Wg[kept], up),
                                                               Y_fit, Y_test)
    return row


if __name__ == "__main__":
    main()
