"""From unioned channel spaces to WidthGroups: which parameter dims form a group, and what kind it is.

Kinds (DESIGN §3): `heads` (a space attention splits into heads), `residual` (a stream written by several
producers and read through norms), `mlp` (a width between linear layers only), `channels` (anything else).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .groups import Member, WidthGroup
from .rules import RESHAPE, SAME_SHAPE, aten, packet, val

NORM_REDUCTIONS = {"layer_norm", "rms_norm", "mean"}   # a residual's norms reduce over it by one of these


def build_groups(w) -> list[WidthGroup]:
    """One WidthGroup per space that a parameter dim belongs to, ordered by the first parameter touching it."""
    s = w.s
    head_keys = {s.leaves(h)[0] for h, _ in w.heads}
    by_key: dict[int, list[tuple[Member, list[int]]]] = defaultdict(list)
    params = set(w.c.program.graph_signature.inputs_to_parameters.values())
    for fqn, atoms in w.param_atoms.items():
        for d, a in enumerate(atoms):
            roles = w.uses.get((fqn, d))
            if not roles:
                continue  # e.g. the unused alias of a tied weight
            for offset, length, leaves in _resolve(s, a):
                key = leaves[0]
                if not s.static(key) or (fqn not in params and key not in by_key):
                    continue  # buffers only join groups that parameters define (BN stats, not RoPE tables)
                for role, op, module, node, via in _unique_roles(roles):
                    by_key[key].append((Member(fqn, d, role, offset, length, f"aten.{op}", module, node, via),
                                        leaves))
    order = {fqn: i for i, fqn in enumerate(w.param_atoms)}
    ordered = sorted(by_key.items(), key=lambda kv: min(order[m.param] for m, _ in kv[1]))
    out, counters = [], defaultdict(int)
    for key, entries in ordered:
        if not any(m.param in params for m, _ in entries):
            continue
        g = _group(w, key, entries, key in head_keys)
        g.name = f"{g.kind}.{counters[g.kind]}"
        counters[g.kind] += 1
        out.append(g)
    return out


def _resolve(s, a: int, offset: int = 0) -> list[tuple[int, int, list[int]]]:
    r = s.find(a)
    if r in s.segments and r not in s.factors:
        out = []
        for off, ln, child in sorted(s.segments[r]):
            out.extend(_resolve(s, child, offset + off))
        return out
    return [(offset, s.size[r] or 0, s.leaves(r))]


def _unique_roles(roles):
    seen, out = set(), []
    for r in roles:
        if (r[0], r[2]) not in seen:
            seen.add((r[0], r[2]))
            out.append(r)
    return out


def _group(w, key: int, entries: list[tuple[Member, list[int]]], is_heads: bool) -> WidthGroup:
    s = w.s
    members = [m for m, _ in entries]
    reasons = list(s.pins.get(key, []))
    g = WidthGroup(name="", kind="channels", size=s.size[key], members=members)
    norm_members = {m.module for m in members if m.role == "passthrough"}
    reducing = [(mod, op) for a, op, mod in w.reductions if s.find(a) == key]
    g.norms = sorted({mod for mod, _ in reducing if mod in norm_members})
    g.centred = any(n in w.centring for n in g.norms)
    for mod, op in reducing:
        if mod not in norm_members:
            reasons.append(f"reduced over by aten.{op} outside a norm (module {mod or '<root>'})")
    if is_heads:
        _heads(w, g, key, entries)
    elif g.norms and len(g.producers()) >= 2 and any(op in NORM_REDUCTIONS for _, op in reducing):
        reasons += _residual(w, g, key)
    elif {m.via for m in members if m.role in ("producer", "consumer")} == {"linear"} and not reasons:
        g.kind = "mlp"
    for atom, c in w.constants:
        leaves = s.leaves(atom)
        if leaves and leaves[0] == key:
            c.factor = c.value // g.size if g.size else 1
            g.constants.append(c)
    if not g.producers() and not g.consumers():
        reasons.append("no producer or consumer parameter")
    g.resizable = not reasons
    g.reason = "; ".join(dict.fromkeys(reasons))
    return g


def _heads(w, g: WidthGroup, key: int, entries) -> None:
    s = w.s
    g.kind = "heads"
    qk_dims = {s.find(d) for h, d in w.heads if s.leaves(h)[0] == key}
    for m, leaves in entries:
        m.attn = "qk" if s.find(leaves[-1]) in qk_dims else "vo"
    longest = max((leaves for _, leaves in entries), key=len)
    g.kv_heads = g.size
    g.size = g.size * (s.size[longest[1]] if len(longest) > 2 else 1)
    g.unit = s.size[longest[-1]] if len(longest) > 1 else 1


def _residual(w, g: WidthGroup, key: int) -> list[str]:
    g.kind = "residual"
    g.norm_position = "post" if _post_norm(w, key) else "pre"
    g.channelwise = sorted({f"aten.{op} in {mod or '<root>'}" for a, op, mod in w.channelwise
                            if w.s.find(a) == key and mod not in g.norms})
    _mark_norm_readers(w, g)
    if g.norm_position == "post":
        return ["post-LN: the stream itself is normalised after every residual add, so no orthogonal map keeps "
                "the norms invariant (MLP and heads groups stay resizable)"]
    return []


def _mark_norm_readers(w, g: WidthGroup) -> None:
    nodes = {n.name: n for n in w.c.graph.nodes}
    for m in g.consumers():
        x = nodes[m.node].args[1] if m.op == "aten.addmm" else nodes[m.node].args[0]
        while isinstance(x, torch.fx.Node):
            mod = w.c.node_module.get(x.name, "")
            if mod in g.norms:
                m.reads = mod
                break
            if packet(x.target) not in SAME_SHAPE | RESHAPE | {aten.slice}:  # slice: logits_to_keep
                break
            x = x.args[0]


def _post_norm(w, key: int) -> bool:
    """A norm whose output (through casts/dropout) feeds a residual add normalises the stream itself."""
    for node in _norm_output_nodes(w, key):
        frontier = [node]
        while frontier:
            x = frontier.pop()
            for user in x.users:
                op = packet(user.target)
                if op in SAME_SHAPE:
                    frontier.append(user)
                elif op in (aten.add, aten.add_):
                    return True
    return False


def _norm_output_nodes(w, key: int) -> list[torch.fx.Node]:
    found = [n for a, n, _ in w.norm_outputs if w.s.find(a) == key]
    # norms written as ops (RMSNorm: pow/mean/rsqrt/mul): the output is the last node of the norm module
    norm_modules = {m for a, _, m in w.reductions if w.s.find(a) == key}
    last: dict[str, torch.fx.Node] = {}
    for node in w.c.graph.nodes:
        mod = w.c.node_module.get(node.name)
        if mod in norm_modules and isinstance(val(node), torch.Tensor):
            last[mod] = node
    return found + list(last.values())
