"""Apply WidthMaps to a model: parameters by FQN, module attributes, the HF config (DESIGN §3, §5, §6).

Row-vector convention: a consumer computes x·W with W ∈ R^{n×out}; a group of width n becomes m.
  producers    W_p ← W_p·M         (biases b ← b·M)
  consumers    W_c ← U·W_c
  passthrough  g ← g·M              (exact for selections and permutations: M's columns sum to 1)
The residual stream is read through norms, so it takes an orthonormal map: M = Q·R (QR), producers write x·Q,
each norm's gain is folded into the consumers that read it, the norm keeps the constant gain sqrt(n/m), and
consumers become R·U·diag(g)·W_c. A LayerNorm stream is first made zero-mean (every producer centred) and
mapped by a Q that keeps it zero-mean, so the stock LayerNorm modules act as RMSNorm (`_centred_basis`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .analyze import Analysis, Member, WidthGroup
from .errors import DotResizeError

log = logging.getLogger(__name__)

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
MODULE_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads")


@dataclass
class WidthMap:
    """The linear algebra a pass chose for one group (float64).

    `merge` M ∈ R^{n×m} and `unmerge` U ∈ R^{m×n}, in the group's units (neurons; q heads for a heads group).
    `keep`: the target units whose own identity survives (a merged head keeps its target's Q/K).
    `kv_merge`/`kv_unmerge`: a heads group's map on kv heads (GQA); identity when only q heads within groups change.
    `unmerge_channels`: an optional channel-level U (m·unit × n·unit) that overrides kron(U, I_unit), e.g. `ls`.
    `stages`: a residual map per block (the stream entering block l, then the stream after the last block); the
    rewrite puts an adapter Q_lᵀQ_{l+1} on each block's output, so blocks need not share a basis.
    """
    group: str
    merge: torch.Tensor
    unmerge: torch.Tensor
    keep: torch.Tensor | None = None
    kv_merge: torch.Tensor | None = None
    kv_unmerge: torch.Tensor | None = None
    kv_keep: torch.Tensor | None = None
    unmerge_channels: torch.Tensor | None = None
    stages: list["WidthMap"] | None = None   # residual per_layer: one map per block of `stage_prefix`, + final
    stage_prefix: str = ""

    @property
    def n(self) -> int:
        return self.merge.shape[0]

    @property
    def m(self) -> int:
        return self.merge.shape[1]

    @staticmethod
    def identity(group: str, n: int, kv: int | None = None) -> "WidthMap":
        return WidthMap.selection(group, n, torch.arange(n), kv, torch.arange(kv) if kv else None)

    @staticmethod
    def selection(group: str, n: int, keep: torch.Tensor, kv: int | None = None,
                  kv_keep: torch.Tensor | None = None) -> "WidthMap":
        """Pruning: M = column selection, U = Mᵀ (and the same on kv heads)."""
        S = selection_matrix(n, keep)
        w = WidthMap(group, S, S.T.contiguous(), keep=keep)
        if kv:
            K = selection_matrix(kv, kv_keep)
            w.kv_merge, w.kv_unmerge, w.kv_keep = K, K.T.contiguous(), kv_keep
        return w


@contextlib.contextmanager
def restored(module: torch.nn.Module):
    """Undo, on exit, whatever a trial `apply` did inside `module`: parameters and module attributes."""
    saved = [(m, {k: dict(v) if k == "_parameters" else v for k, v in vars(m).items()}) for m in module.modules()]
    try:
        yield module
    finally:
        for m, attrs in saved:
            vars(m).update(attrs)


def selection_matrix(n: int, keep: torch.Tensor) -> torch.Tensor:
    S = torch.zeros(n, len(keep), dtype=torch.float64)
    S[keep, torch.arange(len(keep))] = 1.0
    return S


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
    only the report). `finalize=False` leaves module attributes and config for a later `finalize()` call,
    when a pass resizes groups in several steps."""
    model = model if inplace else copy.deepcopy(model)
    report = RewriteReport()
    sites: dict[tuple[str, str], list] = defaultdict(list)  # (module, attr) → [(dim, offset, length, A)]
    overwrite: dict[tuple[str, str], torch.Tensor] = {}
    for name, wmap in maps.items():
        group = analysis.group(name)
        if not group.resizable:
            raise DotResizeError(f"group {name} is not resizable: {group.reason}")
        _check_map(group, wmap)
        if group.kind == "residual" and group.norms:
            _residual_ops(model, group, wmap, sites, overwrite, report)
        else:
            _linear_ops(model, group, wmap, sites)
        report.widths[name] = wmap.m
    params = {site: _transform(_site_tensor(model, *site), ops) for site, ops in sites.items()}
    params.update(overwrite)  # residual norms: a constant gain replaces whatever the maps did
    ids_before = _param_ids(model)
    for (module, attr), tensor in params.items():
        mod = model.get_submodule(module)
        dtype = getattr(mod, attr).dtype
        setattr(mod, attr, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))
    report.untied = _untied(model, ids_before)
    if finalize:
        _finalize(model, analysis, maps, report)
    else:
        _update_module_attrs(model, analysis, maps)  # the model runs between steps (layerwise calibration)
    return model, report


def finalize(model, analysis: Analysis, maps: dict[str, WidthMap]) -> RewriteReport:
    """Module attributes and HF config for all `maps` applied so far."""
    report = RewriteReport(widths={n: w.m for n, w in maps.items()})
    _finalize(model, analysis, maps, report)
    return report


def _finalize(model, analysis, maps, report) -> None:
    _update_module_attrs(model, analysis, maps)
    _update_config(model, analysis, maps, report)
    _share_config(model)


def _check_map(group: WidthGroup, w: WidthMap) -> None:
    n = group.size
    if w.merge.shape[0] != n or w.unmerge.shape != (w.m, n):
        raise DotResizeError(f"width map for {group.name}: merge {tuple(w.merge.shape)} / unmerge "
                             f"{tuple(w.unmerge.shape)} do not fit the group's width {n}")
    if w.m < 1:
        raise DotResizeError(f"width map for {group.name} keeps no channel: lower the reduction")
    for st in w.stages or []:
        if group.kind != "residual" or st.merge.shape != (n, w.m) or st.unmerge.shape != (w.m, n):
            raise DotResizeError(f"per-layer maps for {group.name}: every stage must map the residual {n} → {w.m}")
    if group.kind == "heads" and group.kv_heads != group.size and w.kv_merge is None:
        raise DotResizeError(f"width map for {group.name} (GQA, {group.kv_heads} kv heads) needs kv_merge")


def _owner(model: torch.nn.Module, m: Member) -> tuple[str, str]:
    """The (module, attribute) the member's op reads: for a tied weight, the alias owned by that module."""
    module, _, attr = m.param.rpartition(".")
    if m.module and m.module != module:
        try:
            mod = model.get_submodule(m.module)
            if isinstance(getattr(mod, attr, None), torch.nn.Parameter):
                return m.module, attr
        except AttributeError:
            pass
    return module, attr


def _site_tensor(model, module: str, attr: str) -> torch.Tensor:
    return getattr(model.get_submodule(module), attr).detach().to(torch.float64)


def expand_units(A: torch.Tensor, unit: int) -> torch.Tensor:
    return A if unit == 1 else torch.kron(A.contiguous(), torch.eye(unit, dtype=A.dtype))


def _linear_ops(model, group: WidthGroup, w: WidthMap, sites) -> None:
    unit = group.unit
    kv = group.kv_heads or group.size
    for m in group.members:
        units = (m.length or group.size * unit) // unit
        on_kv = group.kind == "heads" and units == kv and kv != group.size
        M = w.kv_merge if on_kv else w.merge
        U = w.kv_unmerge if on_kv else w.unmerge
        keep = w.kv_keep if on_kv else w.keep
        if m.role == "producer" and m.attn == "qk" and keep is not None:
            A = expand_units(selection_matrix(M.shape[0], keep), unit)  # merged heads keep their target's pattern
        elif m.role in ("producer", "passthrough"):
            A = expand_units(M, unit)
        elif m.role == "consumer":
            A = w.unmerge_channels.T if (w.unmerge_channels is not None and not on_kv) else expand_units(U, unit).T
        else:
            continue
        sites[_owner(model, m)].append((m.dim, m.offset, m.length or A.shape[0], A))


def _residual_ops(model, group: WidthGroup, w: WidthMap, sites, overwrite, report) -> None:
    centre = _centers(model, group)
    if centre and _is_selection(w.merge) and not w.stages:
        _linear_ops(model, group, w, sites)  # keeping channels: LayerNorm simply normalises over the kept ones
        return
    if group.channelwise:
        raise DotResizeError(f"{group.name}: {group.channelwise[0]} acts on each channel of the stream alone, so "
                             "only keeping channels (prune) preserves it; do not merge or rotate this width")
    n, m = w.n, w.m
    if centre:
        _check_centrable(group, m)
    stages = w.stages or [w]
    # the stream carries z = x·Q; consumers rebuild x ≈ z·C (C = R·U for a QR basis)
    bases = [_centred_basis(s.merge) if centre else torch.linalg.qr(s.merge)[0] for s in stages]
    readers = [Q.T @ s.merge @ s.unmerge for Q, s in zip(bases, stages)]
    producer = torch.eye(n, dtype=torch.float64) - (1.0 / n if centre else 0.0)  # centring folded into writers
    gain = math.sqrt(n / m)
    norms = {name: _norm_affine(model, name) for name in group.norms}
    for mem in group.members:
        site = _owner(model, mem)
        i = stage_of(mem.module or mem.param, w.stage_prefix, len(stages) - 1, mem.role == "producer") \
            if w.stages else 0
        Q, C = bases[i], readers[i]
        if mem.role == "producer":
            sites[site].append((mem.dim, mem.offset, mem.length or n, producer @ Q * _embed_scale(model, site, m)))
        elif mem.role == "consumer":
            g = norms[mem.reads][0] if mem.reads else torch.ones(n, dtype=torch.float64)
            sites[site].append((mem.dim, mem.offset, mem.length or n, torch.diag(g) @ C.T))
        elif mem.role == "passthrough" and mem.module in norms:
            g, offset, b = norms[mem.module]
            if site[1] == "bias":
                overwrite[site] = (b / g) @ Q  # LayerNorm(x) = (x̂ + b/g)·g: the bias travels with x̂
            else:
                overwrite[site] = torch.full((m,), gain - offset, dtype=torch.float64)
    for l in range(len(stages) - 1):
        add_skip_adapter(model.get_submodule(f"{w.stage_prefix}.{l}"), bases[l].T @ bases[l + 1])
    report.notes.append(f"{group.name}: norm gains folded into consumers; norms keep gain sqrt({n}/{m})"
                        + ("; producers centred so LayerNorm acts as RMSNorm" if centre else "")
                        + (f"; {len(stages) - 1} skip adapters between per-layer bases" if w.stages else ""))


def stage_of(path: str, prefix: str, last: int, producer: bool = False) -> int:
    """Which per-layer basis a module works in: its block's in ModuleList `prefix`, or outside the blocks the
    first (the embedding, a producer) or the `last` (final norm and head, readers)."""
    rest = path.removeprefix(prefix + ".")
    head = rest.split(".", 1)[0]
    if rest != path and head.isdigit():
        return int(head)
    return 0 if producer else last


SKIP_ADAPTER = "skip_adapter"


def add_skip_adapter(block: torch.nn.Module, A: torch.Tensor) -> None:
    """Multiply the block's output (its residual stream) by A (m × m): the change of basis to the next block.

    A parameter plus a forward hook: the module tree and every parameter name stay as they were, torch.export
    and the ONNX exporter trace the hook, and `save` records which blocks carry one.
    """
    if hasattr(block, SKIP_ADAPTER):
        raise DotResizeError("the residual stream already has per-layer maps: resize it in one pass")
    dtype = next(block.parameters()).dtype
    block.register_parameter(SKIP_ADAPTER, torch.nn.Parameter(A.to(dtype), requires_grad=False))
    block.register_forward_hook(_apply_skip_adapter)


def _apply_skip_adapter(block, _args, out):
    A = getattr(block, SKIP_ADAPTER)
    if isinstance(out, tuple):
        return (out[0] @ A, *out[1:])
    return out @ A


def _embed_scale(model, site: tuple[str, str], m: int) -> float:
    """Gemma-style embeddings multiply by sqrt(hidden_size), which a stock config recomputes from the new
    width: set the scale to sqrt(m) and fold the ratio into the weights (returned), so nothing changes."""
    mod = model.get_submodule(site[0])
    scale = getattr(mod, "embed_scale", None)
    n = mod.weight.shape[-1]
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or abs(scale.item() - math.sqrt(n)) > 1e-4:
        return 1.0
    with torch.no_grad():
        scale.fill_(math.sqrt(m))
    if isinstance(getattr(mod, "scalar_embed_scale", None), float):
        mod.scalar_embed_scale = math.sqrt(m)
    return math.sqrt(n / m)


def _centers(model, group: WidthGroup) -> bool:
    """Whether the group's norms subtract the mean (LayerNorm): not rotation-invariant as they stand."""
    return any(isinstance(model.get_submodule(n), torch.nn.LayerNorm) for n in group.norms)


def _check_centrable(group: WidthGroup, m: int) -> None:
    raw = sorted({mem.module for mem in group.members if mem.role == "consumer" and not mem.reads})
    if raw:
        raise DotResizeError(f"{group.name}: {', '.join(raw)} read the residual stream without a LayerNorm, so "
                             "centring the stream would change their input; only keep/prune its channels")
    if m < 2:
        raise DotResizeError(f"{group.name}: a LayerNorm stream needs at least 2 channels; lower the reduction")


def _centred_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal Q (n×m) with Q·1_m ∥ 1_n, spanning the top m−1 zero-mean directions of M and 1_n.

    A zero-mean stream x then maps to a zero-mean z = x·Q, on which LayerNorm equals RMSNorm; the one
    direction spent on 1_n carries nothing (x ⊥ 1_n), the price of keeping stock LayerNorm modules.
    """
    n, m = M.shape
    u = torch.full((n, 1), n ** -0.5, dtype=torch.float64)
    S, _, _ = torch.linalg.svd(M - u @ (u.T @ M), full_matrices=False)
    Q1 = torch.cat([S[:, :m - 1], u], dim=1)
    v = torch.full((m, 1), m ** -0.5, dtype=torch.float64)
    v[-1] -= 1.0
    H = torch.eye(m, dtype=torch.float64) - 2.0 * (v @ v.T) / (v.T @ v)  # swaps e_m and 1_m/√m
    return Q1 @ H


def _is_selection(M: torch.Tensor) -> bool:
    return bool(((M == 0) | (M == 1)).all() and (M.sum(0) == 1).all() and (M.sum(1) <= 1).all())


def _norm_affine(model, name: str) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(g, offset, b): the norm computes x̂·g + b with g = weight + offset (Gemma: offset 1).

    RMSNorm-style gains are probed, not assumed: a large constant input has RMS equal to itself, so the
    output is the gain. LayerNorm maps a constant to its bias, so its affine parameters are read directly.
    """
    norm = model.get_submodule(name)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise DotResizeError(f"norm {name} has no weight to carry the sqrt(n/m) gain; keep the residual width")
    n = weight.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64)
    if isinstance(norm, torch.nn.LayerNorm):
        g = weight.detach().to(torch.float64)
        b = norm.bias.detach().to(torch.float64) if norm.bias is not None else zeros
        if norm.bias is not None and bool((g.abs() < 1e-12).any()):
            raise DotResizeError(f"LayerNorm {name} has a zero gain with a bias; its bias cannot be folded")
        return g, 0.0, b
    if getattr(norm, "bias", None) is not None:
        raise DotResizeError(f"norm {name} ({type(norm).__name__}) has a bias but does not centre: not supported")
    probe = torch.full((1, n), 1e3, dtype=weight.dtype)
    with torch.no_grad():
        g = norm(probe)[0].to(torch.float64)
        saved = weight.detach().clone()
        weight.zero_()
        offset = norm(probe)[0].to(torch.float64).mean().item()
        weight.copy_(saved)
    return g, offset, zeros


def _transform(P: torch.Tensor, ops) -> torch.Tensor:
    """Apply [(dim, offset, length, A)] to P: the slice [offset:offset+length] of `dim` becomes slice·A."""
    by_dim = defaultdict(list)
    for dim, off, length, A in ops:
        by_dim[dim].append((off, length, A))
    for dim, segs in by_dim.items():
        segs = sorted(segs, key=lambda s: s[0])
        pieces, pos = [], 0
        for off, length, A in segs:
            if off < pos:
                raise DotResizeError(f"overlapping segments on one parameter dim ({off} < {pos})")
            if off > pos:
                pieces.append(P.narrow(dim, pos, off - pos))
            chunk = P.narrow(dim, off, length).movedim(dim, -1) @ A.to(P.dtype)
            pieces.append(chunk.movedim(-1, dim))
            pos = off + length
        if pos < P.shape[dim]:
            pieces.append(P.narrow(dim, pos, P.shape[dim] - pos))
        P = torch.cat(pieces, dim=dim)
    return P.contiguous()


def _param_ids(model) -> dict[str, int]:
    return {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}


def _untied(model, before: dict[str, int]) -> list[str]:
    after = _param_ids(model)
    groups = defaultdict(list)
    for name, i in before.items():
        groups[i].append(name)
    untied = []
    for names in groups.values():
        if len(names) > 1 and len({after[n] for n in names}) > 1:
            untied.append(" / ".join(names))
    if untied:
        config = getattr(model, "config", None)
        if config is not None:
            # a later tie_weights() (e.g. lm-eval) would silently re-tie them
            config.tie_word_embeddings = False
            text = getattr(config, "get_text_config", lambda: None)()
            if text is not None:
                text.tie_word_embeddings = False
    return untied


def sync_shapes(model) -> None:
    """Module attributes that restate a parameter's shape (in_features, normalized_shape, …)."""
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear: forward reads self.nf
    except ImportError:
        Conv1D = ()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, Conv1D):
            mod.nx, mod.nf = mod.weight.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, torch.nn.modules.conv._ConvNd):
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            mod.num_features = mod.weight.shape[0]


def _update_module_attrs(model, analysis: Analysis, maps: dict[str, WidthMap]) -> None:
    sync_shapes(model)
    for name, w in maps.items():
        group = analysis.group(name)
        if group.kind != "heads":
            continue
        kv_after = w.kv_merge.shape[1] if w.kv_merge is not None else w.m
        owners = {m.module.rpartition(".")[0] or m.module for m in group.members}
        for owner in owners:
            mod = model.get_submodule(owner) if owner else model
            for attr in HEAD_COUNT_ATTRS:
                if getattr(mod, attr, None) == group.size:
                    setattr(mod, attr, w.m)
            for attr in KV_COUNT_ATTRS:
                if getattr(mod, attr, None) == group.kv_heads:
                    setattr(mod, attr, kv_after)
            if hasattr(mod, "num_key_value_groups"):
                mod.num_key_value_groups = w.m // kv_after
            if getattr(mod, "split_size", None) == group.size * group.unit:  # GPT-2 splits fused qkv by it
                mod.split_size = w.m * group.unit
            _own_head_counts(mod, w.m, kv_after)


def _own_head_counts(mod, heads: int, kv: int) -> None:
    """Modules that read head counts from the shared config in forward (Phi-3) get a copy with their own."""
    cfg = getattr(mod, "config", None)
    if cfg is None or getattr(cfg, "num_attention_heads", None) is None:
        return
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
                getattr(own, k, None) == getattr(config, k, None) for k in MODULE_CONFIG_KEYS):
            mod.config = config


def _update_config(model, analysis: Analysis, maps: dict[str, WidthMap], report: RewriteReport) -> None:
    config = getattr(model, "config", None)
    by_kind = defaultdict(set)
    for g in analysis.groups:
        w = maps.get(g.name)
        if g.kind == "heads":
            kv = (w.kv_merge.shape[1] if w.kv_merge is not None else w.m) if w else g.kv_heads
            by_kind["heads"].add((w.m if w else g.size, kv, g.unit))
        elif g.kind in ("mlp", "residual"):
            by_kind[g.kind].add(w.m if w else g.size)
    report.stock = all(len(v) <= 1 for v in by_kind.values()) and not any(
        hasattr(mod, SKIP_ADAPTER) for mod in model.modules())
    if config is None:
        report.stock = False
        return
    changes = {}
    if len(by_kind["residual"]) == 1:
        changes["hidden_size"] = next(iter(by_kind["residual"]))
    if len(by_kind["mlp"]) == 1:
        for key in ("intermediate_size", "ffn_dim", "n_inner"):
            if getattr(config, key, None) is not None:
                changes[key] = next(iter(by_kind["mlp"]))
    if len(by_kind["heads"]) == 1:
        q, kv, head_dim = next(iter(by_kind["heads"]))
        changes["num_attention_heads"] = q
        if getattr(config, "num_key_value_heads", None) is not None:
            changes["num_key_value_heads"] = kv
        changes["head_dim"] = head_dim
    for key, value in changes.items():
        if getattr(config, key, None) != value or key == "head_dim":
            setattr(config, key, value)
            report.config[key] = value


# ----------------------------------------------------------------------------------------------------------
# Invariance checks: maps that must not change the function (DESIGN §6). Run in float64 so that a pass is a
# proof of the machinery, not of float32 luck.

VERIFY_TOL = 1e-4


def invariance_checks(model: torch.nn.Module, analysis: Analysis, inputs: tuple, *, seed: int = 0) -> list[dict]:
    """identity maps on every resizable group, a random permutation of each, a random rotation of the residual,
    and a different rotation per block (per-layer maps with skip adapters) where the blocks chain."""
    from .calibrate import block_list
    from .load import model_outputs
    g = torch.Generator().manual_seed(seed)
    ref_model = copy.deepcopy(model).double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        ref = model_outputs(ref_model, inputs).double()
    groups = [grp for grp in analysis.groups if grp.resizable]
    checks = [("identity", {grp.name: _identity(grp) for grp in groups}),
              ("permutation", {grp.name: _permutation(grp, g) for grp in groups})]
    for grp in groups:
        if grp.kind == "residual" and not grp.channelwise:
            Q = _rotation(grp.size, g)
            checks.append((f"rotation {grp.name}", {grp.name: WidthMap(grp.name, Q, Q.T.contiguous())}))
            blocks = block_list(ref_model, analysis, [inputs])
            if blocks is not None:  # a different rotation per block: proves the skip adapters
                stages = [WidthMap(grp.name, Q, Q.T.contiguous())
                          for Q in (_rotation(grp.size, g) for _ in range(len(blocks[1]) + 1))]
                w = WidthMap(grp.name, stages[0].merge, stages[0].unmerge, stages=stages, stage_prefix=blocks[0])
                checks.append((f"per-layer rotation {grp.name}", {grp.name: w}))
    results = []
    for name, maps in checks:
        new, _ = apply(ref_model, analysis, maps)
        with torch.no_grad():
            out = model_outputs(new, inputs).double()
        diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        results.append({"name": name, "max_abs_diff": diff, "ok": diff <= VERIFY_TOL,
                        "groups": len(maps)})
    return results


def _rotation(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _identity(grp: WidthGroup) -> WidthMap:
    kv = grp.kv_heads if grp.kind == "heads" and grp.kv_heads != grp.size else None
    return WidthMap.identity(grp.name, grp.size, kv)


def _permutation(grp: WidthGroup, g: torch.Generator) -> WidthMap:
    if grp.kind == "heads" and grp.kv_heads != grp.size:
        kv, rep = grp.kv_heads, grp.size // grp.kv_heads
        kv_perm = torch.randperm(kv, generator=g)
        within = [torch.randperm(rep, generator=g) for _ in range(kv)]
        q_perm = torch.cat([kv_perm[i] * rep + within[i] for i in range(kv)])
        return WidthMap.selection(grp.name, grp.size, q_perm, kv, kv_perm)
    return WidthMap.selection(grp.name, grp.size, torch.randperm(grp.size, generator=g))
