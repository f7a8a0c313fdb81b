"""Dependency analysis: one walk over the captured ATen graph → the model's WidthGroups (DESIGN §4).

Every tensor dimension of every graph value is a *channel space* (`spaces`). Per-op rules (`rules`) union
spaces that must keep the same indexing; reshapes record factorisations (a width = heads × head_dim) and splits
record segments (a fused qkv = q ‖ k ‖ v). A parameter dimension belongs to the group of the outermost factor
of its space (`classify`). An op that touches a width and has no rule *pins* that width with a reason naming the
op and the module: nothing is assumed to be elementwise.
"""
from __future__ import annotations

import operator
import time
from collections import defaultdict

import torch

from .capture import CapturedModel, capture
from .classify import build_groups
from .errors import DotResizeError
from .groups import Analysis
from .rules import IGNORE, RULES, packet, pointwise, val
from .spaces import ChannelSpaces, SizeMismatch


def analyze(model: torch.nn.Module, example_inputs: tuple, captured: CapturedModel | None = None) -> Analysis:
    """Capture (unless given) and analyse `model`; see the module docstring."""
    captured = captured or capture(model, example_inputs)
    t0 = time.perf_counter()
    walker = Walker(captured)
    walker.walk()
    groups = build_groups(walker)
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


def _hint(s) -> int | None:
    """Static size, or None for a symbolic (batch/sequence) size."""
    return s if isinstance(s, int) else None


class Walker:
    """The state of one walk: atoms per node, parameter origins and uses, and what the rules record."""

    def __init__(self, captured: CapturedModel):
        self.c = captured
        self.s = ChannelSpaces()
        self.atoms: dict[str, list] = {}             # node name → atoms per dim (or a list of those for tuples)
        self.origin: dict[str, tuple[str, list[int | None]]] = {}  # node → (param fqn, param dim per node dim)
        self.param_atoms: dict[str, list[int]] = {}
        self.uses: dict[tuple[str, int], list[tuple[str, str, str, str, str]]] = defaultdict(list)
        self.constants: list = []                    # (atom, Constant)
        self.reductions: list[tuple[int, str, str]] = []  # (atom, op, module)
        self.centring: set[str] = set()              # norm modules that subtract the mean
        self.channelwise: list[tuple[int, str, str]] = []  # (atom, op, module): not equivariant to rotations
        self.heads: list[tuple[int, int]] = []       # (q head atom, head_dim atom)
        self.head_dims: list[int] = []               # head_dim atoms of attention (q/k's and v/o's)
        self.equal_splits: list[tuple[torch.fx.Node, list[int]]] = []  # chunk / split(int): (node, part atoms)
        self.unbound: list[int] = []                 # dims unbound into separate tensors (qkv's 3)
        self.folded: dict[str, int] = {}             # symbolic size (as "4*s24") → the width folded into it
        self.layer_scales: list[tuple[str, str]] = []  # (γ parameter, the module whose output it scales)
        self.node_by_name = {n.name: n for n in captured.graph.nodes}

    # -- helpers the rules use ----------------------------------------------------------------------------
    def dims(self, node) -> list[int]:
        if not isinstance(node, torch.fx.Node):
            return []
        if node.name not in self.atoms:
            v = val(node)
            shape = v.shape if isinstance(v, torch.Tensor) else ()
            self.atoms[node.name] = [self.s.new(_hint(d)) for d in shape]
        atoms = self.atoms[node.name]
        return atoms if atoms and not isinstance(atoms[0], list) else []

    def tuple_dims(self, node) -> list[list[int]]:
        """Atoms for each output of an op that returns several tensors."""
        self.atoms[node.name] = [[self.s.new(_hint(d)) for d in v.shape] if isinstance(v, torch.Tensor) else []
                                 for v in val(node)]
        return self.atoms[node.name]

    def module(self, node) -> str:
        return self.c.node_module.get(node.name, "")

    def use(self, node, d: int, role: str, op_node, via: str) -> None:
        """Record that dim `d` of `node` (if it is a parameter, possibly transposed) plays `role`."""
        if not isinstance(node, torch.fx.Node) or node.name not in self.origin:
            return
        fqn, pdims = self.origin[node.name]
        if d < 0:
            d += len(pdims)
        if 0 <= d < len(pdims) and pdims[d] is not None:
            self.uses[(fqn, pdims[d])].append((role, packet(op_node.target).__name__, self.module(op_node),
                                               op_node.name, via))

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
                try:
                    self.rule(node)
                except SizeMismatch as e:
                    raise DotResizeError(
                        f"analysis: {node.target} (node {node.name}, module {self.module(node) or '<root>'}) "
                        f"ties together {e}; the graph is not what its shapes say — report this model") from e

    def rule(self, n: torch.fx.Node) -> None:
        if n.target is operator.getitem:
            return self.getitem(n)
        op = packet(n.target)
        if op in IGNORE:
            return
        if not isinstance(op, torch._ops.OpOverloadPacket):  # higher-order ops, Python operators on tensors
            return self.unknown(n, f"no rule for {getattr(n.target, '__name__', n.target)}")
        out = self.dims(n)
        handler = RULES.get(op)
        if handler is not None:
            handler(self, n, out)
        elif torch.Tag.pointwise in n.target.tags:
            pointwise(self, n, out)
        else:
            self.unknown(n, f"no rule for aten.{op.__name__}")

    def getitem(self, n) -> None:
        src = self.atoms.get(n.args[0].name)
        if src and isinstance(src[0], list):
            self.atoms[n.name] = src[n.args[1]]
        elif isinstance(val(n), torch.Tensor):
            self.unknown(n, "no rule for an output of this op")

    def unknown(self, n, what: str) -> None:
        reason = f"{what} (module {self.module(n) or '<root>'})"
        for x in [*n.all_input_nodes, n]:
            self.pin_node(x, reason)
