"""Save a compressed model and load it back (DESIGN §6). Never pickles; writes atomically.

Every output directory holds `model.safetensors`, `buffers.safetensors` (non-persistent buffers) and
`resize_plan.json`: the plan names the source model spec and every parameter's new shape, so `load(dir)` replays
it on a fresh copy of the source. When the model class, rebuilt from the new config, holds exactly the
compressed model, the directory is also a Hugging Face checkpoint (`from_pretrained` loads it directly).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .cache import atomic_dir
from .errors import DotResizeError
from .load import model_outputs
from .rewrite import (HEAD_COUNT_ATTRS, KV_COUNT_ATTRS, MODULE_CONFIG_KEYS, SKIP_ADAPTER, add_skip_adapter,
                      sync_shapes)

log = logging.getLogger(__name__)

PLAN_FILE = "resize_plan.json"
WEIGHTS = "model.safetensors"
BUFFERS = "buffers.safetensors"  # non-persistent buffers: not in a state dict, but part of the function
FORMAT = 1
_COUNT_ATTRS = HEAD_COUNT_ATTRS + KV_COUNT_ATTRS + ("num_key_value_groups", "split_size")


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
         report: dict | None = None, overwrite: bool = False) -> Path:
    out = Path(out)
    check_output_dir(out, source, overwrite)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        stock = stock and hasattr(model, "save_pretrained") and _rebuilds_from_config(model)
        if stock:
            try:
                model.save_pretrained(tmp)  # config.json + model.safetensors
            except ValueError as e:     # the config's own validation refuses these widths: our format only
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


def _rebuilds_from_config(model) -> bool:
    """Whether the model class, built from the new config, holds exactly this model: the same parameter
    shapes, the same buffers once the weights are loaded, the same logits on a few tokens.

    Uniform widths are not enough: GPT-2 and OPT derive head_dim from hidden_size, and a config can imply
    constants (an embedding scale) the rewrite did not set; such models are saved in our format instead.
    """
    from transformers.initialization import no_init_weights
    try:
        with no_init_weights():
            fresh = type(model)(copy.deepcopy(model.config)).eval()
        fresh.load_state_dict(model.state_dict(), strict=True)
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
        found = {a: getattr(mod, a) for a in _COUNT_ATTRS if isinstance(getattr(mod, a, None), int)}
        own = getattr(mod, "config", None)
        if name and own is not None and own is not config:  # per-layer head counts read from a config copy
            found["config"] = {k: getattr(own, k) for k in MODULE_CONFIG_KEYS if hasattr(own, k)}
        if found:
            attrs[name] = found
    return {"format": FORMAT, "source": str(src.resolve()) if src.exists() else source, "stock": stock,
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


def load_compressed(path: str | Path):
    """Replay a resize plan on a fresh copy of its source model, then load the saved weights."""
    from .load import Loaded, load
    path = Path(path)
    try:
        plan = json.loads((path / PLAN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DotResizeError(f"{path / PLAN_FILE} is unreadable ({e}): the directory is not a complete "
                             "dotresize_fx output; compress again") from e
    if plan.get("format") != FORMAT:
        raise DotResizeError(f"{path / PLAN_FILE} has format {plan.get('format')}, this version reads {FORMAT}")
    source = load(plan["source"])
    model = source.model
    tied = {n: group for group in plan["tied"] for n in group}
    made = {}
    for name in plan.get("skip_adapters", []):
        mod = model.get_submodule(name)
        add_skip_adapter(mod, torch.empty(plan["shapes"][f"{name}.{SKIP_ADAPTER}"]))
    for name, shape in plan["shapes"].items():
        module, _, attr = name.rpartition(".")
        key = tied.get(name, [name])[0]
        if key not in made:
            made[key] = torch.nn.Parameter(torch.empty(shape), requires_grad=False)
        setattr(model.get_submodule(module), attr, made[key])
    weights = path / plan["weights"]
    if not weights.is_file():
        raise DotResizeError(f"{weights} is missing: the directory is incomplete; compress again")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:
        raise DotResizeError(f"{weights} is corrupt or does not match its plan ({e}); compress again") from e
    aliases = {n for g in plan["tied"] for n in g[1:]}
    if unexpected or set(missing) - aliases - _buffers(model):
        raise DotResizeError(f"{weights} does not match its plan: missing {sorted(set(missing) - aliases)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    if (path / BUFFERS).is_file():
        for name, value in load_file(str(path / BUFFERS)).items():
            module, _, attr = name.rpartition(".")
            model.get_submodule(module).register_buffer(attr, value, persistent=False)
    sync_shapes(model)
    for module, values in plan["module_attrs"].items():
        mod = model.get_submodule(module) if module else model
        for attr, value in values.items():
            if attr == "config":
                mod.config = copy.copy(mod.config)
                for key, v in value.items():
                    setattr(mod.config, key, v)
            else:
                setattr(mod, attr, value)
    config = getattr(model, "config", None)
    if config is not None and plan.get("config"):
        for key, value in plan["config"].items():
            if not isinstance(value, dict):
                setattr(config, key, value)
    tokenizer = source.tokenizer
    return Loaded(model.eval(), tokenizer, source.example_inputs)


def _nonpersistent_buffers(model) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {n: b.detach().clone().contiguous() for n, b in model.named_buffers() if n not in persistent}


def _buffers(model) -> set[str]:
    return {n for n, _ in model.named_buffers()}
