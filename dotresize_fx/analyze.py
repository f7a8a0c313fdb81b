"""Dependency analysis: one walk over the captured ATen graph → the model's WidthGroups (DESIGN §4).

Every tensor dimension of every graph value is a *channel space*. Per-op rules union spaces that must keep
the same indexing (networkx's union-find); reshapes record *factorisations* (a width = heads × head_dim) and
splits record *segments* (a fused qkv = q ‖ k ‖ v). A parameter dimension belongs to the group of the outermost
factor of its space. An op that touches a width and has no rule *pins* that width with a reason naming the op
and the module: nothing is assumed to be elementwise.
"""
from __future__ import annotations

import operator
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal

import networkx as nx
import torch

from .capture import CapturedModel, capture

aten = torch.ops.aten

Role = Literal["producer", "consumer", "passthrough", "index"]
Kind = Literal["residual", "mlp", "heads", "channels"]


@dataclass
class Member:
    """One parameter (or buffer) dimension a resize of the group touches."""
    param: str
    dim: int
    role: str
    offset: int = 0          # start of the group's channels in this dim (fused qkv / gate_up)
    length: int = 0          # channels of this group in this dim (size × unit)
    op: str = ""             # the ATen op that gives the role
    module: str = ""
    node: str = ""           # the graph node of that op
    reads: str = ""          # consumers of a residual: the norm module whose output they read ("" = raw stream)
    attn: str = ""           # heads: "qk" (query/key: attention pattern) or "vo" (value/output: linear path)


@dataclass
class Constant:
    """A literal in the graph that encodes the group's size (a view/expand argument)."""
    node: str
    arg: int
    index: int
    value: int
    factor: int              # value = group size × factor (e.g. factor = head_dim for a merged heads×head_dim)


@dataclass
class WidthGroup:
    name: str
    kind: str
    size: int
    unit: int = 1
    kv_heads: int | None = None
    members: list[Member] = field(default_factory=list)
    constants: list[Constant] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)       # modules that normalise this width (read through a norm)
    norm_position: str | None = None                    # "pre" | "post" for a residual stream
    tied: list[list[str]] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)  # residual: ops outside norms acting per channel
    resizable: bool = True
    reason: str = ""

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]

    def details(self) -> str:
        """A readable chain of everything a change of this width touches."""
        head = f"{self.name}: {self.kind}, size {self.size}"
        if self.kind == "heads":
            head += f" q heads ({self.kv_heads} kv heads), head_dim {self.unit}"
        lines = [head, "  " + ("resizable" if self.resizable else f"NOT resizable: {self.reason}")]
        for role in ("producer", "passthrough", "consumer", "index"):
            for m in (m for m in self.members if m.role == role):
                span = f"[{m.offset}:{m.offset + m.length}]" if m.length else ""
                lines.append(f"  {role:<11} {m.param} dim {m.dim}{span}  ({m.op} in {m.module or '<root>'})")
        if self.norms:
            lines.append(f"  read through {self.norm_position or ''} norms: {', '.join(self.norms)}")
        if self.channelwise:
            lines.append(f"  channel-wise (only keeping channels is exact): {', '.join(self.channelwise)}")
        for c in self.constants:
            lines.append(f"  constant    {c.node} arg {c.arg}[{c.index}] = {c.value}")
        for names in self.tied:
            lines.append(f"  tied        {' = '.join(names)}")
        return "\n".join(lines)


@dataclass
class Analysis:
    groups: list[WidthGroup]
    tied: list[list[str]]
    captured: CapturedModel
    timing: dict[str, float]

    def by_kind(self, kind: str) -> list[WidthGroup]:
        return [g for g in self.groups if g.kind == kind]

    def group(self, name: str) -> WidthGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_json(self) -> dict:
        groups = []
        for g in self.groups:
            d = asdict(g)
            d["members"] = [{k: v for k, v in m.items() if k in ("param", "dim", "role", "offset", "length")}
                            for m in d["members"]]
            d["constants"] = [{k: v for k, v in c.items()} for c in d["constants"]]
            groups.append(d)
        return {"groups": groups, "tied": self.tied, "timing": self.timing}

    def table(self) -> str:
        rows = [("kind", "name", "size", "members", "resizable / reason")]
        for g in self.groups:
            size = f"{g.size}" + (f" ({g.kv_heads} kv) x{g.unit}" if g.kind == "heads" else "")
            rows.append((g.kind, g.name, size, str(len(g.members)), "yes" if g.resizable else f"no: {g.reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def analyze(model: torch.nn.Module, example_inputs: tuple, captured: CapturedModel | None = None) -> Analysis:
    """Capture (unless given) and analyse `model`; see the module docstring."""
    captured = captured or capture(model, example_inputs)
    t0 = time.perf_counter()
    walker = _Walker(captured)
    walker.walk()
    groups = walker.groups()
    tied = _tied_parameters(model)
    for g in groups:
        params = {m.param for m in g.members}
        g.tied = [names for names in tied if params & set(names)]
    return Analysis(groups, tied, captured, {"capture_s": captured.capture_s, "analyze_s": time.perf_counter() - t0})


def _tied_parameters(model: torch.nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


# ----------------------------------------------------------------------------------------------------------
# The walk. Atoms are ints; `_Spaces` unions them and keeps factorisations and segments per root.


def _hint(s) -> int | None:
    """Static size, or None for a symbolic (batch/sequence) size."""
    return s if isinstance(s, int) else None


class _Spaces:
    def __init__(self):
        self.uf = nx.utils.UnionFind()
        self.size: dict[int, int | None] = {}
        self.factors: dict[int, tuple[int, ...]] = {}
        self.segments: dict[int, list[tuple[int, int, int]]] = {}
        self.pins: dict[int, list[str]] = defaultdict(list)
        self.flags: dict[int, set[str]] = defaultdict(set)
        self._next = 0

    def new(self, size: int | None) -> int:
        a = self._next
        self._next += 1
        self.size[a] = size
        self.uf[a]  # register
        return a

    def find(self, a: int) -> int:
        return self.uf[a]

    def static(self, a: int) -> bool:
        s = self.size[a]
        return s is not None and s > 1

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb] or not self.static(ra):
            return  # broadcast dims and symbolic (batch/sequence) dims carry no width
        fa, fb = self.factors.pop(ra, None), self.factors.pop(rb, None)
        sa, sb = self.segments.pop(ra, []), self.segments.pop(rb, [])
        pins, flags = self.pins.pop(ra, []) + self.pins.pop(rb, []), self.flags.pop(ra, set()) | self.flags.pop(rb, set())
        self.uf.union(ra, rb)
        r = self.find(ra)
        self.size[r] = self.size[ra]
        self.pins[r].extend(pins)
        self.flags[r] |= flags
        for seg in sa + sb:
            self.add_segment(r, *seg)
        if fa and fb:
            self.factors[r] = fa
            self.align(list(fa), list(fb))
        elif fa or fb:
            self.factors[r] = fa or fb

    def leaves(self, a: int) -> list[int]:
        r = self.find(a)
        if r in self.factors:
            return [leaf for f in self.factors[r] for leaf in self.leaves(f)]
        return [r]

    def factor(self, a: int, parts: list[int]) -> None:
        """Declare a = parts[0] × parts[1] × … (outer to inner)."""
        r = self.find(a)
        parts = [p for p in parts if self.static(p)]
        if len(parts) < 2:
            if len(parts) == 1:
                self.join(r, parts[0])
            return
        if r in self.factors:
            self.align(list(self.factors[r]), parts)
        else:
            self.factors[r] = tuple(parts)

    def align(self, xs: list[int], ys: list[int]) -> None:
        """Unify two factorisations of the same width, splitting factors where one is finer."""
        xs, ys = [l for x in xs for l in self.leaves(x)], [l for y in ys for l in self.leaves(y)]
        while xs and ys:
            x, y = xs.pop(0), ys.pop(0)
            sx, sy = self.size[self.find(x)], self.size[self.find(y)]
            if sx == sy:
                self.join(x, y)
            elif sx and sy and sx < sy and sy % sx == 0:
                rest = self.new(sy // sx)
                self.factor(y, [x, rest])
                ys.insert(0, rest)
            elif sx and sy and sy < sx and sx % sy == 0:
                rest = self.new(sx // sy)
                self.factor(x, [y, rest])
                xs.insert(0, rest)
            else:
                for z in (x, y, *xs, *ys):
                    self.pin(z, "incompatible factorisations of one width")
                return

    def add_segment(self, a: int, offset: int, length: int, child: int) -> None:
        r = self.find(a)
        for off, ln, other in self.segments.get(r, []):
            if (off, ln) == (offset, length):
                self.join(other, child)
                return
        self.segments.setdefault(r, []).append((offset, length, child))

    def pin(self, a: int, reason: str) -> None:
        if self.static(a):
            r = self.find(a)
            if reason not in self.pins[r]:
                self.pins[r].append(reason)


_SAME_SHAPE = {aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.alias, aten.detach, aten.dropout,
               aten.native_dropout, aten.feature_dropout, aten.lift_fresh_copy, aten.type_as}
_LAYOUT = _SAME_SHAPE | {aten.t, aten.transpose, aten.permute}
_RESHAPE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_copy,
            aten.squeeze, aten.unsqueeze}
_REDUCE = {aten.mean, aten.sum, aten.var, aten.std, aten.amax, aten.amin, aten.var_mean, aten.norm}
_LINEAR_OPS = {"linear", "mm", "addmm", "matmul", "bmm"}
_ADDITIVE = {aten.add, aten.add_, aten.sub, aten.sub_, aten.neg, aten.rsub}
_SCALING = {aten.mul, aten.mul_, aten.div, aten.div_}
_IGNORE = {aten.sym_size, aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
           aten.arange, aten.full, aten.zeros, aten.ones, aten.empty, aten.scalar_tensor, aten.new_ones,
           aten.new_zeros, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like, aten.full_like,
           aten.empty_like, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset}


def _packet(target):
    return getattr(target, "overloadpacket", target)


def _varies(node, i: int, ndim: int) -> bool:
    """Whether `node`, broadcast to `ndim` dims, takes different values along dim `i`."""
    shape = _val(node).shape
    j = i - (ndim - len(shape))
    return j >= 0 and shape[j] != 1


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


class _Walker:
    def __init__(self, captured: CapturedModel):
        self.c = captured
        self.s = _Spaces()
        self.atoms: dict[str, list] = {}             # node name → atoms per dim (or a list of those for tuples)
        self.origin: dict[str, tuple[str, list[int | None]]] = {}  # node → (param fqn, param dim per node dim)
        self.param_atoms: dict[str, list[int]] = {}
        self.uses: dict[tuple[str, int], list[tuple[str, str, str]]] = defaultdict(list)
        self.constants: list[tuple[int, Constant]] = []
        self.reductions: list[tuple[int, str, str]] = []  # (atom, op, module)
        self.norm_outputs: list[tuple[int, torch.fx.Node, str]] = []
        self.channelwise: list[tuple[int, str, str]] = []  # (atom, op, module): not equivariant to rotations
        self.heads: list[tuple[int, int]] = []       # (q head atom, head_dim atom)

    # -- helpers ------------------------------------------------------------------------------------------
    def dims(self, node) -> list[int]:
        if not isinstance(node, torch.fx.Node):
            return []
        if node.name not in self.atoms:
            val = _val(node)
            shape = val.shape if isinstance(val, torch.Tensor) else ()
            self.atoms[node.name] = [self.s.new(_hint(d)) for d in shape]
        atoms = self.atoms[node.name]
        return atoms if atoms and not isinstance(atoms[0], list) else []

    def module(self, node) -> str:
        return self.c.node_module.get(node.name, "")

    def use(self, node, d: int, role: str, op_node) -> None:
        """Record that dim `d` of `node` (if it is a parameter, possibly transposed) plays `role`."""
        if not isinstance(node, torch.fx.Node) or node.name not in self.origin:
            return
        fqn, pdims = self.origin[node.name]
        if d < 0:
            d += len(pdims)
        if 0 <= d < len(pdims) and pdims[d] is not None:
            self.uses[(fqn, pdims[d])].append((role, str(_packet(op_node.target).__name__), self.module(op_node),
                                               op_node.name))

    def join_all(self, xs: list[int], ys: list[int]) -> None:
        for x, y in zip(xs, ys):
            self.s.join(x, y)

    def broadcast(self, out: list[int], operands: list) -> None:
        for o in operands:
            od = self.dims(o)
            for i in range(1, min(len(od), len(out)) + 1):
                self.s.join(od[-i], out[-i])

    def pin_node(self, node, reason: str) -> None:
        for a in self.dims(node):
            self.s.pin(a, reason)

    # -- walk ---------------------------------------------------------------------------------------------
    def walk(self) -> None:
        for node in self.c.graph.nodes:
            if node.op == "placeholder":
                atoms = self.dims(node)
                if node.name in self.c.input_param:
                    fqn = self.c.input_param[node.name]
                    self.origin[node.name] = (fqn, list(range(len(atoms))))
                    self.param_atoms[fqn] = atoms
                else:
                    for a in atoms:
                        self.s.pin(a, "a dimension of the model's input")
            elif node.op == "output":
                for out in node.all_input_nodes:
                    for a in self.dims(out):
                        self.s.pin(a, "a dimension of the model's output")
            elif node.op == "call_function":
                self.rule(node)

    def rule(self, n: torch.fx.Node) -> None:
        op = _packet(n.target)
        args = n.args
        if n.target is operator.getitem:
            src = self.atoms.get(args[0].name)
            if src and isinstance(src[0], list):
                self.atoms[n.name] = src[args[1]]
            elif args[0].name in self.atoms and isinstance(_val(n), torch.Tensor):
                self.join_all(self.dims(n), self.dims(args[0]))  # first output of e.g. batch_norm
            return
        if op in _IGNORE or not isinstance(op, torch._ops.OpOverloadPacket):
            return
        out = self.dims(n)
        handler = _RULES.get(op)
        if handler is not None:
            handler(self, n, out)
        elif torch.Tag.pointwise in n.target.tags:
            self.pointwise(n, out)
        else:
            reason = f"no rule for aten.{op.__name__} (module {self.module(n) or '<root>'})"
            for x in [*n.all_input_nodes, n]:
                self.pin_node(x, reason)

    def pointwise(self, n, out) -> None:
        operands = [a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        self.broadcast(out, operands)
        for o in operands:
            for d in range(len(self.dims(o))):
                self.use(o, d, "passthrough", n)
        op = _packet(n.target)
        if op in _ADDITIVE:
            return
        for i, atom in enumerate(out):
            varying = [o for o in operands if _varies(o, i, len(out))]
            # x·s and x/s with s constant along this dim commute with any linear map of it; nothing else does
            if varying and not (op in _SCALING and varying == [n.args[0]]):
                self.channelwise.append((atom, op.__name__, self.module(n)))

    def same_shape(self, n, out) -> None:
        src = n.args[0]
        self.join_all(self.dims(src), out)
        if src.name in self.origin:
            self.origin[n.name] = self.origin[src.name]

    def permute(self, n, out) -> None:
        src = n.args[0]
        sd = self.dims(src)
        op = _packet(n.target)
        nd = len(sd)
        if op is aten.t:
            order = list(range(nd))[::-1]
        elif op is aten.transpose:
            order = list(range(nd))
            i, j = n.args[1] % nd, n.args[2] % nd
            order[i], order[j] = order[j], order[i]
        else:
            order = [d % nd for d in n.args[1]]
        for i, d in enumerate(order):
            self.s.join(out[i], sd[d])
        if src.name in self.origin:
            fqn, pd = self.origin[src.name]
            self.origin[n.name] = (fqn, [pd[d] for d in order])

    def reshape(self, n, out) -> None:
        src = n.args[0]
        sd = self.dims(src)
        in_shape, out_shape = _val(src).shape, _val(n).shape
        groups = _align_shapes(list(in_shape), list(out_shape))
        if groups is None:
            reason = f"reshape {tuple(in_shape)} -> {tuple(out_shape)} mixes widths (module {self.module(n)})"
            self.pin_node(src, reason)
            self.pin_node(n, reason)
            return
        for ins, outs in groups:
            ins = [sd[i] for i in ins if self.s.static(sd[i])]
            outs = [out[j] for j in outs if self.s.static(out[j])]
            if len(ins) == 1 and len(outs) == 1:
                self.s.join(ins[0], outs[0])
            elif len(ins) == 1 and outs:
                self.s.factor(ins[0], outs)
            elif len(outs) == 1 and ins:
                self.s.factor(outs[0], ins)
            elif ins or outs:
                reason = f"reshape regroups several widths at once (module {self.module(n)})"
                for a in ins + outs:
                    self.s.pin(a, reason)
        self._record_constants(n, out)

    def _record_constants(self, n, out) -> None:
        if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)):
            for i, v in enumerate(n.args[1]):
                if isinstance(v, int) and v > 1 and i < len(out) and self.s.size[out[i]] == v:
                    self.constants.append((out[i], Constant(n.name, 1, i, v, 1)))

    def expand(self, n, out) -> None:
        sd = self.dims(n.args[0])
        for i in range(1, len(sd) + 1):
            self.s.join(sd[-i], out[-i])
        self._record_constants(n, out)

    def linear(self, n, out) -> None:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        xd, wd = self.dims(x), self.dims(w)
        self.s.join(xd[-1], wd[1])
        self.s.join(out[-1], wd[0])
        self.join_all(xd[:-1], out[:-1])
        self.use(w, 1, "consumer", n)
        self.use(w, 0, "producer", n)
        if isinstance(b, torch.fx.Node):
            self.s.join(self.dims(b)[0], out[-1])
            self.use(b, 0, "producer", n)

    def matmul(self, n, out, a=None, b=None) -> None:
        a = a if a is not None else n.args[0]
        b = b if b is not None else n.args[1]
        ad, bd = self.dims(a), self.dims(b)
        if len(ad) < 2 or len(bd) < 2:
            self.pin_node(n, f"matmul with a vector operand (module {self.module(n)})")
            return
        self.s.join(ad[-1], bd[-2])
        self.s.join(out[-2], ad[-2])
        self.s.join(out[-1], bd[-1])
        for i in range(3, len(out) + 1):
            for od in (ad, bd):
                if len(od) >= i:
                    self.s.join(od[-i], out[-i])
        for opnd, contracted, free in ((a, -1, -2), (b, -2, -1)):
            self.use(opnd, contracted, "consumer", n)
            self.use(opnd, free, "producer", n)
        if a.name not in self.origin and b.name not in self.origin and len(out) >= 3:
            # activation × activation with batch dims: attention; its static batch dims are heads
            self.heads.append((out[-3], ad[-1]))

    def addmm(self, n, out) -> None:
        self.matmul(n, out, n.args[1], n.args[2])
        bias = n.args[0]
        bd = self.dims(bias)
        if bd:
            self.s.join(bd[-1], out[-1])
            self.use(bias, len(bd) - 1, "producer", n)

    def embedding(self, n, out) -> None:
        w, idx = n.args[0], n.args[1]
        wd = self.dims(w)
        self.s.join(out[-1], wd[1])
        self.join_all(self.dims(idx), out[:-1])
        self.use(w, 1, "producer", n)
        self.use(w, 0, "index", n)
        self.s.pin(wd[0], "indexed by token ids (a vocabulary or position table)")

    def conv(self, n, out) -> None:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        groups = n.args[6] if len(n.args) > 6 else (n.args[8] if len(n.args) > 8 else 1)
        xd, wd = self.dims(x), self.dims(w)
        self.s.join(out[0], xd[0])
        if groups == 1:
            self.s.join(xd[1], wd[1])
            self.s.join(out[1], wd[0])
            self.use(w, 1, "consumer", n)
            self.use(w, 0, "producer", n)
        else:
            reason = f"grouped convolution (groups={groups}, module {self.module(n)})"
            for a in (xd[1], out[1], wd[0]):
                self.s.pin(a, reason)
        if isinstance(b, torch.fx.Node):
            self.s.join(self.dims(b)[0], out[1])
            self.use(b, 0, "producer", n)

    def layer_norm(self, n, out) -> None:
        x = n.args[0]
        self.join_all(self.dims(x), out)
        params = [a for a in n.args[2:4] if isinstance(a, torch.fx.Node)]
        if _packet(n.target) is aten.rms_norm:
            params = [a for a in n.args[2:3] if isinstance(a, torch.fx.Node)]
        for p in params:
            self.s.join(self.dims(p)[-1], out[-1])
            self.use(p, len(self.dims(p)) - 1, "passthrough", n)
        self.reductions.append((out[-1], _packet(n.target).__name__, self.module(n)))
        self.norm_outputs.append((out[-1], n, self.module(n)))

    def batch_norm(self, n, out) -> None:
        x = n.args[0]
        xd = self.dims(x)
        first = out if out else self.dims_first_output(n, xd)
        self.join_all(xd, first)
        for p in n.args[1:5]:
            if isinstance(p, torch.fx.Node):
                self.s.join(self.dims(p)[0], xd[1])
                self.use(p, 0, "passthrough", n)

    def dims_first_output(self, n, like: list[int]) -> list[int]:
        vals = _val(n)
        self.atoms[n.name] = [[self.s.new(_hint(d)) for d in v.shape] if isinstance(v, torch.Tensor) else []
                              for v in vals]
        return self.atoms[n.name][0]

    def reduce(self, n, out) -> None:
        x = n.args[0]
        xd = self.dims(x)
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            dims = list(range(len(xd)))
        dims = {d % len(xd) for d in ([dims] if isinstance(dims, int) else dims)}
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        kept = [a for i, a in enumerate(xd) if i not in dims]
        if keep:
            for i, a in enumerate(xd):
                if i not in dims:
                    self.s.join(a, out[i])
        else:
            self.join_all(kept, out)
        for d in dims:
            self.reductions.append((xd[d], _packet(n.target).__name__, self.module(n)))

    def softmax(self, n, out) -> None:
        x = n.args[0]
        xd = self.dims(x)
        self.join_all(xd, out)
        d = n.args[1] % len(xd)
        self.reductions.append((xd[d], _packet(n.target).__name__, self.module(n)))

    def split(self, n, out_unused) -> None:
        x = n.args[0]
        xd = self.dims(x)
        vals = _val(n)
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(xd)
        outs = [[self.s.new(_hint(d)) for d in v.shape] for v in vals]
        self.atoms[n.name] = outs
        offset = 0
        for o in outs:
            for i, a in enumerate(o):
                if i != dim:
                    self.s.join(a, xd[i])
            length = self.s.size[o[dim]]
            if self.s.static(xd[dim]) and length:
                self.s.add_segment(xd[dim], offset, length, o[dim])
                offset += length

    def slice(self, n, out) -> None:
        x = n.args[0]
        xd = self.dims(x)
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(xd)
        for i, a in enumerate(xd):
            if i != dim:
                self.s.join(a, out[i])
        size = self.s.size[self.s.find(xd[dim])]
        if not self.s.static(xd[dim]):
            return
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else size
        step = n.args[4] if len(n.args) > 4 else 1
        if not isinstance(start, int) or not isinstance(end, int):
            self.s.pin(xd[dim], f"slice with a symbolic bound (module {self.module(n)})")
            return
        start, end = max(0, start if start >= 0 else size + start), min(size, end if end >= 0 else size + end)
        if (start, end, step) == (0, size, 1):
            self.s.join(xd[dim], out[dim])
        elif step == 1:
            self.s.add_segment(xd[dim], start, end - start, out[dim])
        else:
            self.s.pin(xd[dim], f"strided slice (module {self.module(n)})")

    def cat(self, n, out) -> None:
        parts = n.args[0]
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(out)
        for p in parts:
            pd = self.dims(p)
            for i, a in enumerate(pd):
                if i != dim:
                    self.s.join(a, out[i])
        reason = f"concatenated along this width (aten.cat in {self.module(n) or '<root>'}, e.g. rotary halves)"
        self.s.pin(out[dim], reason)
        for p in parts:
            self.s.pin(self.dims(p)[dim], reason)

    def sdpa(self, n, out) -> None:
        q, k, v = n.args[:3]
        qd, kd, vd = self.dims(q), self.dims(k), self.dims(v)
        self.s.join(qd[-1], kd[-1])
        self.s.join(out[-1], vd[-1])
        self.s.join(out[-3], qd[-3])
        self.s.join(kd[-3], vd[-3])
        sq, sk = self.s.size[self.s.find(qd[-3])], self.s.size[self.s.find(kd[-3])]
        if sq == sk:
            self.s.join(qd[-3], kd[-3])
        elif sq and sk and sq % sk == 0:
            self.s.factor(qd[-3], [kd[-3], self.s.new(sq // sk)])
        self.heads.append((qd[-3], qd[-1]))
        for i in range(4, len(out) + 1):
            for d in (qd, kd, vd):
                self.s.join(d[-i], out[-i])

    # -- groups -------------------------------------------------------------------------------------------
    def groups(self) -> list[WidthGroup]:
        s = self.s
        head_keys = {s.leaves(h)[0] for h, _ in self.heads}
        by_key: dict[int, list[tuple[Member, list[int]]]] = defaultdict(list)
        for fqn, atoms in self.param_atoms.items():
            is_param = self._is_parameter(fqn)
            for d, a in enumerate(atoms):
                roles = self.uses.get((fqn, d))
                if not roles:
                    continue  # e.g. the unused alias of a tied weight
                for offset, length, leaves in self._resolve(a):
                    key = leaves[0]
                    if not s.static(key):
                        continue
                    if not is_param and key not in by_key:
                        continue  # buffers only join groups that parameters define (BN stats, not RoPE tables)
                    for role, op, module, node in _unique_roles(roles):
                        by_key[key].append((Member(fqn, d, role, offset, length, op, module, node), leaves))
        ordered = sorted(by_key.items(), key=lambda kv: min(self._order(m.param) for m, _ in kv[1]))
        out, counters = [], defaultdict(int)
        for key, entries in ordered:
            if not any(self._is_parameter(m.param) for m, _ in entries):
                continue
            g = self._group(key, entries, key in head_keys)
            g.name = f"{g.kind}.{counters[g.kind]}"
            counters[g.kind] += 1
            out.append(g)
        return out

    def _is_parameter(self, fqn: str) -> bool:
        return fqn in self.c.program.graph_signature.inputs_to_parameters.values()

    def _order(self, fqn: str) -> int:
        return list(self.param_atoms).index(fqn)

    def _resolve(self, a: int, offset: int = 0) -> list[tuple[int, int, list[int]]]:
        r = self.s.find(a)
        if r in self.s.segments and r not in self.s.factors:
            out = []
            for off, ln, child in sorted(self.s.segments[r]):
                out.extend(self._resolve(child, offset + off))
            return out
        return [(offset, self.s.size[r] or 0, self.s.leaves(r))]

    def _group(self, key: int, entries: list[tuple[Member, list[int]]], is_heads: bool) -> WidthGroup:
        s = self.s
        members = [m for m, _ in entries]
        size = s.size[key]
        reasons = list(s.pins.get(key, []))
        g = WidthGroup(name="", kind="channels", size=size, members=members)
        ops = {m.op for m in members if m.role in ("producer", "consumer")}
        norm_members = {m.module for m in members if m.role == "passthrough"}
        reducing = [(mod, op) for a, op, mod in self.reductions if s.find(a) == key]
        norms = sorted({mod for mod, op in reducing if mod in norm_members})
        g.norms = norms
        for mod, op in reducing:
            if mod not in norm_members:
                reasons.append(f"reduced over by aten.{op} outside a norm (module {mod or '<root>'})")
        if is_heads:
            g.kind = "heads"
            qk_dims = {s.find(d) for h, d in self.heads if s.leaves(h)[0] == key}
            for m, leaves in entries:
                m.attn = "qk" if s.find(leaves[-1]) in qk_dims else "vo"
            longest = max((leaves for _, leaves in entries), key=len)
            g.kv_heads = size
            g.size = size * (s.size[longest[1]] if len(longest) > 2 else 1)
            g.unit = s.size[longest[-1]] if len(longest) > 1 else 1
        elif norms and len(g.producers()) >= 2 and any(op in ("layer_norm", "rms_norm", "mean") for _, op in reducing):
            g.kind = "residual"
            g.norm_position = "post" if self._post_norm(key) else "pre"
            g.channelwise = sorted({f"aten.{op} in {mod or '<root>'}" for a, op, mod in self.channelwise
                                    if s.find(a) == key and mod not in norms})
            self._mark_norm_readers(g)
            if g.norm_position == "post":
                reasons.append("post-LN: the stream itself is normalised after every residual add, so no "
                               "orthogonal map keeps the norms invariant (MLP and heads groups stay resizable)")
        elif ops and ops <= _LINEAR_OPS and not reasons:
            g.kind = "mlp"
        for atom, c in self.constants:
            leaves = s.leaves(atom)
            if leaves and leaves[0] == key:
                c.factor = c.value // size if size else 1
                g.constants.append(c)
        if not g.producers() and not g.consumers():
            reasons.append("no producer or consumer parameter")
        g.resizable = not reasons
        g.reason = "; ".join(dict.fromkeys(reasons))
        return g

    def _mark_norm_readers(self, g: WidthGroup) -> None:
        nodes = {n.name: n for n in self.c.graph.nodes}
        for m in g.consumers():
            x = nodes[m.node].args[0] if m.op != "addmm" else nodes[m.node].args[1]
            while isinstance(x, torch.fx.Node):
                mod = self.c.node_module.get(x.name, "")
                if mod in g.norms:
                    m.reads = mod
                    break
                if _packet(x.target) not in _SAME_SHAPE | _RESHAPE | {aten.slice}:  # slice: logits_to_keep
                    break
                x = x.args[0]

    def _post_norm(self, key: int) -> bool:
        """A norm whose output (through casts/dropout) feeds a residual add normalises the stream itself."""
        for atom, node, _ in self._norm_output_nodes(key):
            frontier = [node]
            while frontier:
                x = frontier.pop()
                for user in x.users:
                    op = _packet(user.target)
                    if op in _SAME_SHAPE:
                        frontier.append(user)
                    elif op in (aten.add, aten.add_):
                        return True
        return False

    def _norm_output_nodes(self, key: int):
        found = [(a, n, m) for a, n, m in self.norm_outputs if self.s.find(a) == key]
        # norms written as ops (RMSNorm: pow/mean/rsqrt/mul): the output is the last node of the norm module
        norm_modules = {m for a, _, m in self.reductions if self.s.find(a) == key}
        last: dict[str, torch.fx.Node] = {}
        for node in self.c.graph.nodes:
            mod = self.c.node_module.get(node.name)
            if mod in norm_modules and isinstance(_val(node), torch.Tensor):
                last[mod] = node
        found += [(key, n, m) for m, n in last.items()]
        return found


def _unique_roles(roles):
    seen, out = set(), []
    for r in roles:
        if (r[0], r[2]) not in seen:
            seen.add((r[0], r[2]))
            out.append(r)
    return out


def _align_shapes(a: list, b: list) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of a reshape: [(in dims, out dims)] with equal products; size-1 dims are left out."""
    def val(x):
        return x if isinstance(x, int) else x.node.hint if x.node.hint is not None else None
    ia = [i for i, x in enumerate(a) if val(x) != 1]
    ib = [j for j, x in enumerate(b) if val(x) != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        gi, gj = [ia[i]], [ib[j]]
        pa, pb = val(a[ia[i]]), val(b[ib[j]])
        if pa is None or pb is None:
            if (pa is None) != (pb is None):
                return None
            groups.append((gi, gj))
            i, j = i + 1, j + 1
            continue
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia) and val(a[ia[i]]) is not None:
                pa *= val(a[ia[i]])
                gi.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib) and val(b[ib[j]]) is not None:
                pb *= val(b[ib[j]])
                gj.append(ib[j])
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups if i == len(ia) and j == len(ib) else None


_RULES = {
    **{op: _Walker.same_shape for op in _SAME_SHAPE},
    aten.t: _Walker.permute, aten.transpose: _Walker.permute, aten.permute: _Walker.permute,
    **{op: _Walker.reshape for op in _RESHAPE},
    aten.expand: _Walker.expand,
    aten.linear: _Walker.linear,
    aten.mm: _Walker.matmul, aten.bmm: _Walker.matmul, aten.matmul: _Walker.matmul,
    aten.addmm: _Walker.addmm,
    aten.embedding: _Walker.embedding,
    aten.conv1d: _Walker.conv, aten.conv2d: _Walker.conv, aten.convolution: _Walker.conv,
    aten.layer_norm: _Walker.layer_norm, aten.rms_norm: _Walker.layer_norm,
    aten.batch_norm: _Walker.batch_norm, aten._native_batch_norm_legit_no_training: _Walker.batch_norm,
    aten._native_batch_norm_legit_functional: _Walker.batch_norm,
    **{op: _Walker.reduce for op in _REDUCE},
    aten.softmax: _Walker.softmax, aten._softmax: _Walker.softmax, aten.log_softmax: _Walker.softmax,
    aten._log_softmax: _Walker.softmax,
    aten.split: _Walker.split, aten.split_with_sizes: _Walker.split, aten.chunk: _Walker.split,
    aten.unsafe_split: _Walker.split,
    aten.slice: _Walker.slice,
    aten.cat: _Walker.cat,
    aten.scaled_dot_product_attention: _Walker.sdpa,
}
