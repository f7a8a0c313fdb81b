"""Evaluation beyond perplexity: lm-evaluation-harness tasks on a loaded model (DESIGN §7).

The model is handed to lm-eval's own `hf` model class as the object `dotresize_fx.load` returns, so a
directory in our format (non-uniform widths, skip adapters) is scored exactly as a stock checkpoint is; a stock
directory also loads in lm-eval directly (`lm_eval --model hf --model_args pretrained=OUT`). lm-eval is an
optional extra (`pip install 'dotresize-fx[eval]'`); its registered tasks download their datasets from the
Hugging Face Hub, while a task written as YAML over a local file (`dataset_path: json`) runs offline.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

from .errors import DotResizeError

INSTALL = "pip install 'dotresize-fx[eval]' (or: pip install lm-eval)"
_NETWORK_MODULES = ("requests", "urllib3", "httpx", "huggingface_hub", "aiohttp", "socket")


def run_tasks(model, tokenizer, tasks: list[str], *, tasks_dir: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 1) -> dict:
    """{task: {metric: value}} and lm-eval's sample counts for `tasks` (names lm-eval knows, or tasks defined by
    the YAML files under `tasks_dir`)."""
    for name, v in (("--limit", limit), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise DotResizeError(f"{name} {v}: give a positive whole number")
    if num_fewshot is not None and num_fewshot < 0:
        raise DotResizeError(f"--num-fewshot {num_fewshot}: give 0 or more")
    lm_eval, HFLM, TaskManager = _lm_eval()
    if tokenizer is None or not hasattr(model, "config") or not hasattr(model, "generate"):
        raise DotResizeError("lm-eval tasks need a causal language model with a tokenizer (a Hugging Face "
                             "decoder, compressed or not); this model has none: evaluate it by perplexity instead")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise DotResizeError(f"--tasks-dir {tasks_dir}: no such folder (it holds lm-eval task YAML files)")
    manager = TaskManager(include_path=tasks_dir) if tasks_dir else TaskManager()
    _check_names(tasks, manager.all_tasks, tasks_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    except Exception as e:
        if _from_network(e):
            raise DotResizeError(
                f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}): its registered tasks download their datasets "
                "from the Hugging Face Hub, so they need a network. Offline, write the task as YAML over a local "
                "file (dataset_path: json, dataset_kwargs: {data_files: ...}) and pass its folder with "
                "--tasks-dir") from e
        raise
    results = {t: {k: v for k, v in r.items() if "," in k and isinstance(v, (int, float))}   # "metric,filter"
               for t, r in out["results"].items()}
    return {"tasks": results, "n_samples": out.get("n-samples", {}), "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval_version": lm_eval.__version__}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DotResizeError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from e
    logging.getLogger("lm-eval").setLevel(logging.ERROR)   # per-request chatter; --debug raises the root level
    return lm_eval, HFLM, TaskManager


def _check_names(tasks: list[str], known: list[str], tasks_dir: str | None) -> None:
    known_set = set(known)
    for t in tasks:
        if t not in known_set:
            near = difflib.get_close_matches(t, known, n=3)
            raise DotResizeError(f"lm-eval has no task {t!r}" + (f" (close: {', '.join(near)})" if near else "")
                                 + ("" if tasks_dir else "; a task of your own: pass the folder of its YAML file "
                                    "with --tasks-dir"))


def _from_network(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) comes from a network client."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        e = e.__cause__ or e.__context__
    return False


def print_results(result: dict) -> None:
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if "stderr" not in k)
        n = result["n_samples"].get(task, {}).get("effective")
        print(f"{task}: {shown}" + (f"  ({n} samples)" if n is not None else ""))
