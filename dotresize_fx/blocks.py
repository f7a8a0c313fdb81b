"""A model's repeated blocks, and a runner that moves calibration inputs through them (DESIGN §5.6).

Layer by layer, block l is calibrated on the inputs that the already resized blocks < l produce. A model whose
blocks do not chain (`x = x + block(x)` outside them) is one block: the whole model, run on the batches.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass

import torch

from .errors import DotResizeError
from .families import HIDDEN_STATES_ARG
from .groups import Analysis, WidthGroup
from .outputs import main_output, model_outputs


class _Stop(Exception):
    """Raised by a hook to end a forward once the block inputs it needs are recorded."""


@dataclass
class Blocks:
    """`modules` run in order; `prefix` is their ModuleList's FQN ("" when the whole model is the one block)."""
    prefix: str
    modules: list[torch.nn.Module]

    @property
    def whole(self) -> bool:
        return self.prefix == ""

    def index(self, group: WidthGroup) -> int | None:
        """The block that holds every member of `group`, or None for a group that spans blocks."""
        return 0 if self.whole else block_of(group, self.prefix)


def blocks(model: torch.nn.Module, analysis: Analysis, batches, layerwise: bool = True) -> Blocks:
    """The chaining blocks of `model` (see `block_list`), else the whole model as one block."""
    found = block_list(model, analysis, batches[0]) if layerwise else None
    return Blocks(*found) if found else Blocks("", [model])


def block_list(model: torch.nn.Module, analysis: Analysis, batch: tuple) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList whose entries hold the most width groups, if its blocks chain (output l = input l+1)."""
    best, count = None, 0
    for name, mod in model.named_modules():
        children = _listed(mod)
        if len(children) >= 2:
            n = sum(block_of(g, name) is not None for g in analysis.groups)
            if n > count:
                best, count = (name, children), n
    if best is None or not _chains(model, best[1], batch):
        return None
    return best


def _listed(mod: torch.nn.Module) -> list[torch.nn.Module]:
    """The entries of a ModuleList or Sequential, also once unflattened from a program (an interpreter module
    whose children are named 0, 1, …)."""
    names = [n for n, _ in mod.named_children()]
    if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) or (names and names == [
            str(i) for i in range(len(names))]):
        return list(mod.children())
    return []


def block_of(group: WidthGroup, prefix: str) -> int | None:
    """Index of the block (in ModuleList `prefix`) that holds every member of the group, else None."""
    found = set()
    for m in group.members:
        path = m.module or m.param
        rest = path.removeprefix(prefix + ".")
        head = rest.split(".", 1)[0]
        if rest == path or not head.isdigit():
            return None
        found.add(int(head))
    return found.pop() if len(found) == 1 else None


def _chains(model, modules, batch) -> bool:
    seen = []

    def grab(_m, args, kwargs):
        seen.append((args, kwargs))
        if len(seen) == 2:
            raise _Stop
    hooks = [modules[i].register_forward_pre_hook(grab, with_kwargs=True) for i in (0, 1)]
    try:
        with torch.inference_mode():
            model_outputs(model, batch)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(seen) < 2:
        return False
    with torch.inference_mode():
        out = _hidden(modules[0](*seen[0][0], **seen[0][1]))
        nxt = hidden_in(*seen[1])
    return isinstance(out, torch.Tensor) and out.shape == nxt.shape and torch.allclose(out, nxt, atol=1e-5)


def _hidden(out):
    """A block's hidden states: its output, or the first tensor of a tuple (a program's block may return the
    symbolic sizes it computed for later blocks)."""
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), out[0])
    return out


def _hidden_at(args) -> int | None:
    """Where the hidden states are among a block's positional arguments: the first tensor (a program's block
    may get symbolic sizes before it)."""
    return next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)


def hidden_in(args, kwargs):
    i = _hidden_at(args)
    return args[i] if i is not None else kwargs[HIDDEN_STATES_ARG]


class BlockRunner:
    """Holds the inputs of one block for every calibration batch and moves them through the blocks.

    Each block runs with the arguments the real forward gave *that* block (sliding-window layers their window
    mask and local rotary tables, global layers theirs); only the hidden states are replaced by the previous
    block's outputs. When every block gets block 0's other arguments (checked on the first batch), the
    later batches stop at block 0 and nothing per block is stored.
    """

    def __init__(self, model: torch.nn.Module, blocks: Blocks, batches, device: str = "cpu", offload=None):
        self.model, self.blocks, self.device, self.offload = model, blocks, torch.device(device), offload
        self.forward_s = 0.0
        self.extras: list[list | None] = [None] * len(batches)   # per batch, per block: args without hidden
        self.per_block = False
        if blocks.whole:
            self.inputs = [(_to(tuple(batch), self.device), {}) for batch in batches]
            return
        t0 = time.perf_counter()
        first = self._grab(batches[0], every_block=True)
        extras = [without_hidden(*a) for a in first]
        self.per_block = not all(_same(e, extras[0]) for e in extras[1:])
        self.inputs = [first[0]]
        self.extras[0] = extras if self.per_block else None
        for i, batch in enumerate(batches[1:], start=1):
            seen = self._grab(batch, every_block=self.per_block)
            self.inputs.append(seen[0])
            self.extras[i] = [without_hidden(*a) for a in seen] if self.per_block else None
        self.inputs, self.extras = _to(self.inputs, self.device), _to(self.extras, self.device)
        self.forward_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def onloaded(self, b: int):
        """Block b on the runner's device while it is calibrated and fitted (sequential onloading, as GPTQ and
        llm-compressor do): the rest of the model stays in CPU memory. With an `offload.Offload`, what the block
        holds afterwards that is not on disk (its rewritten weights) is written there before the next block."""
        block = self.blocks.modules[b]
        if self.device.type != "cpu":
            block.to(self.device)
        try:
            yield
        finally:
            if self.device.type != "cpu":
                block.to("cpu")
            if self.offload is not None:
                self.offload.store(block, f"{self.blocks.prefix}.{b}" if self.blocks.prefix else "")

    def _grab(self, batch, every_block: bool) -> list[tuple[tuple, dict]]:
        seen = []

        def grab(_m, args, kwargs):
            seen.append((args, kwargs))
            if not every_block:
                raise _Stop
        modules = self.blocks.modules if every_block else self.blocks.modules[:1]
        hooks = [mod.register_forward_pre_hook(grab, with_kwargs=True) for mod in modules]
        try:
            with torch.inference_mode():
                model_outputs(self.model, batch)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return seen

    def __len__(self) -> int:
        return len(self.inputs)

    def hidden(self, i: int) -> torch.Tensor:
        """Batch i's hidden states entering the current block."""
        return hidden_in(*self.inputs[i])

    def run_one(self, b: int, i: int):
        """Block b on batch i's current hidden states, with the other arguments the forward gave block b."""
        if self.blocks.whole:
            return main_output(self.blocks.modules[0](*self.inputs[i][0]))
        args, kwargs = self.inputs[i]
        if self.extras[i] is not None:
            args, kwargs = with_hidden(self.extras[i][b], hidden_in(args, kwargs))
        return _hidden(self.blocks.modules[b](*args, **kwargs))

    def run(self, b: int, on_output=None) -> None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(len(self.inputs)):
                out = self.run_one(b, i)
                if on_output is not None:
                    on_output(i, out)
        self.forward_s += time.perf_counter() - t0

    def advance(self, b: int) -> None:
        """Replace the stored hidden states by block b's outputs: the inputs of block b+1."""
        if self.blocks.whole:
            return

        def store(i, out):
            self.inputs[i] = with_hidden(without_hidden(*self.inputs[i]), out)
        self.run(b, store)


def _to(obj, device: torch.device):
    """Every tensor in a nest of tuples, lists and dicts, moved to `device`."""
    if device.type == "cpu":
        return obj
    return torch.utils._pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, obj)


def resolve_device(device: str) -> str:
    """`auto`: the first CUDA device when there is one, else the CPU; `cuda[:N]` must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DotResizeError(f"--device {device}: no such CUDA device here "
                                 f"({torch.cuda.device_count()} visible); use --device cpu or auto")
        return device
    raise DotResizeError(f"--device {device!r}: use auto, cpu or cuda[:N]")


def without_hidden(args, kwargs):
    """(position of the hidden states or None for the keyword, the other args, the other kwargs)."""
    i = _hidden_at(args)
    if i is not None:
        return (i, args[:i] + args[i + 1:], kwargs)
    return (None, args, {k: v for k, v in kwargs.items() if k != HIDDEN_STATES_ARG})


def with_hidden(extra, hidden):
    i, args, kwargs = extra
    if i is not None:
        return (*args[:i], hidden, *args[i:]), kwargs
    return args, {**kwargs, HIDDEN_STATES_ARG: hidden}


def _same(a, b) -> bool:
    """Whether two blocks' extra arguments are the same (by identity, or equal tensors and values)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:   # objects without a meaningful ==: treat as different, which is always safe
        return False
