"""Model specs → (model, tokenizer, example inputs).

A spec is one of:
  * an embedded model (``smollm2-135m``, the default; ``gemma3-270m``): see `embedded`;
  * a ``.gguf`` file;
  * a directory: a Hugging Face checkpoint, or one written by :func:`dotresize_fx.save.save` (replayed from its plan);
  * a factory ``path/to/file.py:func`` or ``package.module:func`` returning ``(module, example_inputs)`` or
    ``(module, example_inputs, tokenizer)`` — how models that are not Hugging Face enter the toolkit.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, load_model

from .embedded import EMBEDDED, gguf_to_hf_dir, hf_dir
from .errors import DotResizeError
from .families import sync_shapes
from .residual import SKIP_ADAPTER, add_skip_adapter
from .save import BUFFERS, FORMAT, PLAN_FILE

log = logging.getLogger(__name__)

class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    example_inputs: tuple


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(spec: str | Path, dtype: str = "auto", offload=None) -> Loaded:
    """Load a model spec (see the module docstring), in eval mode on the CPU, its weights in `dtype`
    (`auto`: the checkpoint's own; the embedded models are float32). With an `offload.Offload`, the weights end
    up memory-mapped from its folder, cast there one tensor at a time: no second copy is made in memory."""
    spec = str(spec)
    if dtype not in DTYPES:
        raise DotResizeError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if offload is None:
        return _load(spec, dtype)
    # a checkpoint loads memory-mapped in its own dtype; the cast happens as each tensor is stored
    loaded = _load(spec, "auto" if Path(spec).is_dir() or spec in EMBEDDED else dtype, clone=False)
    offload.store(loaded.model, dtype=DTYPES[dtype])
    return loaded


def _load(spec: str, dtype: str, clone: bool = True) -> Loaded:
    """`clone`: copy memory-mapped checkpoint tensors into memory (aligned; matmuls on them run faster)."""
    if spec in EMBEDDED:
        return _load_hf_dir(hf_dir(spec), dtype, clone=clone)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DotResizeError(f"GGUF file {spec!r} does not exist: check the path")
        return _load_hf_dir(gguf_to_hf_dir(path), dtype, clone=clone)
    if path.is_dir():
        if (path / PLAN_FILE).is_file():
            return _cast(load_compressed(path), dtype)
        if (path / "config.json").is_file():
            return _load_hf_dir(path, dtype, clone=clone)
        raise DotResizeError(f"directory {spec!r} holds neither config.json (Hugging Face) nor {PLAN_FILE} "
                             "(dotresize_fx output): give a model directory, a .gguf file, an embedded model "
                             f"({', '.join(EMBEDDED)}) or a factory 'file.py:func'")
    if ":" in spec:
        return _cast(_load_factory(spec, DTYPES[dtype]), dtype)
    raise DotResizeError(f"unknown model spec {spec!r}: use an embedded model ({', '.join(EMBEDDED)}), a Hugging "
                         "Face directory, a .gguf file, or a factory 'path/to/file.py:func' / 'package.module:func'")


def _cast(loaded: Loaded, dtype: str) -> Loaded:
    if DTYPES[dtype] is not None:
        loaded.model.to(DTYPES[dtype])
    return loaded


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating weights (the first one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _load_hf_dir(path: Path, dtype: str = "auto", clone: bool = True) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype] or "auto", config=config)
    except Exception as e:
        raise DotResizeError(f"cannot load Hugging Face model from {path}: {e}") from e
    model = _clone_parameters(model.eval()) if clone else model.eval()   # else: `Offload.store` copies them
    model.config.use_cache = False
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # a model without a tokenizer is still a model: callers needing text say so
        log.info("no tokenizer in %s", path)
    return Loaded(model, tokenizer, example_token_inputs(model.config.vocab_size))


def _clone_parameters(model: torch.nn.Module) -> torch.nn.Module:
    # Tensors memory-mapped from a checkpoint may be unaligned; matmuls on them run 2-4x slower.
    with torch.no_grad():
        seen: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in seen:
                    seen[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                module._parameters[name] = seen[id(p)]
    return model


def example_token_inputs(vocab_size: int, batch: int = 2, seq: int = 16) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab_size, (batch, seq), generator=g),)


def _load_factory(spec: str, dtype: torch.dtype | None = None) -> Loaded:
    """Call a factory; with a `dtype`, under it as torch's default, so that the weights it creates are built in
    that dtype (an 835M model made in float32 and cast after peaked at 2.4× its bfloat16 bytes)."""
    target, _, func_name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise DotResizeError(f"factory file {target!r} does not exist: check the path in {spec!r}")
        mod_name = f"_dotresize_factory_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling-free reloads need the module registered
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise DotResizeError(f"importing factory file {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise DotResizeError(f"cannot import factory module {target!r}: {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DotResizeError(f"{target!r} has no callable {func_name!r}: check the name after ':' in {spec!r}")
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype or previous)
        out = func()
    except Exception as e:
        raise DotResizeError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    finally:
        torch.set_default_dtype(previous)
    return _check_factory_output(spec, out)


def _check_factory_output(spec: str, out: Any) -> Loaded:
    shape_hint = "a factory must return (nn.Module, example_inputs_tuple) or (nn.Module, example_inputs_tuple, tokenizer)"
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise DotResizeError(f"factory {spec!r} returned {type(out).__name__}: {shape_hint}")
    model, inputs, *rest = out
    if not isinstance(model, torch.nn.Module):
        raise DotResizeError(f"factory {spec!r} returned {type(model).__name__} as the model: {shape_hint}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise DotResizeError(f"factory {spec!r} returned example inputs that are not a tuple of tensors: {shape_hint}")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return Loaded(model.eval(), rest[0] if rest else None, tuple(inputs))


def load_compressed(path: str | Path):
    """Replay a resize plan on a fresh copy of its source model, then load the saved weights."""
    path = Path(path)
    try:
        plan = json.loads((path / PLAN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DotResizeError(f"{path / PLAN_FILE} is unreadable ({e}): the directory is not a complete "
                             "dotresize_fx output; compress again") from e
    if plan.get("format") != FORMAT:
        raise DotResizeError(f"{path / PLAN_FILE} has format {plan.get('format')}, this version reads {FORMAT}")
    if plan.get("path") == "program":
        return _load_program_dir(path, plan)
    source = load(plan["source"], plan.get("dtype", "auto"))
    if plan.get("stock"):
        return _load_stock_dir(path, source)
    model = source.model
    tied = {n: group for group in plan["tied"] for n in group}
    made = {}
    for name in plan.get("skip_adapters", []):
        mod = model.get_submodule(name)
        add_skip_adapter(mod, torch.empty(plan["shapes"][f"{name}.{SKIP_ADAPTER}"], dtype=model_dtype(model)))
    for name, shape in plan["shapes"].items():
        module, _, attr = name.rpartition(".")
        key = tied.get(name, [name])[0]
        if key not in made:
            made[key] = torch.nn.Parameter(torch.empty(shape, dtype=model_dtype(model)), requires_grad=False)
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


def _load_stock_dir(path: Path, source: Loaded) -> Loaded:
    """A stock checkpoint is read as Hugging Face reads it: `save_pretrained` may have renamed the weights to the
    checkpoint layout of the family (transformers' conversion maps, e.g. ViT's), which only `from_pretrained`
    undoes. The source gives the class, the example inputs and the tokenizer."""
    try:
        model = type(source.model).from_pretrained(path, dtype=model_dtype(source.model))
    except Exception as e:
        raise DotResizeError(f"{path} is a stock checkpoint that does not load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}); compress again") from e
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return Loaded(model.eval(), _saved_tokenizer(path) or source.tokenizer, source.example_inputs)


def _load_program_dir(path: Path, plan: dict) -> Loaded:
    """A resized program: `torch.export.load`, with the source's example inputs and tokenizer."""
    from .program import load_program
    weights = path / plan["weights"]
    if not weights.is_file():
        raise DotResizeError(f"{weights} is missing: the directory is incomplete; compress again")
    try:
        model = load_program(weights)
    except Exception as e:
        raise DotResizeError(f"{weights} is corrupt or unreadable ({type(e).__name__}: {e}); compress again") from e
    source = load(plan["source"])
    tokenizer = _saved_tokenizer(path) or source.tokenizer
    return Loaded(model, tokenizer, source.example_inputs)


def _saved_tokenizer(path: Path):
    if not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _buffers(model) -> set[str]:
    return {n for n, _ in model.named_buffers()}
