"""Capture a model into an ATen graph with `torch.export` (non-strict), checked against eager outputs."""
from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import time
from dataclasses import dataclass

import torch

from .errors import DotResizeError
from .outputs import model_outputs

log = logging.getLogger(__name__)

CAPTURE_ATOL = 1e-4


@dataclass
class CapturedModel:
    """The exported program plus the two maps the analysis needs.

    `node_module`: call node name → FQN of the innermost module that ran it (from `nn_module_stack`).
    `input_param`: placeholder name → parameter or buffer FQN (from the graph signature).
    """
    program: torch.export.ExportedProgram
    node_module: dict[str, str]
    input_param: dict[str, str]
    capture_s: float = 0.0

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def forget_weights(self) -> None:
        """Replace the program's parameters and buffers by meta tensors of their shapes. The eager path reads
        only the graph; a program that holds the model's tensors keeps every weight a rewrite replaces alive
        (a random Llama of 835M parameters in float32: 2.2 GB of MLP weights held after the pass)."""
        state = self.program.state_dict
        for name, t in state.items():
            state[name] = torch.empty_like(t, device="meta")


def capture(model: torch.nn.Module, example_inputs: tuple, *, check: bool = True) -> CapturedModel:
    """`torch.export.export(model, example_inputs, strict=False)` with batch/sequence dims left dynamic (AUTO)."""
    t0 = time.perf_counter()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a KV cache in the graph would make the capture stateful
    # token ids: batch and sequence may vary; other inputs (images, patches): only the batch
    dims = tuple({d: torch.export.Dim.AUTO for d in range(min(t.dim(), 1 if t.is_floating_point() else 2))}
                 for t in example_inputs)
    if _takes_var_positional(model):   # forward(*args), e.g. an unflattened program: the shapes of `args`
        dims = (dims,)
    try:
        with torch.no_grad(), _lean_tracing():
            program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    except Exception as e:
        raise DotResizeError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. The model must be traceable by "
                             "torch.export (no data-dependent Python control flow on tensor values)") from e
    sig = program.graph_signature
    input_param = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    node_module = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node_module[node.name] = _clean_fqn(list(stack.values())[-1][0])
    captured = CapturedModel(program, node_module, input_param, time.perf_counter() - t0)
    if check:
        check_capture(model, captured, example_inputs)
    return captured


def _takes_var_positional(model: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


@contextlib.contextmanager
def _lean_tracing():
    """Two costs of torch.export that buy nothing here, switched off for the capture only: per-node Python stack
    traces (~20% of SmolLM2's capture; nothing downstream reads them) and Python's cyclic garbage collector, which
    the export's millions of small allocations trigger over and over, each time walking the whole heap (the model,
    earlier graphs): ~10% (`benchmarks/analyze.py`, SmolLM2: median 5.0–5.7 s before, 4.6–4.7 s after)."""
    emit_stack_traces = torch.fx.config.do_not_emit_stack_traces
    collecting = gc.isenabled()
    torch.fx.config.do_not_emit_stack_traces = True
    gc.disable()
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit_stack_traces
        if collecting:
            gc.enable()


def check_capture(model: torch.nn.Module, captured: CapturedModel, example_inputs: tuple) -> float:
    """Max |graph − eager| on the example inputs; raises if the capture changed the model's function."""
    with torch.no_grad():
        want = model_outputs(model, example_inputs)
        got = model_outputs(captured.program.module(), example_inputs)
    diff = (want - got).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    if not diff <= CAPTURE_ATOL * scale:
        raise DotResizeError(f"the captured graph differs from the eager model by {diff:.3g} on the example "
                             "inputs: the model has behaviour torch.export cannot represent (check for "
                             "randomness or Python-side state in forward)")
    return diff


def _clean_fqn(fqn: str) -> str:
    # strict export writes L['self'].layers[0]; non-strict writes layers.0 — normalise to the latter.
    fqn = fqn.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in fqn.replace("]", "").split("["):
        out.append(part.strip("."))
    return ".".join(p for p in out if p)
