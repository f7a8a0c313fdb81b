"""Quality and time against the number of calibration windows (the default `--calib-samples` comes from this).

One `dotresize-fx compress` process per (configuration, windows), on the validation split (choices are picked
there, DESIGN §7), the reduced protocol unless told otherwise. Writes
benchmarks/results/calib-curve-YYYY-MM-DD.json and prints a Markdown table.

    .venv/bin/python benchmarks/calib_curve.py [--windows 16 32 64 128] [--rows prune+ls dotresize-mlp-mass0.25]
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from quality import ROWS, _compress


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--rows", nargs="+", default=["prune+ls", "dotresize-mlp-mass0.25"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="validation:sotu")
    args = p.parse_args()
    path = Path(__file__).parent / "results" / f"calib-curve-{datetime.date.today().isoformat()}.json"
    out = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads",
           "data": args.data, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens, "rows": []}
    same = ("data", "seq_len", "eval_tokens")
    if path.exists() and all(json.loads(path.read_text()).get(k) == out[k] for k in same):
        out["rows"] = json.loads(path.read_text())["rows"]   # today's rows stay; re-measured ones are replaced
    for name in args.rows:
        for n in args.windows:
            t0 = time.perf_counter()
            r = _compress(argparse.Namespace(**{**vars(args), "calib_samples": n}), ROWS[name])
            out["dense_ppl"] = r["ppl_before"]
            out["rows"] = [o for o in out["rows"] if (o["method"], o["windows"]) != (name, n)]
            out["rows"].append({"method": name, "config": ROWS[name], "windows": n, "ppl": r["ppl_after"],
                                "compress_s": r["timing"]["compress_s"],
                                "calib_forward_s": r["timing"]["calib_forward_s"],
                                "peak_rss_mb": r["peak_rss_mb"], "wall_s": time.perf_counter() - t0})
            print(f"{name:<24} {n:>4} windows  ppl {r['ppl_after']:8.2f}  compress {r['timing']['compress_s']:.0f} s",
                  file=sys.stderr, flush=True)
            path.write_text(json.dumps(out, indent=1))   # after every row: a stopped run keeps what it measured
    print("| method | windows | ppl | compress s | calib fwd s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in sorted(out["rows"], key=lambda r: (r["method"], r["windows"])):
        print(f"| {r['method']} | {r['windows']} | {r['ppl']:.2f} | {r['compress_s']:.0f} | "
              f"{r['calib_forward_s']:.0f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
