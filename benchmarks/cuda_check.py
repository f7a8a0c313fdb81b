"""The CUDA path against the CPU path: the same job on a random Llama of benchmarks/scale_models.py with
`--device cpu` and `--device cuda`, in this process, for each pass list of PASSES (prune with the least-squares
refit, DOTResize, and prune+ls followed by one distill epoch; 128-token random calibration windows).
Per row: the largest difference between the two saved models' weights (relative to each tensor's largest
entry), the dtypes saved, the compress time and its calibration forwards on each device, distill's held-out
losses on each device, and the peak GPU memory against the model's and one block's bytes (blocks are onloaded
one at a time). Needs a CUDA device: says so and exits 2 without one. Writes
benchmarks/results/cuda-check-DATE.json after every row, beside the rows an earlier run of that day wrote
(a row measured again replaces its old one).

    python benchmarks/cuda_check.py [--sizes 135m 835m] [--dtypes float32 bfloat16] [--passes prune-ls dotresize]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from dotresize_fx.compress import compress

HERE = Path(__file__).resolve().parent
# name: (pass list, calibration windows); distill holds out every 4th batch, so it needs 4 batches or more
PASSES = {"prune-ls": ("prune:mlp=0.25,unmerge=ls", 4),
          "dotresize": ("dotresize:mlp=0.25", 4),
          "prune-ls-distill": ("prune:mlp=0.25,unmerge=ls distill:epochs=1", 16)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="*", default=["135m", "835m"])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--passes", nargs="*", default=list(PASSES), choices=list(PASSES))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run it where torch.cuda.is_available() is true", file=sys.stderr)
        sys.exit(2)
    today = datetime.date.today().isoformat()
    path = HERE / "results" / f"cuda-check-{today}.json"
    # rows of an earlier run today stay; a re-measured row replaces its old one
    rows = {_key(r): r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    machine = (f"{platform.machine()}, {torch.get_num_threads()} CPU threads, {torch.cuda.get_device_name()}, "
               f"torch {torch.__version__}")
    for size in args.sizes:
        for name in args.passes:
            for dtype in args.dtypes:
                try:
                    row = _row(size, dtype, name)
                except Exception as e:   # a row that fails on one device is recorded, and the others still run
                    traceback.print_exc()
                    row = {"size": size, "dtype": dtype, "passes": PASSES[name][0], "error": repr(e)}
                rows[_key(row)] = row
                print(json.dumps(row), flush=True)
                path.write_text(json.dumps({"date": today, "machine": machine, "rows": list(rows.values())}, indent=1))


def _key(row: dict) -> tuple:
    return row["size"], row["dtype"], row["passes"]


def _dense_mb(size: str, dtype: str) -> dict:
    """The dense model's and one dense block's weights, in MB of `dtype` (built on the meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from scale_models import CONFIGS
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[size]))
    size_of = torch.empty((), dtype=getattr(torch, dtype)).element_size() / 2**20
    return {"model_mb": sum(p.numel() for p in model.parameters()) * size_of,
            "block_mb": sum(p.numel() for p in model.model.layers[0].parameters()) * size_of}


def _row(size: str, dtype: str, name: str) -> dict:
    passes, samples = PASSES[name]
    row = {"size": size, "dtype": dtype, "passes": passes, "calib_samples": samples}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for device in ("cpu", "cuda"):
            torch.cuda.reset_peak_memory_stats()
            report = compress(f"{HERE}/scale_models.py:llama_{size}", passes, data="random", calib_samples=samples,
                              seq_len=128, evaluate=False, progress=False, dtype=dtype, device=device,
                              out=f"{tmp}/{device}")
            weights[device] = load_file(f"{tmp}/{device}/model.safetensors")
            row[device] = {"compress_s": report["timing"]["compress_s"],
                           "calib_forward_s": report["timing"]["calib_forward_s"]}
            row[device].update({"distill_held_out_loss": p["held_out_loss"] for p in report["passes"]
                                if p["method"] == "distill"})
            if device == "cuda":
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    row.update(_dense_mb(size, dtype))
    cpu, cuda = weights["cpu"], weights["cuda"]
    assert cpu.keys() == cuda.keys(), "the two devices saved different tensors"
    row["saved_dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in cuda.values()})
    row["max_rel_weight_diff"] = max(((cpu[k].double() - cuda[k].double()).abs().max()
                                      / cpu[k].double().abs().max().clamp_min(1e-30)).item() for k in cpu)
    return row


if __name__ == "__main__":
    main()
