"""A model larger than the memory it is given: the random 835M Llama (benchmarks/scale_models.py) saved as a
Hugging Face checkpoint, compressed by `prune:mlp=0.25,unmerge=ls` inside a memory cgroup whose limit is below its
weights' bytes — once with the weights in memory, once with `--offload-folder`. Needs a writable cgroup memory
controller (v1 or v2; root in a container usually has one); writes benchmarks/results/offload-limit-DATE.json.

    .venv/bin/python benchmarks/offload_limit.py --size 835m --limit-mb 2048
"""
from __future__ import annotations

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

from scale import PASSES, checkpoint

HERE = Path(__file__).resolve().parent
V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="835m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--limit-mb", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(args.size, args.dtype, f"{tmp}/ckpt")
        weights_mb = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")) / 2**20
        for offload in (False, True):
            rows.append(_run(ckpt, tmp, args, offload) | {"weights_mb": weights_mb})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    today = datetime.date.today().isoformat()
    out = {"date": today, "machine": f"{platform.machine()}, {args.threads} threads", "passes": PASSES,
           "model": f"scale_models.llama_{args.size} saved as a checkpoint ({args.dtype})",
           "calibration": "4 x 128 tokens, --data random", "limit_mb": args.limit_mb, "rows": rows}
    (HERE / "results" / f"offload-limit-{today}.json").write_text(json.dumps(out, indent=1))


def _run(ckpt: str, tmp: str, args, offload: bool) -> dict:
    name = f"dotresize-offload-{os.getpid()}-{int(offload)}"
    group = _cgroup(name, args.limit_mb * 2**20)
    out = f"{tmp}/out{int(offload)}"
    cli = [sys.executable, "-m", "dotresize_fx.cli", "--threads", str(args.threads), "compress", ckpt, "--passes",
           PASSES, "--data", "random", "--calib-samples", "4", "--seq-len", "128", "--eval-tokens", "512",
           "--out", out, "--json", f"{out}.json", *(["--offload-folder", f"{tmp}/offload"] if offload else [])]
    _evict(ckpt)
    t0 = time.perf_counter()
    try:   # the child joins the cgroup, then becomes the compress process
        rc = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cli],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        peak = _peak_mb(group)
    finally:
        group.rmdir()
    row = {"offload": offload, "rc": rc, "killed": rc in (-9, 137), "wall_s": time.perf_counter() - t0,
           "cgroup_peak_mb": peak}
    if rc == 0:
        r = json.loads(Path(f"{out}.json").read_text())
        row |= {k: r[k] for k in ("peak_rss_mb", "peak_anon_mb", "baseline_rss_mb", "params_before",
                                  "params_after")} | {k: r["timing"][k] for k in ("compress_s", "calib_forward_s")}
    return row


def _evict(folder: str) -> None:
    """Drop the checkpoint's pages from the page cache: written by this process, they are charged to its cgroup,
    and the job would read them for free. Faulted in again by the job, they count against its limit."""
    for f in Path(folder).iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cgroup(name: str, limit: int) -> Path:
    if (V1 / "memory.limit_in_bytes").exists():
        group = V1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
        return group
    group = V2 / name
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group


def _peak_mb(group: Path) -> float | None:
    for f in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / f).exists():
            return int((group / f).read_text()) / 2**20
    return None


if __name__ == "__main__":
    main()
