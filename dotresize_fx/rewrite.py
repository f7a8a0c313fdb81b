"""Apply WidthMaps to a model: parameters by FQN, module attributes, the HF config (DESIGN §3, §5, §6).

Row-vector convention: a consumer computes x·W with W ∈ R^{n×out}; a group of width n becomes m.
  producers    W_p ← W_p·M         (biases b ← b·M)
  consumers    W_c ← U·W_c
  passthrough  g ← g·M              (exact for selections and permutations: M's columns sum to 1)
The residual stream is read through norms, so it takes an orthonormal map: M = Q·R (QR), producers write x·Q,
each norm's gain is folded into the consumers that read it, the norm keeps the constant gain sqrt(n/m), and
consumers become R·U·diag(g)·W_c.
"""
from __future__ import annotations

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


@dataclass
class WidthMap:
    """The linear algebra a pass chose for one group (float64).

    `merge` M ∈ R^{n×m} and `unmerge` U ∈ R^{m×n}, in the group's units (neurons; q heads for a heads group).
    `keep`: the target units whose own identity survives (a merged head keeps its target's Q/K).
    `kv_merge`/`kv_unmerge`: a heads group's map on kv heads (GQA); identity when only q heads within groups change.
    `unmerge_channels`: an optional channel-level U (m·unit × n·unit) that overrides kron(U, I_unit), e.g. `ls`.
    """
    group: str
    merge: torch.Tensor
    unmerge: torch.Tensor
    keep: torch.Tensor | None = None
    kv_merge: torch.Tensor | None = None
    kv_unmerge: torch.Tensor | None = None
    kv_keep: torch.Tensor | None = None
    unmerge_channels: torch.Tensor | None = None

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
    return model, report


def finalize(model, analysis: Analysis, maps: dict[str, WidthMap]) -> RewriteReport:
    """Module attributes and HF config for all `maps` applied so far."""
    report = RewriteReport(widths={n: w.m for n, w in maps.items()})
    _finalize(model, analysis, maps, report)
    return report


def _finalize(model, analysis, maps, report) -> None:
    _update_module_attrs(model, analysis, maps)
    _update_config(model, analysis, maps, report)


def _check_map(group: WidthGroup, w: WidthMap) -> None:
    n = group.size
    if w.merge.shape[0] != n or w.unmerge.shape != (w.m, n):
        raise DotResizeError(f"width map for {group.name}: merge {tuple(w.merge.shape)} / unmerge "
                             f"{tuple(w.unmerge.shape)} do not fit the group's width {n}")
    if w.m < 1:
        raise DotResizeError(f"width map for {group.name} keeps no channel: lower the reduction")
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


def _expand(A: torch.Tensor, unit: int) -> torch.Tensor:
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
            A = _expand(selection_matrix(M.shape[0], keep), unit)  # merged heads keep their target's pattern
        elif m.role in ("producer", "passthrough"):
            A = _expand(M, unit)
        elif m.role == "consumer":
            A = w.unmerge_channels.T if (w.unmerge_channels is not None and not on_kv) else _expand(U, unit).T
        else:
            continue
        sites[_owner(model, m)].append((m.dim, m.offset, m.length or A.shape[0], A))


def _residual_ops(model, group: WidthGroup, w: WidthMap, sites, overwrite, report) -> None:
    if _centers(model, group):
        if not _is_selection(w.merge):
            raise DotResizeError(f"{group.name}: merging a LayerNorm residual stream is not supported yet "
                                 "(only permutations/selections are); use --residual 0 or an RMSNorm model")
        _linear_ops(model, group, w, sites)
        return
    Q, R = torch.linalg.qr(w.merge)
    C = R @ w.unmerge                                # consumers read z = x·Q and rebuild x ≈ z·R·U
    n, m = w.n, w.m
    gain = math.sqrt(n / m)
    gains = {name: _effective_gain(model, name) for name in group.norms}
    for mem in group.members:
        site = _owner(model, mem)
        if mem.role == "producer":
            sites[site].append((mem.dim, mem.offset, mem.length or n, Q))
        elif mem.role == "consumer":
            g = gains[mem.reads][0] if mem.reads else torch.ones(n, dtype=torch.float64)
            sites[site].append((mem.dim, mem.offset, mem.length or n, torch.diag(g) @ C.T))
        elif mem.role == "passthrough" and mem.module in gains:
            _, offset = gains[mem.module]
            overwrite[site] = torch.full((m,), gain - offset, dtype=torch.float64)
    report.notes.append(f"{group.name}: norm gains folded into consumers; norms keep gain sqrt({n}/{m})")


def _centers(model, group: WidthGroup) -> bool:
    """Whether the group's norms subtract the mean (LayerNorm, or any norm with a bias): not rotation-invariant."""
    return any(isinstance(model.get_submodule(n), torch.nn.LayerNorm)
               or getattr(model.get_submodule(n), "bias", None) is not None for n in group.norms)


def _is_selection(M: torch.Tensor) -> bool:
    return bool(((M == 0) | (M == 1)).all() and (M.sum(0) == 1).all() and (M.sum(1) <= 1).all())


def _effective_gain(model, name: str) -> tuple[torch.Tensor, float]:
    """(g, offset): the norm multiplies its normalised input by g = weight + offset (Gemma: offset 1).

    Probed, not assumed: a large constant input has RMS equal to itself, so the output is the gain.
    """
    norm = model.get_submodule(name)
    weight = norm.weight
    n = weight.shape[0]
    probe = torch.full((1, n), 1e3, dtype=weight.dtype)
    with torch.no_grad():
        g = norm(probe)[0].to(torch.float64)
        saved = weight.detach().clone()
        weight.zero_()
        offset = norm(probe)[0].to(torch.float64).mean().item()
        weight.copy_(saved)
    return g, offset


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


def _update_module_attrs(model, analysis: Analysis, maps: dict[str, WidthMap]) -> None:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, torch.nn.modules.conv._ConvNd):
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            mod.num_features = mod.weight.shape[0]
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
    report.stock = all(len(v) <= 1 for v in by_kind.values())
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
    """identity maps on every resizable group, a random permutation of each, a random rotation of the residual."""
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
        if grp.kind == "residual":
            if _centers(model, grp):
                checks.append((f"rotation {grp.name}", None))
            else:
                Q, _ = torch.linalg.qr(torch.randn(grp.size, grp.size, generator=g, dtype=torch.float64))
                checks.append((f"rotation {grp.name}", {grp.name: WidthMap(grp.name, Q, Q.T.contiguous())}))
    results = []
    for name, maps in checks:
        if maps is None:
            results.append({"name": name, "max_abs_diff": None, "ok": True,
                            "skipped": "LayerNorm residual: rotation needs LayerNorm→RMSNorm conversion"})
            continue
        new, _ = apply(ref_model, analysis, maps)
        with torch.no_grad():
            out = model_outputs(new, inputs).double()
        diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        results.append({"name": name, "max_abs_diff": diff, "ok": diff <= VERIFY_TOL,
                        "groups": len(maps)})
    return results


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
