"""What the analysis finds (DESIGN §3): WidthGroups, their members and constants, and their reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .capture import CapturedModel

Role = Literal["producer", "consumer", "passthrough", "index"]
Kind = Literal["residual", "mlp", "heads", "channels"]
KINDS: tuple[str, ...] = ("residual", "mlp", "heads", "channels")


@dataclass
class Member:
    """One parameter (or buffer) dimension a resize of the group touches."""
    param: str
    dim: int
    role: str
    offset: int = 0          # start of the group's channels in this dim (fused qkv / gate_up)
    length: int = 0          # channels of this group in this dim (size × unit)
    op: str = ""             # the ATen op that gives the role (for reports)
    module: str = ""
    node: str = ""           # the graph node of that op
    via: str = ""            # what the op is to the width: "linear", "conv", "embedding", "norm", "pointwise", …
    reads: str = ""          # consumers of a residual: the norm module whose output they read ("" = raw stream)
    attn: str = ""           # heads: "qk" (query/key: attention pattern) or "vo" (value/output: linear path)
    inside: bool = False     # consumers: the op reads a value its module computed, not the module's input


@dataclass
class Constant:
    """A literal in the graph that encodes the group's size: a view/expand size, a split size."""
    node: str
    arg: int
    index: int               # position in the argument's list, or -1 when the argument is the number itself
    value: int
    factor: int              # value = count × factor (e.g. factor = head_dim for a merged heads × head_dim)
    per: str = "units"       # the count: the group's units (q heads, channels); for GQA its "kv" heads or
                             # the q heads per kv head ("rep")
    module: str = ""         # the module whose graph holds the node
    symbolic: bool = False   # the entry is value × a symbolic size (heads folded into the batch: `4 * B`)

    def resized(self, units: int, kv: int | None) -> int:
        count = {"kv": kv, "rep": units // kv if kv else units}.get(self.per, units)
        return count * self.factor


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
    centred: bool = False                               # those norms subtract the mean (aten.layer_norm)
    norm_position: str | None = None                    # "pre" | "post" | "branch" | "start" (residual)
    tied: list[list[str]] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)  # residual: ops outside norms acting per channel
    scales: dict[str, str] = field(default_factory=dict)  # residual: producer module → its layer scale γ
    resizable: bool = True
    reason: str = ""

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]

    def inner(self, m: Member) -> int:
        """Positions per channel in the member's dim: a flatten of (channels, h, w) into a Linear's input puts
        h·w consecutive features on every channel (1 for every other member)."""
        n = self.size * self.unit
        return m.length // n if self.kind != "heads" and m.length > n and m.length % n == 0 else 1

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
            kind = "centring " if self.centred else ""
            lines.append(f"  read through {self.norm_position or ''} {kind}norms: {', '.join(self.norms)}")
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

    def kinds(self) -> list[str]:
        """The group kinds this model has, resizable or not."""
        return [k for k in KINDS if self.by_kind(k)]

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
            groups.append(d)
        return {"groups": groups, "tied": self.tied, "timing": self.timing}

    def table(self) -> str:
        rows = [("kind", "name", "size", "members", "resizable / reason")]
        for g in self.groups:
            size = f"{g.size}" + (f" ({g.kv_heads} kv) x{g.unit}" if g.kind == "heads" else "")
            rows.append((g.kind, g.name, size, str(len(g.members)), "yes" if g.resizable else f"no: {g.reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
