"""Save a compressed model and load it back (DESIGN §6). Never pickles; writes atomically.

Every output directory holds `model.safetensors`, `buffers.safetensors` (non-persistent buffers) and
`resize_plan.json`: the plan names the source model spec and every parameter's new shape, so `load(dir)` replays
it on a fresh copy of the source (`load.load_compressed`). When the model class, rebuilt from the new config, holds exactly the
compressed model, the directory is also a Hugging Face checkpoint (`from_pretrained` loads it directly).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from .cache import atomic_dir
from .errors import DotResizeError
from .families import COUNT_ATTRS, MODULE_CONFIG_KEYS
from .outputs import model_outputs
from .residual import SKIP_ADAPTER

log = logging.getLogger(__name__)

PLAN_FILE = "resize_plan.json"
WEIGHTS = "model.safetensors"
PROGRAM = "model.pt2"     # a resized program: torch.export.save, weights and graph, no pickled code
BUFFERS = "buffers.safetensors"  # non-persistent buffers: not in a state dict, but part of the function
FORMAT = 1


def check_output_dir(out: Path, source: str, overwrite: bool) -> None:
    out = Path(out).resolve()
    src = Path(source)
    if src.exists():
        src_dir = (src if src.is_dir() else src.parent).resolve()
        if out == src_dir or src_dir in out.parents:
            raise DotResizeError(f"--out {out} is inside the input model's directory {src_dir}: "
                                 "choose another directory (the input is never written to)")
    if out.exists() and not overwrite:
        raise DotResizeError(f"output directory {out} exists: pass --overwrite or choose another --out")


def save(model: torch.nn.Module, out: str | Path, *, source: str, tokenizer=None, stock: bool = False,
         report: dict | None = None, overwrite: bool = False, program_inputs: tuple | None = None) -> Path:
    """`program_inputs`: the model is a resized program (`program.as_module`): saved as `model.pt2`."""
    out = Path(out)
    check_output_dir(out, source, overwrite)
    if program_inputs is not None:
        return _save_program(model, out, source, tokenizer, report, overwrite, program_inputs)
    with atomic_dir(out, overwrite=overwrite) as tmp, _cache_on(model):
        stock = stock and hasattr(model, "save_pretrained") and _rebuilds_from_config(model)
        if stock:
            try:
                model.save_pretrained(tmp)  # config.json + model.safetensors
            except Exception as e:  # the config's own validation refuses these widths: our format only
                log.warning("not saved as a stock checkpoint (%s); reload with dotresize_fx.load", e)
                stock = False
                for f in tmp.iterdir():
                    f.unlink()
        if not stock:
            save_model(model, str(tmp / WEIGHTS))
        save_file(_nonpersistent_buffers(model), str(tmp / BUFFERS))  # e.g. a rescaled embed_scale
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(json.dumps(_plan(model, source, stock), indent=1))
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out


@contextlib.contextmanager
def _cache_on(model):
    """A saved decoder generates with its KV cache (the Hugging Face default): `load` turns the cache off for the
    toolkit's own forwards, and a checkpoint saved that way would make `generate` recompute every token."""
    from .kvcache import generates
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache") or not generates(model):
        yield
        return
    old, config.use_cache = config.use_cache, True
    try:
        yield
    finally:
        config.use_cache = old


def _save_program(model, out: Path, source: str, tokenizer, report, overwrite: bool, inputs: tuple) -> Path:
    from .program import save_program
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_program(model, inputs, tmp / PROGRAM)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        src = Path(source)
        plan = {"format": FORMAT, "path": "program", "source": str(src.resolve()) if src.exists() else source,
                "weights": PROGRAM, "stock": False,
                "shapes": {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}}
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1))
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out


def _rebuilds_from_config(model) -> bool:
    """Whether the model class, built from the new config, holds exactly this model: the same parameter
    shapes, the same buffers once the weights are loaded, the same logits on a few tokens.

    Uniform widths are not enough: GPT-2 and OPT derive head_dim from hidden_size, and a config can imply
    constants (an embedding scale) the rewrite did not set; such models are saved in our format instead.
    """
    from transformers.initialization import no_init_weights
    try:
        with no_init_weights():   # allocated, never written: no resident copy of the weights
            fresh = type(model)(copy.deepcopy(model.config)).eval()
        fresh.load_state_dict(model.state_dict(), strict=True, assign=True)   # shares the compressed tensors
        fresh.to(next(model.parameters()).dtype)   # the buffers, as the compressed model holds them
    except Exception as e:  # the config refuses these widths, or builds other shapes
        log.warning("not saved as a stock checkpoint (%s); reload with dotresize_fx.load",
                    str(e).splitlines()[0][:300])
        return False
    ours = dict(model.named_buffers())
    differ = [n for n, b in fresh.named_buffers() if n not in ours or not torch.equal(b, ours[n].to(b.dtype))]
    if not differ and getattr(model, "main_input_name", None) == "input_ids":
        ids = torch.arange(8).remainder(model.config.get_text_config().vocab_size)[None]
        with torch.no_grad():
            if not torch.equal(model_outputs(fresh, (ids,)), model_outputs(model, (ids,))):
                differ = ["logits"]
    if differ:
        log.warning("not saved as a stock checkpoint: built from its config the model differs in %s; reload "
                    "with dotresize_fx.load", differ[0])
    return not differ


def _plan(model, source: str, stock: bool) -> dict:
    src = Path(source)
    config = getattr(model, "config", None)
    attrs = {}
    for name, mod in model.named_modules():
        found = {a: getattr(mod, a) for a in COUNT_ATTRS if isinstance(getattr(mod, a, None), int)}
        own = getattr(mod, "config", None)
        if name and own is not None and own is not config:  # per-layer head counts read from a config copy
            found["config"] = {k: getattr(own, k) for k in MODULE_CONFIG_KEYS if hasattr(own, k)}
        if found:
            attrs[name] = found
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {"format": FORMAT, "source": str(src.resolve()) if src.exists() else source, "stock": stock,
            "dtype": str(dtype).removeprefix("torch."),
            "weights": WEIGHTS,
            "shapes": {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
            "tied": _tied(model), "module_attrs": attrs,
            "skip_adapters": [n for n, mod in model.named_modules() if hasattr(mod, SKIP_ADAPTER)],
            "config": config.to_diff_dict() if config is not None else None}


def _tied(model) -> list[list[str]]:
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [v for v in by_id.values() if len(v) > 1]


def _nonpersistent_buffers(model) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {n: b.detach().clone().contiguous() for n, b in model.named_buffers() if n not in persistent}
