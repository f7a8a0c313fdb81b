"""The CUDA path against the CPU path: one job (`prune:mlp=0.25,unmerge=ls`, 4 × 128 random calibration tokens)
on a random Llama of benchmarks/scale_models.py with `--device cpu` and `--device cuda`, in this process.
Per row: the largest difference between the two saved models' weights (relative to each tensor's largest
entry), the compress time and its calibration forwards on each device, and the peak GPU memory against the
model's and one block's bytes (blocks are onloaded one at a time). Needs a CUDA device: says so and exits 2
without one. Writes benchmarks/results/cuda-check-DATE.json after every row.

    python benchmarks/cuda_check.py [--sizes 135m 835m] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from dotresize_fx.compress import compress

HERE = Path(__file__).resolve().parent
PASSES = "prune:mlp=0.25,unmerge=ls"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="*", default=["135m", "835m"])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run it where torch.cuda.is_available() is true", file=sys.stderr)
        sys.exit(2)
    today = datetime.date.today().isoformat()
    path = HERE / "results" / f"cuda-check-{today}.json"
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            rows.append(_row(size, dtype))
            print(json.dumps(rows[-1]), flush=True)
            path.write_text(json.dumps({"date": today, "machine": f"{platform.machine()}, "
                                        f"{torch.cuda.get_device_name()}", "passes": PASSES, "rows": rows}, indent=1))


def _dense_mb(size: str, dtype: str) -> dict:
    """The dense model's and one dense block's weights, in MB of `dtype` (built on the meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from scale_models import CONFIGS
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[size]))
    size_of = torch.empty((), dtype=getattr(torch, dtype)).element_size() / 2**20
    return {"model_mb": sum(p.numel() for p in model.parameters()) * size_of,
            "block_mb": sum(p.numel() for p in model.model.layers[0].parameters()) * size_of}


def _row(size: str, dtype: str) -> dict:
    row = {"size": size, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for device in ("cpu", "cuda"):
            torch.cuda.reset_peak_memory_stats()
            report = compress(f"{HERE}/scale_models.py:llama_{size}", PASSES, data="random", calib_samples=4,
                              seq_len=128, evaluate=False, progress=False, dtype=dtype, device=device,
                              out=f"{tmp}/{device}")
            weights[device] = load_file(f"{tmp}/{device}/model.safetensors")
            row[device] = {"compress_s": report["timing"]["compress_s"],
                           "calib_forward_s": report["timing"]["calib_forward_s"]}
            if device == "cuda":
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    row.update(_dense_mb(size, dtype))
    cpu, cuda = weights["cpu"], weights["cuda"]
    assert cpu.keys() == cuda.keys(), "the two devices saved different tensors"
    row["max_rel_weight_diff"] = max(((cpu[k].double() - cuda[k].double()).abs().max()
                                      / cpu[k].double().abs().max().clamp_min(1e-30)).item() for k in cpu)
    return row


if __name__ == "__main__":
    main()
