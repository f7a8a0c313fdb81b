"""Apply WidthMaps to a model: parameters by FQN, module attributes, the HF config (DESIGN §3, §5, §6).

The maps land on parameter slices (`sites`); the residual stream takes its orthonormal algebra (`residual`);
then the Python-side state that restates widths (module attributes, head counts, config keys: `families`) is
brought in step.
"""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from . import families
from .errors import DotResizeError
from .groups import Analysis, WidthGroup
from .maps import Applied, WidthMap
from .program import patch_constants
from .residual import SKIP_ADAPTER, residual_ops
from .sites import Index, IndexFill, linear_ops, site_tensor, transform

log = logging.getLogger(__name__)


@dataclass
class RewriteReport:
    widths: dict[str, int] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    config: dict[str, int] = field(default_factory=dict)
    stock: bool = True
    notes: list[str] = field(default_factory=list)


def apply(model: torch.nn.Module, analysis: Analysis, maps: dict[str, WidthMap], *,
          inplace: bool = False, finalize: bool = True):
    """Return a resized copy of `model` and a report (the input is never modified unless `inplace`, then
    only the report). `finalize=False` leaves the config for a later `finalize()` call, when a pass resizes
    groups in several steps (module attributes are kept in step so that the model runs in between)."""
    model = model if inplace else copy.deepcopy(model)
    report = RewriteReport()
    sites: dict[tuple[str, str], list] = defaultdict(list)
    overwrite: dict[tuple[str, str], torch.Tensor] = {}
    for name, wmap in maps.items():
        group = analysis.group(name)
        if not group.resizable:
            raise DotResizeError(f"group {name} is not resizable: {group.reason}")
        _check_map(group, wmap)
        if group.kind == "residual" and group.norms:
            residual_ops(model, group, wmap, sites, overwrite, report.notes)
        else:
            linear_ops(model, group, wmap, sites)
        report.widths[name] = wmap.m
    params = {site: transform(_working(model, site, ops), ops) for site, ops in sites.items()}
    params.update(overwrite)  # residual norms: a constant gain replaces whatever the maps did
    ids_before = _param_ids(model)
    for (module, attr), tensor in params.items():
        mod = model.get_submodule(module)
        dtype = getattr(mod, attr).dtype
        setattr(mod, attr, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))
    report.untied = _untied(model, ids_before)
    report.notes += [f"graph literal {p}" for p in patch_constants(model, analysis, maps)]
    _update_module_attrs(model, analysis, maps)
    if finalize:
        _finalize_config(model, analysis, maps, report)
    return model, report


def _working(model, site: tuple[str, str], ops) -> torch.Tensor:
    """The parameter as the ops need it: as stored when they only select, or select and fill (pruning with
    least squares), else in its working dtype. A selection is exact in any dtype; a fill W[:, kept] +
    W[:, removed]·Rᵀ in bfloat16 accumulates in float32 inside the kernel and is rounded to bfloat16 as the
    stored result is anyway (with AMX 38 against 115 ms for an 836M down projection, at 1.11× bfloat16's
    storage error: `benchmarks/bf16_fill.py`), and a weight is not widened for nothing."""
    if all(isinstance(op[-1], (Index, IndexFill)) for op in ops):
        return getattr(model.get_submodule(site[0]), site[1]).detach()
    return site_tensor(model, *site, dtype=None)


def finalize(model, analysis: Analysis, maps: dict[str, WidthMap | Applied]) -> RewriteReport:
    """Module attributes and HF config for all `maps` applied so far."""
    report = RewriteReport(widths={n: w.m for n, w in maps.items()})
    _update_module_attrs(model, analysis, maps)
    _finalize_config(model, analysis, maps, report)
    return report


def _finalize_config(model, analysis, maps, report) -> None:
    _update_config(model, analysis, maps, report)
    _share_config(model)


def _check_map(group: WidthGroup, w: WidthMap) -> None:
    n = group.size
    if w.n != n or (not w.is_selection and w.unmerge.shape != (w.m, n)):
        raise DotResizeError(f"width map for {group.name}: merge {(w.n, w.m)} / unmerge "
                             f"{tuple(w.unmerge.shape)} do not fit the group's width {n}")
    if w.m < 1:
        raise DotResizeError(f"width map for {group.name} keeps no channel: lower the reduction")
    for st in w.stages or []:
        if group.kind != "residual" or st.merge.shape != (n, w.m) or st.unmerge.shape != (w.m, n):
            raise DotResizeError(f"per-layer maps for {group.name}: every stage must map the residual {n} → {w.m}")
    if group.kind == "heads" and group.kv_heads != group.size and w.kv_merge is None:
        raise DotResizeError(f"width map for {group.name} (GQA, {group.kv_heads} kv heads) needs kv_merge")


def _param_ids(model) -> dict[str, int]:
    return {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}


def _untied(model, before: dict[str, int]) -> list[str]:
    after = _param_ids(model)
    groups = defaultdict(list)
    for name, i in before.items():
        groups[i].append(name)
    untied = [" / ".join(names) for names in groups.values()
              if len(names) > 1 and len({after[n] for n in names}) > 1]
    config = getattr(model, "config", None)
    if untied and config is not None:
        # a later tie_weights() (e.g. lm-eval) would silently re-tie them
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", lambda: None)()
        if text is not None:
            text.tie_word_embeddings = False
    return untied


def _update_module_attrs(model, analysis: Analysis, maps: dict[str, WidthMap | Applied]) -> None:
    families.sync_shapes(model)
    for name, w in maps.items():
        group = analysis.group(name)
        if group.kind != "heads":
            continue
        kv_after = w.kv_after or w.m
        owners = {m.module.rpartition(".")[0] or m.module for m in group.members}
        for owner in owners:
            mod = model.get_submodule(owner) if owner else model
            for attr in families.HEAD_COUNT_ATTRS:
                if getattr(mod, attr, None) == group.size:
                    setattr(mod, attr, w.m)
            for attr in families.KV_COUNT_ATTRS:
                if getattr(mod, attr, None) == group.kv_heads:
                    setattr(mod, attr, kv_after)
            if hasattr(mod, families.KV_GROUP_ATTR):
                setattr(mod, families.KV_GROUP_ATTR, w.m // kv_after)
            if getattr(mod, families.FUSED_SPLIT_ATTR, None) == group.size * group.unit:
                setattr(mod, families.FUSED_SPLIT_ATTR, w.m * group.unit)
            _own_head_counts(mod, w.m, kv_after)


def _own_head_counts(mod, heads: int, kv: int) -> None:
    """Modules that read head counts from the shared config in forward (Phi-3) get a copy with their own."""
    cfg = getattr(mod, "config", None)
    if cfg is None or not isinstance(getattr(cfg, "num_attention_heads", None), int):
        return   # none, or one count per stage (SegFormer, Swin): the modules hold their own
    if (cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", kv)) != (heads, kv):
        mod.config = copy.copy(cfg)
        mod.config.num_attention_heads = heads
        if getattr(cfg, "num_key_value_heads", None) is not None:
            mod.config.num_key_value_heads = kv


def _share_config(model) -> None:
    """Give modules whose own config copy now agrees with the model's the shared config back."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for mod in model.modules():
        own = getattr(mod, "config", None)
        if mod is not model and own is not None and own is not config and type(own) is type(config) and all(
                getattr(own, k, None) == getattr(config, k, None) for k in families.MODULE_CONFIG_KEYS):
            mod.config = config


def _update_config(model, analysis: Analysis, maps: dict[str, WidthMap | Applied], report: RewriteReport) -> None:
    config = getattr(model, "config", None)
    by_kind = defaultdict(set)
    for g in analysis.groups:
        w = maps.get(g.name)
        if g.kind == "heads":
            by_kind["heads"].add((w.m, w.kv_after or w.m, g.unit) if w else (g.size, g.kv_heads, g.unit))
        elif g.kind in families.CONFIG_WIDTH_KEYS:
            by_kind[g.kind].add(w.m if w else g.size)
    report.stock = all(len(v) <= 1 for v in by_kind.values()) and not any(
        hasattr(mod, SKIP_ADAPTER) for mod in model.modules())
    if config is None:
        report.stock = False
        return
    changes = {}
    for kind, keys in families.CONFIG_WIDTH_KEYS.items():
        if len(by_kind[kind]) == 1:
            changes.update({k: next(iter(by_kind[kind])) for k in keys if getattr(config, k, None) is not None})
    if len(by_kind["heads"]) == 1:
        q, kv, head_dim = next(iter(by_kind["heads"]))
        q_key, kv_key, dim_key = families.HEADS_CONFIG_KEYS
        changes[q_key], changes[dim_key] = q, head_dim
        if getattr(config, kv_key, None) is not None:
            changes[kv_key] = kv
    for key, value in changes.items():
        if isinstance(getattr(config, key, None), (list, tuple)):   # one per stage (SegFormer): not expressed
            report.stock = False
            continue
        if getattr(config, key, None) != value or key == "head_dim":
            setattr(config, key, value)
            report.config[key] = value
