"""From unioned channel spaces to WidthGroups: which parameter dims form a group, and what kind it is.

Kinds (DESIGN §3): `heads` (a space attention splits into heads), `residual` (a stream written by several
producers and read through norms), `mlp` (a width between linear layers only), `channels` (anything else).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .groups import Member, WidthGroup
from .rules import RESHAPE, SAME_SHAPE, aten, packet, val

NORM_REDUCTIONS = {"layer_norm", "rms_norm", "mean"}
# ops between a norm and a consumer that keep reading the norm's output: casts, reshapes, layout (a batch-second
# nn.MultiheadAttention transposes its input), and selections of tokens (logits_to_keep, a class token)
LAYOUT = SAME_SHAPE | RESHAPE | {aten.slice, aten.select, aten.transpose, aten.permute}   # a residual's norms reduce over it by one of these


def build_groups(w) -> list[WidthGroup]:
    """One WidthGroup per space that a parameter dim belongs to, ordered by the first parameter touching it.

    A dim exactly one head wide (a head_dim space of attention: shared by every layer when the rotary tables
    are) belongs to the heads group of its own attention module: as a kv-width producer when there is one kv
    head (MQA), or as a `shared` member (a per-head q/k norm: every head reads the same gains, so it pins
    head_dim and stays as it is when whole heads go)."""
    s = w.s
    head_keys = {s.leaves(h)[0] for h, _ in w.heads}
    head_dims = {s.find(d) for d in w.head_dims}
    unbound = {s.find(u) for u in w.unbound}
    by_key: dict[int, list[tuple[Member, list[int]]]] = defaultdict(list)
    head_wide: list[tuple[Member, list[int]]] = []
    params = set(w.c.program.graph_signature.inputs_to_parameters.values())
    for fqn, atoms in w.param_atoms.items():
        for d, a in enumerate(atoms):
            roles = w.uses.get((fqn, d))
            if not roles:
                continue  # e.g. the unused alias of a tied weight
            for offset, length, leaves in _resolve(s, a, head_dims, unbound):
                key = leaves[0]
                if not s.static(key) or (fqn not in params and key not in by_key and key not in head_dims):
                    continue  # buffers only join groups that parameters define (BN stats, not RoPE tables)
                for role, op, module, node, via in _unique_roles(roles):
                    member = Member(fqn, d, role, offset, length, f"aten.{op}", module, node, via)
                    member.inside = role == "consumer" and _reads_inside(w, node, module)
                    if key in head_dims and len(leaves) == 1 and fqn in params:
                        member.length, member.role = length or s.size[key], _head_wide_role(role)
                        head_wide.append((member, leaves))
                    elif key not in head_dims:
                        by_key[key].append((member, leaves))
    _attach_head_wide(by_key, head_keys, head_wide)
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


def _reads_inside(w, node: str, module: str) -> bool:
    """Whether the op's data input is computed inside its own module (past views of the module's input): a hook
    on the module's input would then see something else."""
    n = w.node_by_name[node]
    x = n.args[1] if packet(n.target) is aten.addmm else n.args[0]
    while isinstance(x, torch.fx.Node) and w.c.node_module.get(x.name) == module and packet(x.target) in LAYOUT:
        x = x.args[0]
    return isinstance(x, torch.fx.Node) and w.c.node_module.get(x.name) == module


def _attention_module(m: Member) -> str:
    return (m.module or m.param).rpartition(".")[0]


def _attach_head_wide(by_key, head_keys, head_wide) -> None:
    """Each head-wide member joins the heads group whose members sit in the same attention module."""
    owner = {}
    for key in head_keys:
        for m, _ in by_key.get(key, []):
            owner.setdefault(_attention_module(m), key)
    for m, leaves in head_wide:
        key = owner.get(_attention_module(m))
        if key is None:
            by_key[leaves[0]].append((m, leaves))  # no attention to join: a width of its own
        else:
            by_key[key].append((m, leaves))


def _head_wide_role(role: str) -> str:
    return role if role in ("producer", "consumer") else "shared"


def _resolve(s, a: int, stop: set[int], unbound: set[int], offset: int = 0) -> list[tuple[int, int, list[int]]]:
    """(offset, length, leaves) of the spaces a dim is made of: its segments (fused qkv), unless factored or a
    head_dim (whose rotary halves are not separate widths)."""
    r = s.find(a)
    if r in s.segments and r not in s.factors and r not in stop:
        out = []
        for off, ln, child in sorted(s.segments[r]):
            out.extend(_resolve(s, child, stop, unbound, offset + off))
        return out
    leaves = s.leaves(r)
    if len(leaves) > 1 and leaves[0] in unbound:   # (3, heads, head_dim) unbound: q ‖ k ‖ v segments
        part = math.prod(s.size[l] for l in leaves[1:])
        return [(offset + i * part, part, leaves[1:]) for i in range(s.size[leaves[0]])]
    return [(offset, s.size[r] or 0, leaves)]


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
    writers = {m.module for m in g.producers()}   # several (a residual add), not one conv's weight and bias
    if is_heads:
        _heads(w, g, key, entries)
    elif g.norms and len(writers) >= 2 and any(op in NORM_REDUCTIONS for _, op in reducing):
        reasons += _residual(w, g, key)
    elif {m.via for m in members if m.role in ("producer", "consumer")} == {"linear"} and not reasons \
            and g.consumers():
        g.kind = "mlp"
    _constants(w, g, key, entries)
    reasons += _unequal_parts(w, key)
    if not g.producers() and not g.consumers():
        reasons.append("no producer or consumer parameter")
    elif not g.consumers() and g.kind != "heads" and not reasons:
        reasons.append("no parameter reads this width: it is contracted between activations (e.g. q·kᵀ of "
                       "single-head attention), so it has no observation point")
    g.resizable = not reasons
    g.reason = "; ".join(dict.fromkeys(reasons))
    return g


def _constants(w, g: WidthGroup, key: int, entries) -> None:
    """The graph literals that encode this width, with what they count: for GQA a literal whose space lacks
    the q-heads-per-kv factor counts kv heads, and one that is that factor alone counts q heads per kv head."""
    longest = max((leaves for _, leaves in entries), key=len, default=[])
    rep = longest[1] if g.kind == "heads" and g.kv_heads not in (g.size, 1) and len(longest) > 2 else None
    for atom, c in w.constants:
        leaves = w.s.leaves(atom)
        if rep is not None and [w.s.find(l) for l in leaves] == [w.s.find(rep)]:
            c.per = "rep"        # a repeat count alone (repeat_interleave of kv heads): q heads per kv head
        elif leaves and leaves[0] == key:
            c.per = "kv" if rep is not None and w.s.find(rep) not in {w.s.find(l) for l in leaves} else "units"
        else:
            continue
        count = {"kv": g.kv_heads, "rep": g.size // (g.kv_heads or g.size)}.get(c.per, g.size)
        c.factor = c.value // count if count else 1
        c.module = w.module(w.node_by_name[c.node])
        g.constants.append(c)


def _unequal_parts(w, key: int) -> list[str]:
    """A split into equal parts (chunk, split by one size) derives its parts' width from its input's: a group
    that holds some of the parts but not all would leave the parts unequal."""
    reasons = []
    for node, parts in w.equal_splits:
        keys = [w.s.leaves(p)[0] for p in parts]
        if key in keys and any(k != key for k in keys):
            reasons.append(f"{node.target.__name__.split('.')[0]} in {w.module(node) or '<root>'} splits a width "
                           "into equal parts, and the other parts belong to another width")
    return reasons


def _heads(w, g: WidthGroup, key: int, entries) -> None:
    s = w.s
    g.kind = "heads"
    qk_dims = {s.find(d) for h, d in w.heads if s.leaves(h)[0] == key}
    for m, leaves in entries:
        m.attn = "qk" if s.find(leaves[-1]) in qk_dims else "vo"
    longest = max((leaves for _, leaves in entries), key=len)
    one_kv = any(m.role == "producer" and len(leaves) == 1 and leaves[0] != key for m, leaves in entries)
    g.kv_heads = 1 if one_kv else g.size  # k/v one head wide: a single kv head (MQA)
    g.size = g.size * (s.size[longest[1]] if len(longest) > 2 else 1)
    g.unit = s.size[longest[-1]] if len(longest) > 1 else 1


def _residual(w, g: WidthGroup, key: int) -> list[str]:
    g.kind = "residual"
    inline = _inline_norms(w, key, g.norms)
    if inline:
        return [f"normalised by a norm written inline in {inline[0]}'s forward (beside its residual add): the "
                "residual rewrite folds gains through norm modules, so keep this width, or make the norm an "
                "nn.LayerNorm / RMSNorm module (MLP and heads groups stay resizable)"]
    adding = _norms_feeding_adds(w, key)       # norm module → "post" | "branch" | "start"
    post, branch, start = (sorted(m for m, where in adding.items() if where == k) for k in ("post", "branch", "start"))
    g.norm_position = "post" if post else "branch" if branch else "start" if start else "pre"
    g.channelwise = sorted({f"aten.{op} in {mod or '<root>'}" for a, op, mod in w.channelwise
                            if w.s.find(a) == key and mod not in g.norms})
    params = {m.param for m in g.members}
    g.scales = {module: gamma for gamma, module in w.layer_scales if gamma in params}
    _mark_norm_readers(w, g)
    if post:
        return ["post-LN: the stream itself is normalised after every residual add, so no orthogonal map keeps "
                "the norms invariant (MLP and heads groups stay resizable)"]
    if branch:
        return [f"a gain applied to a branch's output before the residual add ({branch[0]}"
                + (f" and {len(branch) - 1} more" if len(branch) > 1 else "") + ") does not commute with a "
                "rotation of the stream (MLP and heads groups stay resizable)"]
    if start:
        return [f"the stream starts at a norm's output ({start[0]}, e.g. a stem's LayerNorm): the stream's first "
                "producer is that norm, whose gain does not commute with a rotation and which no weight before it "
                "can absorb (MLP and heads groups stay resizable)"]
    return []


def _inline_norms(w, key: int, norms: list[str]) -> list[str]:
    """Norm "modules" that also add to the stream: a functional norm in a block's forward (`F.layer_norm`),
    so the module is the block, not a norm whose gains could be folded."""
    found = set()
    for node in w.c.graph.nodes:
        mod = w.c.node_module.get(node.name)
        if mod in norms and packet(node.target) in _ADDS and all(
                any(w.s.find(a) == key for a in w.dims(x)) for x in node.args[:2]):
            found.add(mod)
    return sorted(found)


def _mark_norm_readers(w, g: WidthGroup) -> None:
    for m in g.consumers():
        x = w.node_by_name[m.node].args[1] if m.op == "aten.addmm" else w.node_by_name[m.node].args[0]
        while isinstance(x, torch.fx.Node):
            mod = w.c.node_module.get(x.name, "")
            if mod in g.norms:
                m.reads = mod
                break
            if packet(x.target) not in LAYOUT:
                break
            x = x.args[0]


_ADDS = (aten.add, aten.add_)


def _norms_feeding_adds(w, key: int) -> dict[str, str]:
    """Norms whose output (through casts/dropout) feeds a residual add, and where each one sits: "post" when its
    input is itself the stream (an add: post-LN, as BERT), "branch" when it normalises a branch's output that
    only the add reads (Gemma's and OLMo-2's post-branch norms), "start" when its output is the stream itself,
    read by the branch too (a stem's norm, as ConvNeXt's)."""
    found = {}
    for module, (first, last) in _norm_nodes(w, key).items():
        frontier, adds, others = [last], False, False
        while frontier:
            x = frontier.pop()
            for user in x.users:
                op = packet(user.target)
                if op in SAME_SHAPE:
                    frontier.append(user)
                elif op in _ADDS:
                    adds = True
                else:
                    others = True
        if adds:
            found[module] = "post" if _comes_from_add(first) else "start" if others else "branch"
    return found


def _comes_from_add(x) -> bool:
    while isinstance(x, torch.fx.Node) and packet(x.target) in SAME_SHAPE:
        x = x.args[0]
    return isinstance(x, torch.fx.Node) and packet(x.target) in _ADDS


def _norm_nodes(w, key: int) -> dict[str, tuple]:
    """norm module → (its input, its output node), for the norms that reduce over this width (aten norms, and
    norms written as ops such as RMSNorm's pow/mean/rsqrt/mul)."""
    modules = {m for a, _, m in w.reductions if w.s.find(a) == key}
    first, last = {}, {}
    for node in w.c.graph.nodes:
        mod = w.c.node_module.get(node.name)
        if mod in modules and isinstance(val(node), torch.Tensor):
            last[mod] = node
            if mod not in first:
                outside = [a for a in node.all_input_nodes if w.c.node_module.get(a.name) != mod
                           and a.op != "placeholder" and isinstance(val(a), torch.Tensor)]
                if outside:
                    first[mod] = outside[0]
    return {m: (first.get(m), last[m]) for m in last}
