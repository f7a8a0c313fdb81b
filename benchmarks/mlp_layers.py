"""What the per-layer MLP benchmarks share (bias_term.py, up_merge.py): their arguments, SmolLM2 with its SOTU
calibration windows, the rows a module reads split into fit and held-out parts, the prune pass's kept neurons,
and the JSON they write."""
import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from dotresize_fx import data
from dotresize_fx.load import load


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--layers", type=int, nargs="*", default=[3, 15, 26])
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--keep", type=int, default=1152)
    p.add_argument("--threads", type=int, default=2)
    return p


def model_and_windows(args):
    """SmolLM2 and `args.windows` calibration windows of `args.seq_len` tokens (torch threads set)."""
    torch.set_num_threads(args.threads)
    model, tok, _ = load("smollm2-135m")
    ids = data.tokenize(tok, data.text("sotu", "calibration"), 400_000)
    return model, data.calibration_windows(ids, data.bos_id(tok), args.windows, args.seq_len, 0, "sotu")


def fit_and_held_out(model, module: torch.nn.Module, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `module` reads (float64), the first three quarters of the windows to fit on and the rest to score."""
    rows = []
    hook = module.register_forward_hook(lambda m, i, o: rows.append(i[0].flatten(0, -2).double()))
    with torch.no_grad():
        for w in windows.split(4):
            model(w)
    hook.remove()
    X = torch.cat(rows)
    return X[: len(X) * 3 // 4], X[len(X) * 3 // 4:]


def kept_and_removed(H: torch.Tensor, down: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prune pass's choice: the `keep` neurons of hidden rows H with the largest act × weight
    (sqrt(E[h_i²])·‖W_down[:, i]‖), sorted, and the others."""
    kept = (H.square().mean(0).sqrt() * down.norm(dim=0)).topk(keep).indices.sort().values
    removed = torch.ones(down.shape[1], dtype=torch.bool)
    removed[kept] = False
    return kept, removed.nonzero().squeeze(1)


def write(stem: str, args, rows: list[dict]) -> None:
    """benchmarks/results/STEM-DATE.json."""
    today = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"{stem}-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": f"{platform.machine()}, {args.threads} threads",
                               "protocol": vars(args), "rows": rows}, indent=1))
