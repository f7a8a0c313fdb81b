"""Weights kept on disk (`--offload-folder`), so that a model larger than CPU memory compresses.

Every parameter is written to the folder in accelerate's disk-offload layout (`accelerate.utils.offload_weight`:
one `NAME.dat` per tensor plus `index.json`, readable by `accelerate.utils.OffloadedWeightsLoader`) and the
module then holds a tensor memory-mapped from that file (`torch.from_file`, shared). The kernel pages a block's
weights in while it runs and may drop them again under memory pressure, so the job's own (anonymous) memory holds
only what is being computed: one block's statistics, its activations, and the block a rewrite has just replaced —
which `store` writes back before the next block starts.

accelerate's own hooks load a module's weights onto the device around each forward; torch.export cannot trace
through them (its fake tensors meet the hooks' real ones), and the capture, the rewrite check and the evaluation
all trace or run the whole model. A memory map is the same disk offload as far as every forward is concerned.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path

import torch
from accelerate.utils import offload_weight

from . import dist
from .errors import DotResizeError

INDEX = "index.json"


class Offload:
    """The folder a job's weights live in while it runs; `store` moves a module's in-memory parameters there."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise DotResizeError(f"--offload-folder {folder}: give a new or empty directory (the job writes one "
                                 "file per weight there and removes them at the end)")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, dict] = {}
        self.stored_bytes = 0   # everything written, rewrites included: the disk traffic of the job

    def is_stored(self, t: torch.Tensor) -> bool:
        name = t.untyped_storage().filename if t.device.type == "cpu" else None
        return name is not None and Path(name).parent == self.folder

    def store(self, module: torch.nn.Module, prefix: str = "", dtype: torch.dtype | None = None) -> int:
        """Write every parameter of `module` that is not already on disk (cast to `dtype` first, one tensor at a
        time) and replace it by its memory map; tied parameters stay one. Returns the number written."""
        seen: dict[int, torch.nn.Parameter] = {}
        written = 0
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for attr, p in list(mod._parameters.items()):
                if p is None or p.numel() == 0:   # nothing to page, and a memory map cannot be empty
                    continue
                if id(p) not in seen:
                    done = self.is_stored(p) and (dtype is None or p.dtype == dtype)
                    seen[id(p)] = p if done else self._mapped(p, _join(prefix, mod_name, attr), dtype)
                    written += not done
                mod._parameters[attr] = seen[id(p)]
        if written:
            self._write_index()
        return written

    def copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A deep copy whose parameters are new files in the folder (a dense model a pass keeps beside the one it
        rewrites), never a second copy in memory."""
        memo = {}
        for name, p in module.named_parameters():
            if p.numel():
                memo[id(p)] = self._mapped(p, f"copy.{name}", None)
        self._write_index()
        return copy.deepcopy(module, memo)

    def close(self) -> None:
        """Remove the files this job wrote (tensors still mapped stay readable until they are freed)."""
        for name in self.index:
            (self.folder / f"{name}.dat").unlink(missing_ok=True)
        (self.folder / INDEX).unlink(missing_ok=True)
        self.index.clear()
        if self.created:
            try:
                self.folder.rmdir()
            except OSError:   # someone else put files there meanwhile: leave them
                pass

    def _mapped(self, p: torch.Tensor, name: str, dtype: torch.dtype | None) -> torch.nn.Parameter:
        name = _file_name(name)
        path = self.folder / f"{name}.dat"
        # unlink, never overwrite: a tensor still mapped from the old file (a dense copy) keeps its pages
        path.unlink(missing_ok=True)
        value = p.detach().to("cpu", dtype or p.dtype).contiguous()
        offload_weight(value, name, str(self.folder), self.index)
        self.stored_bytes += value.numel() * value.element_size()
        mapped = torch.from_file(str(path), shared=True, size=max(value.numel(), 1), dtype=value.dtype)
        return torch.nn.Parameter(mapped.view(value.shape), requires_grad=p.requires_grad)

    def _write_index(self) -> None:
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.folder / INDEX)


@contextlib.contextmanager
def offloaded(folder: str | Path | None):
    """An `Offload` in `folder` (None without one), its files removed at the end. Under torchrun each rank keeps
    its own copy of the weights, in `FOLDER/rank-N`."""
    if folder is None:
        yield None
        return
    offload = Offload(Path(folder) / f"rank-{dist.rank()}" if dist.world_size() > 1 else folder)
    try:
        yield offload
    finally:
        offload.close()


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _file_name(name: str) -> str:
    """A parameter's FQN as a file name (FQNs are dotted identifiers; anything else is replaced)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
