"""`dotresize-fx`: one command per stage of the data flow. Errors print one line and exit 2 (`--debug` for the trace)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .errors import DotResizeError


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    target = Path(path)
    if not target.parent.is_dir():
        raise DotResizeError(f"cannot write {path}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(target)


def cmd_fetch(args) -> dict:
    from .data import sotu_dir
    from .load import smollm2_dir
    t0 = time.perf_counter()
    corpus, model = sotu_dir(), smollm2_dir()
    print(f"SOTU corpus: {corpus}\nSmolLM2-135M float32: {model}\n({time.perf_counter() - t0:.1f} s)")
    return {"sotu": str(corpus), "smollm2": str(model)}


def cmd_eval(args) -> dict:
    from . import data
    from .evaluate import parameter_counts, perplexity
    from .load import load
    model, tokenizer, _ = load(args.model)
    corpus = data.text(args.data, "evaluation")
    windows = data.evaluation_windows(data.tokenize(tokenizer, corpus), data.bos_id(tokenizer), args.seq_len,
                                      args.eval_tokens, corpus.name)
    result = perplexity(model, windows, corpus=corpus.name)
    result["params"] = parameter_counts(model)
    result["tokens_sha256"] = data.token_hash(windows)
    print(f"perplexity {result['ppl']:.3f}  ({result['tokens']} tokens of {corpus.name} "
          f"{corpus.split} split, windows of {result['seq_len']} with BOS; "
          f"{result['params']['total'] / 1e6:.1f}M parameters)")
    return result


def cmd_analyze(args) -> dict:
    from .analyze import analyze
    from .load import load
    model, _, inputs = load(args.model)
    analysis = analyze(model, inputs)
    print(analysis.table())
    if args.details:
        for g in analysis.groups:
            print("\n" + g.details())
    t = analysis.timing
    print(f"\n{len(analysis.groups)} groups; capture {t['capture_s']:.2f} s, analysis {t['analyze_s']:.3f} s")
    if analysis.tied:
        print("tied parameters: " + "; ".join(" = ".join(n) for n in analysis.tied))
    return analysis.to_json()


def cmd_verify(args) -> dict:
    from .analyze import analyze
    from .load import load
    from .rewrite import VERIFY_TOL, invariance_checks
    model, _, inputs = load(args.model)
    analysis = analyze(model, inputs)
    checks = invariance_checks(model, analysis, inputs)
    for c in checks:
        diff = "skipped: " + c["skipped"] if c.get("skipped") else f"max |d output| {c['max_abs_diff']:.3g}"
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:<24} {diff}")
    result = {"checks": checks, "tolerance": VERIFY_TOL, "dtype": "float64"}
    if not all(c["ok"] for c in checks):
        _write_json(args.json, result)
        bad = [c for c in checks if not c["ok"]]
        raise DotResizeError(f"{len(bad)} invariance check(s) failed (worst {max(c['max_abs_diff'] for c in bad):.3g} "
                             f"> {VERIFY_TOL}): the rewrite does not preserve this model; run 'analyze --details' "
                             "and report the group")
    return result


def _add_eval_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sotu", help="text: sotu | file.txt | folder | hf:NAME[:CONFIG]:SPLIT | random")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens, BOS included (default 512)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored for perplexity (default 16384)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dotresize-fx", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("DOTRESIZE_THREADS", 0)) or None,
                        help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch the embedded model and corpus into the cache")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("eval", help="perplexity of a model (DESIGN §7 protocol)")
    p.add_argument("model")
    _add_eval_protocol(p)
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="capture the model and list its width groups")
    p.add_argument("model")
    p.add_argument("--json", help="write the groups here")
    p.add_argument("--details", action="store_true", help="print every group's chain of members")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("verify", help="invariance checks: identity, permutation and rotation maps keep the outputs")
    p.add_argument("model")
    p.add_argument("--json", help="write the checks here")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = args.func(args)
        _write_json(getattr(args, "json", None), result)
    except (DotResizeError, FileNotFoundError, FileExistsError, PermissionError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
