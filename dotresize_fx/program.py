"""The graph-level rewrite path (DESIGN §6): resize the captured program itself, never the user's code.

A model whose forward encodes a width (a reshape to a literal head count, `x.size(-1)` into a split or a view)
breaks when only its parameters change. Such a model is resized as its captured program, unflattened back into
its module tree (`torch.export.unflatten`: every submodule an interpreter of its own graph, so hooks, blocks and
parameter FQNs work as in eager mode): the same WidthMaps land on the parameters, and the graph literals the
analysis recorded for each group (`WidthGroup.constants`) are patched. The result runs in torch, is saved with
`torch.export.save` (`OUT/model.pt2`) and exports to ONNX from that program. Hugging Face models keep the eager
path (parameters + config → a stock checkpoint), which the families' attribute maps keep in step.
"""
from __future__ import annotations

import operator

import torch

from .capture import capture
from .groups import Analysis


def choose(model: torch.nn.Module, analysis: Analysis, kinds: set[str]) -> tuple[str, str]:
    """("eager" | "program", why) for resizing `kinds` of this model."""
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        return "eager", "a Hugging Face model: parameters and config, saved as a stock checkpoint where it can be"
    encoded = [f"{c.node}[{c.index}] = {c.value} ({g.name})" for g in analysis.groups
               if g.kind in kinds and g.resizable for c in g.constants]
    return "program", ("not a Hugging Face model: resized as its captured program"
                       + (f"; the graph literals {', '.join(encoded[:3])} are patched" if encoded else ""))


def as_module(analysis: Analysis) -> torch.nn.Module:
    """The captured program as a module tree of graph interpreters, without the trace-time fake values (so that
    it can be copied)."""
    module = torch.export.unflatten(analysis.captured.program)
    for graph in graphs(module):
        for node in graph.nodes:
            for key in ("val", "tensor_meta", "example_value"):
                node.meta.pop(key, None)
    return module


def graphs(module: torch.nn.Module):
    for mod in module.modules():
        if isinstance(getattr(mod, "graph", None), torch.fx.Graph):
            yield mod.graph


def patch_constants(model: torch.nn.Module, analysis: Analysis, maps: dict) -> list[str]:
    """Set every recorded literal of the resized groups to the new width (only in graph-interpreter modules:
    an eager module has no graph to patch). Returns what was patched."""
    patched = []
    for name, w in maps.items():
        for c in analysis.group(name).constants:
            graph = getattr(model.get_submodule(c.module), "graph", None)
            if not isinstance(graph, torch.fx.Graph):
                continue
            node = next((n for n in graph.nodes if n.name == c.node), None)
            if node is None:
                continue
            new, args = c.resized(w.m, w.kv_after), list(node.args)
            if c.index < 0:
                args[c.arg] = new
            else:
                sizes = list(args[c.arg])
                sizes[c.index] = _rescaled(graph, node, sizes[c.index], c.value, new) if c.symbolic else new
                args[c.arg] = sizes
            node.args = tuple(args)
            patched.append(f"{c.module or '<root>'}.{c.node}: {c.value} → {new}")
    return patched


def _rescaled(graph: torch.fx.Graph, node, size: torch.fx.Node, old: int, new: int) -> torch.fx.Node:
    """`size` = old × s (a symbolic s) becomes new × s, computed for this node alone: the product may be shared
    with other layers, whose widths change on their own."""
    with graph.inserting_before(node):
        return graph.call_function(operator.floordiv, (graph.call_function(operator.mul, (size, new)), old))


def save_program(model: torch.nn.Module, inputs: tuple, path) -> None:
    """The resized program module, captured again (a clean ExportedProgram with fresh shapes), saved."""
    torch.export.save(capture(model, inputs).program, str(path))


def load_program(path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()
