"""The compress job: load → analyze → calibrate → passes → check → evaluate → save, with one report.

Kept out of the CLI so that examples, benchmarks and tests run exactly what `dotresize-fx compress` runs.
"""
from __future__ import annotations

import gc
import logging
import platform
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import torch

from . import data, dist, program
from .analyze import analyze
from .blocks import resolve_device
from .capture import capture
from .errors import DotResizeError, resized_forward
from .evaluate import parameter_counts, perplexity
from .export import OPSET
from .load import load, model_dtype
from .memory import AnonPeak, peak_rss_mb, rss_mb
from .offload import offloaded
from .save import check_output_dir, save

log = logging.getLogger(__name__)


@dataclass
class PassSpec:
    """One pass of a pipeline: its name and options (`prune:mlp=0.2,importance=activation`)."""
    method: str
    options: dict = field(default_factory=dict)
    targets_by: str = ""    # "prune": a fused prune → dotresize pair (see `add_on`)

    @staticmethod
    def parse(text: str) -> list["PassSpec"]:
        specs = []
        for item in text.split():
            method, _, opts = item.partition(":")
            options = {}
            for kv in filter(None, opts.split(",")):
                key, eq, value = kv.partition("=")
                if not eq and method == "quantize":
                    options["scheme"] = key
                    continue
                if not eq:
                    raise DotResizeError(f"--passes {item!r}: options are key=value, got {kv!r}")
                options[key] = _number(value)
            specs.append(PassSpec(method, options))
        return specs


class Pipeline:
    """Passes run in order on one model, sharing calibration statistics: the Python face of `--passes`.

        Pipeline(["prune:mlp=0.2", "dotresize:mlp=0.2", "quantize:int8"]).run("smollm2-135m", out="out/p")
    """

    def __init__(self, passes: list[str | PassSpec] | str):
        items = passes.split() if isinstance(passes, str) else passes
        self.passes = [p for item in items for p in (PassSpec.parse(item) if isinstance(item, str) else [item])]

    def run(self, model: str, **job_options) -> dict:
        """`Job` options (data, calib_samples, seq_len, eval_tokens, out, onnx, …) as keywords; the report."""
        return run(Job(model, self.passes, **job_options))


# the decode-speed measurement: a prompt of up to 128 tokens, then 32 greedy tokens
DECODE_PROMPT, DECODE_TOKENS = 128, 32
_TARGETS = ("mlp", "heads", "residual", "channels", "round_to", "residual_maps")


def add_on(specs) -> list[PassSpec]:
    """`prune:X dotresize:X` with the same targets is DOTResize as an add-on to pruning: the pruning's
    importance picks who stays, transport decides where the rest goes. That is one pass (DOTResize selecting
    with the prune importance), so every block is calibrated once. Different targets run one after the other."""
    out: list[PassSpec] = []
    for spec in specs:
        prev = out[-1] if out else None
        if (spec.method == "dotresize" and prev is not None and prev.method == "prune"
                and {k: prev.options.get(k) for k in _TARGETS} == {k: spec.options.get(k) for k in _TARGETS}):
            importance = prev.options.get("importance", "act_weight")
            if spec.options.get("importance", importance) != importance:
                raise DotResizeError(f"prune picks the targets with importance={importance}, dotresize was given "
                                     f"importance={spec.options['importance']}: drop one")
            out[-1] = PassSpec("dotresize", {**spec.options, "importance": importance}, targets_by="prune")
        else:
            out.append(spec)
    return out


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Job:
    model: str
    passes: list[PassSpec]
    data: str = "sotu"
    calib_samples: int = 32
    seq_len: int = 512
    eval_tokens: int = 16384
    batch_size: int = 4
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    evaluate: bool = True
    progress: bool = True
    onnx: bool = False
    opset: int = OPSET
    layerwise: bool = True
    dtype: str = "auto"          # weights' dtype through the job and in the output (auto: the checkpoint's own)
    device: str = "auto"         # where each block is calibrated and fitted (auto: CUDA when there is one)
    offload_folder: str | None = None   # weights kept on disk there, memory-mapped (`offload.Offload`)


def compress(model: str, passes: list[str | PassSpec] | str, **job_options) -> dict:
    """Compress `model` (a model spec) with `passes` (`"prune:mlp=0.2 dotresize:mlp=0.2"`); the report.

    `job_options` are `Job` fields (data, calib_samples, seq_len, eval_tokens, out, onnx, …)."""
    return Pipeline(passes).run(model, **job_options)


def run(job: Job) -> dict:
    """Run a compress job; returns the report (also written to OUT/report.json)."""
    with offloaded(job.offload_folder) as offload, AnonPeak() as anon:
        return _run(job, offload, anon)


def _run(job: Job, offload, anon: AnonPeak) -> dict:
    from passes import EXPORT_PASSES, TRAIN_PASSES, WIDTH_PASSES, PassContext, build, export_config, width_config
    quantize = [s for s in job.passes if s.method in EXPORT_PASSES]
    specs = add_on(s for s in job.passes if s.method not in EXPORT_PASSES)
    configs = [width_config(s) for s in specs] + [export_config(s) for s in quantize]  # bad options fail first
    if not specs and not quantize:
        raise DotResizeError("no passes given: e.g. --method prune --mlp 0.25, or --passes \"dotresize:mlp=0.25\"")
    if specs and specs[0].method in TRAIN_PASSES:
        raise DotResizeError(f"{specs[0].method} trains a compressed model toward the dense one: put it after a "
                             "width pass (--passes \"prune:mlp=0.25,unmerge=ls distill\")")
    onnx = job.onnx or bool(quantize)
    if onnx and not job.out:
        raise DotResizeError("ONNX export and quantization write files: give --out")
    device = resolve_device(job.device)
    main = dist.is_main()        # a data-parallel run: every rank calibrates its share, rank 0 evaluates and writes
    out, onnx, evaluate = (job.out, onnx, job.evaluate) if main else (None, False, False)
    t_start = time.perf_counter()
    timing = {}
    if out:
        check_output_dir(Path(out), job.model, job.overwrite)
    t, baseline_rss = time.perf_counter(), rss_mb()
    model, tokenizer, inputs = load(job.model, job.dtype, offload)
    timing["load_s"] = time.perf_counter() - t
    if onnx and model_dtype(model) != torch.float32:
        raise DotResizeError(f"ONNX export is validated for float32 weights, the model is {model_dtype(model)}: "
                             "compress with --dtype float32 for --onnx or a quantize pass")
    analysis = analyze(model, inputs)
    timing["capture_s"], timing["analyze_s"] = analysis.timing["capture_s"], analysis.timing["analyze_s"]
    calib, eval_windows, provenance = _data(job, tokenizer, inputs, model)
    calib = dist.shard(calib)
    before = parameter_counts(model)
    ppl_before = _ppl(model, eval_windows, job) if evaluate else None

    path, path_reason = program.choose(model, analysis, {k for s, c in zip(specs, configs) if s.method in WIDTH_PASSES
                                                          for k in c.targets.kinds()})
    # a distill pass's teacher is the model as loaded: its outputs, taken before any width pass changes it
    teacher = {i: _teacher(job, tokenizer, inputs, model, calib, c) for i, (s, c) in enumerate(zip(specs, configs))
               if s.method in TRAIN_PASSES}
    current, pass_reports = (program.as_module(analysis) if path == "program" else model), []
    _release_capture(analysis, path)
    context = PassContext(analysis, inputs, calib, device, job.progress, job.layerwise, offload=offload,
                          inplace=not onnx)   # ONNX latency needs the dense model
    t = time.perf_counter()
    for i, (spec, config) in enumerate(zip(specs, configs)):
        the_pass = build(spec, config, replace(context, analysis=analysis, teacher=teacher.pop(i, None)))
        with resized_forward(spec.method, analysis, getattr(config, "targets", None)):
            result = the_pass(current)
        current = result.graph_module
        if offload is not None:   # what the pass left in memory (weights outside the blocks, a trained model)
            offload.store(current)
        pass_reports.append({"method": f"{spec.targets_by}>{spec.method}" if spec.targets_by else spec.method,
                             "options": spec.options, **the_pass.report})
        if i + 1 < len(specs):
            analysis = analyze(current, inputs)
            if path == "program":
                current = program.as_module(analysis)
            _release_capture(analysis, path)
    timing["compress_s"] = time.perf_counter() - t
    timing["calib_forward_s"] = sum(r.get("calib_forward_s", 0.0) for r in pass_reports)
    with resized_forward("the rewrite", analysis, None):
        graph_diff = _graph_check(current, inputs)
    after = parameter_counts(current)
    ppl_after = _ppl(current, eval_windows, job) if evaluate else None
    report = {
        "model": job.model, "passes": pass_reports,
        "params_before": before["total"], "params_after": after["total"],
        "nonembed_params_before": before["non_embedding"], "nonembed_params_after": after["non_embedding"],
        "nonembed_reduction": 1 - after["non_embedding"] / before["non_embedding"],
        "ppl_before": ppl_before and ppl_before["ppl"], "ppl_after": ppl_after and ppl_after["ppl"],
        "widths": _widths(pass_reports), "graph_check_max_abs_diff": graph_diff,
        "rewrite_path": path, "rewrite_path_reason": path_reason,
        "protocol": {**provenance, "seq_len": job.seq_len, "eval_tokens": ppl_after and ppl_after["tokens"],
                     "calib_samples": job.calib_samples, "seed": job.seed, "bos": True},
        "versions": _versions(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "dtype": str(model_dtype(current)).removeprefix("torch."), "ranks": dist.world_size(), "device": device,
    }
    if offload is not None:
        report["offload"] = {"folder": str(offload.folder), "written_mb": offload.stored_bytes / 2**20}
    timing["total_s"] = time.perf_counter() - t_start
    report["timing"] = timing
    report["peak_rss_mb"] = peak_rss_mb()
    report["peak_anon_mb"] = anon.peak_mb   # the job's own memory, apart from pages of mapped weight files
    report["baseline_rss_mb"] = baseline_rss   # the process before the model loads: interpreter and libraries
    report["_model"], report["_tokenizer"], report["_eval_windows"] = current, tokenizer, eval_windows
    if out:
        stock = all(r.get("stock", True) for r in pass_reports)
        save(current, out, source=job.model, tokenizer=tokenizer, stock=stock, report=public(report),
             overwrite=job.overwrite, program_inputs=inputs if path == "program" else None)
        report["out"] = out
        if onnx:
            _export_and_validate(job, report, current, model, inputs, eval_windows, configs[len(specs):],
                                 lambda n: [x for b in _calibration(job, tokenizer, inputs, model, n)[0]
                                            for x in b[0].split(1)])
            report["timing"]["total_s"] = time.perf_counter() - t_start
    return report


def _release_capture(analysis, path: str) -> None:
    """Let go of what the capture holds of the model's tensors, before a pass replaces them. On the eager path
    the captured program keeps only its graph (`forget_weights`); and torch.export's capture and check leave tens
    of thousands of objects in reference cycles (33k on a 135M Llama), modules among them that hold the model's
    tensors, which only a full collection frees: left to the collector's schedule, every weight a rewrite
    replaced stayed alive (135M peak RSS 1490 → 1184 MB, 836M float32 6.8 → 5.0–5.3 GB)."""
    if path == "eager":
        analysis.captured.forget_weights()
    gc.collect()


def _export_and_validate(job, report, compressed, dense, inputs, windows, quantize, calibration) -> None:
    import json
    from .export import check, latency_bound, size_mb, to_onnx, validate
    t = time.perf_counter()
    path = to_onnx(compressed, inputs, Path(job.out) / "model.onnx", job.opset)
    # token ids in, logits out: a CTC or classification head over audio or images also has a vocab_size
    vocab = None if inputs[0].is_floating_point() else getattr(getattr(dense, "config", None), "vocab_size", None)
    report["onnx"] = validate(compressed, path, windows, inputs, dense_model=dense, vocab=vocab, corpus=job.data,
                              latency_shapes=((1, job.seq_len), (8, job.seq_len)), ppl_torch=report["ppl_after"],
                              opset=job.opset)
    if "latency_ratio" in report["onnx"]:
        param_ratio = report["nonembed_params_after"] / report["nonembed_params_before"]
        report["onnx"].update(latency_bound(report["onnx"], param_ratio))
    report["onnx"]["size_mb"] = size_mb(path)
    report["timing"]["onnx_s"] = time.perf_counter() - t
    for config in quantize:
        from passes.quantize import quantize_onnx
        q = quantize_onnx(path, path.with_name(f"model.{config.scheme}.onnx"), config, calibration)
        if windows is not None:
            from .evaluate import perplexity
            from .export import ort_forward, session
            q["ppl_ort"] = perplexity(ort_forward(session(q["path"])), windows, corpus=job.data,
                                      progress=False)["ppl"]
            q["ppl_change"] = q["ppl_ort"] - report["onnx"]["ppl_ort"]
        report["quantized"] = q
    if "generation" in report["onnx"] and vocab:
        report["decode"] = _decode_speeds(job, dense, inputs, path, report.get("quantized"))
    tmp = Path(job.out) / ".report.json.tmp"
    tmp.write_text(json.dumps(public(report), indent=2, default=str))
    tmp.replace(Path(job.out) / "report.json")
    check(report["onnx"])


def _decode_speeds(job, dense, inputs, path: Path, quantized: dict | None) -> dict:
    """Prefill and decode tokens/s through the KV cache at batch 1 and 8: the dense float file, the compressed
    one and its quantized file, interleaved (`generate.decode_speed`)."""
    from .export import dense_onnx, session
    from .generate import decode_speed
    files = {"dense": dense_onnx(dense, inputs, job.opset), "compressed": path}
    if quantized:
        files[f"compressed {quantized['name']}"] = Path(quantized["path"])
    sessions = {name: session(f) for name, f in files.items()}
    return decode_speed(sessions, prompt_len=min(job.seq_len, DECODE_PROMPT), new=DECODE_TOKENS,
                        vocab=dense.config.vocab_size)


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _data(job: Job, tokenizer, inputs, model):
    batches, provenance = _calibration(job, tokenizer, inputs, model, job.calib_samples)
    if "calib_windows" not in provenance:
        return batches, None, provenance
    eval_windows = None
    if job.evaluate:
        ev = data.text(job.data, "evaluation")
        eval_windows = data.evaluation_windows(data.tokenize(tokenizer, ev), data.bos_id(tokenizer), job.seq_len,
                                               job.eval_tokens, ev.name)
    provenance.pop("calib_windows")
    return batches, eval_windows, {**provenance, "eval_tokens_sha256": eval_windows is not None and
                                   data.token_hash(eval_windows)}


def _calibration(job: Job, tokenizer, inputs, model, n: int) -> tuple[list[tuple], dict]:
    """n calibration samples of the job's data in batches of --batch-size, and their provenance. Text windows
    are drawn in a seeded order, so a larger n extends a smaller one."""
    if data.is_input_data(job.data):
        batches = data.input_batches(job.data, inputs, n, job.batch_size)
        return batches, {"corpus": job.data,
                         "calib_tokens_sha256": data.token_hash(torch.cat([b[0] for b in batches]))}
    if job.data == "random" or tokenizer is None:
        if job.data != "random":
            raise DotResizeError(f"the model has no tokenizer, so --data {job.data} cannot be tokenized: "
                                 "use --data random")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return data.synthetic_inputs(inputs, n, job.seed, vocab), {"corpus": "random", "calib_tokens_sha256": None}
    corpus = data.text(job.data, "calibration")
    ids = data.tokenize(tokenizer, corpus, data.CALIB_MAX_CHARS)
    windows = data.calibration_windows(ids, data.bos_id(tokenizer), n, job.seq_len, job.seed, corpus.name)
    batches = [(windows[i:i + job.batch_size],) for i in range(0, len(windows), job.batch_size)]
    return batches, {"corpus": corpus.name, "calib_tokens_sha256": data.token_hash(windows), "calib_windows": True}


def _teacher(job: Job, tokenizer, inputs, model, calib: list, config) -> tuple[list, list]:
    """A train pass's batches (the calibration's, or `samples` windows of the same data) and the dense model's
    targets on them."""
    from passes.distill import check_trainable, teacher_targets
    if config.samples is not None:
        calib = dist.shard(_calibration(job, tokenizer, inputs, model, config.samples)[0])
    check_trainable(model, calib)
    return teacher_targets(model, calib, config), calib


def _ppl(model, windows, job):
    if windows is None:
        return None
    return perplexity(model, windows, corpus=job.data, batch_size=job.batch_size, progress=job.progress)


def _graph_check(model, inputs) -> float:
    """The compressed model must still capture, and its graph must match it (raises otherwise)."""
    from .capture import check_capture
    return check_capture(model, capture(model, inputs, check=False), inputs)


def _widths(reports) -> dict:
    out = {}
    for r in reports:
        out.update(r.get("widths", {}))
    return out


def _versions() -> dict:
    names = ["torch", "transformers", "pot", "onnx", "onnxruntime"]
    versions = {}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return versions
