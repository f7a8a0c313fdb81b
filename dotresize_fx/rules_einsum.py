"""The rule for aten.einsum (attention written as `einsum("bhid,bhjd->bhij", q, k)`, bilinear layers): every
letter is one channel space across operands and output. Registered into `rules.RULES`."""
from __future__ import annotations

from .rules import aten, rule


def _letters(equation: str) -> tuple[list[str], str] | None:
    """(operand subscripts, output subscripts), or None for what this rule does not read (an ellipsis, an
    implicit output)."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    return lhs.split(","), out


@rule(aten.einsum)
def einsum(w, n, out) -> None:
    operands = list(n.args[1])
    parsed = _letters(n.args[0])
    if parsed is None or len(parsed[0]) != len(operands):
        w.pin_node(n, f"einsum {n.args[0]!r} with an ellipsis or an implicit output (module {w.module(n)})")
        for o in operands:
            w.pin_node(o, f"einsum {n.args[0]!r} with an ellipsis or an implicit output (module {w.module(n)})")
        return
    subs, out_sub = parsed
    atoms = {}
    for sub, o in zip(subs, operands):
        for letter, a in zip(sub, w.dims(o)):
            w.s.join(atoms.setdefault(letter, a), a)
    for letter, a in zip(out_sub, out):
        if letter in atoms:
            w.s.join(atoms[letter], a)
    for sub, o in zip(subs, operands):   # a weight's contracted letters read the width, its kept ones write it
        for d, letter in enumerate(sub):
            w.use(o, d, "producer" if letter in out_sub else "consumer", n, "linear")
    if len(operands) == 2 and not any(o.name in w.origin for o in operands):
        _attention(w, subs, out_sub, atoms)


def _attention(w, subs: list[str], out_sub: str, atoms: dict) -> None:
    """Activation × activation with batch letters (in both operands and the output): attention, as a batched
    matmul is; its innermost static batch letter is the heads, the first operand's contracted letter their
    width."""
    batch = [c for c in out_sub if c in subs[0] and c in subs[1]]
    contracted = [c for c in subs[0] if c in subs[1] and c not in out_sub]
    static = [c for c in batch if w.s.static(atoms[c])]
    if static and contracted:
        w.heads.append((atoms[static[-1]], atoms[contracted[-1]]))
