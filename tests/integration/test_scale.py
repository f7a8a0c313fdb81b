"""Real-size options on tiny models: weights kept in bfloat16, and data-parallel calibration over gloo."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.load import load

MODELS = str(Path(__file__).resolve().parents[1] / "models.py")


def _words(path: Path, n=6000):
    g = torch.Generator().manual_seed(0)
    # a text with structure the model can be scored on: repeated short phrases of the tokenizer's words
    phrases = [" ".join(f"w{int(i)}" for i in torch.randint(0, 120, (5,), generator=g)) for _ in range(40)]
    path.write_text(" ".join(phrases[int(i)] for i in torch.randint(0, 40, (n // 5,), generator=g)))
    return str(path)


def test_bfloat16_weights_stay_bfloat16_and_score_like_float32(tmp_path):
    text = _words(tmp_path / "t.txt")
    reports = {}
    for dtype in ("float32", "bfloat16"):
        reports[dtype] = run(Job(f"{MODELS}:llama_with_tokenizer", PassSpec.parse("prune:mlp=0.25,unmerge=ls"),
                                 data=text, calib_samples=8, seq_len=32, eval_tokens=620, dtype=dtype,
                                 out=str(tmp_path / dtype), progress=False))
    assert {t.dtype for t in load_file(str(tmp_path / "bfloat16" / "model.safetensors")).values()} == {torch.bfloat16}
    assert next(load(tmp_path / "bfloat16").model.parameters()).dtype == torch.bfloat16
    assert reports["bfloat16"]["dtype"] == "bfloat16" and reports["float32"]["dtype"] == "float32"
    f32, bf16 = reports["float32"]["ppl_after"], reports["bfloat16"]["ppl_after"]
    assert abs(bf16 - f32) / f32 < 0.02, (f32, bf16)


def test_two_gloo_ranks_save_the_same_model_as_one_process(tmp_path):
    """prune+ls on the MLPs from 4 × 16 rows, fewer than their 96 channels (the ranks gather the rows and fit
    in the row space), then DOTResize on the heads (Grams summed over the ranks), then per-layer residual bases
    (each block's statistics summed over the ranks before its basis is computed and the prefix advances)."""
    args = ["compress", f"{MODELS}:llama", "--passes",
            "prune:mlp=0.25,unmerge=ls dotresize:heads=0.5 pca:residual=0.25,residual_maps=per_layer", "--data",
            "random", "--calib-samples", "4", "--seq-len", "16"]
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([sys.executable, "-m", "dotresize_fx.cli", *args, "--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "dotresize_fx.cli", *args, "--out",
                    str(tmp_path / "two")], check=True, capture_output=True)
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6
    assert json.loads((tmp_path / "two" / "report.json").read_text())["ranks"] == 2


def test_weights_kept_on_disk_give_the_same_model_as_in_memory(tmp_path):
    """--offload-folder on a checkpoint: every weight is memory-mapped from the folder (also after the rewrite
    replaced it), the saved model equals the in-memory run's bit for bit, in the dtype asked for, and the folder
    is gone at the end."""
    load(f"{MODELS}:llama").model.save_pretrained(tmp_path / "ckpt")
    passes = "prune:mlp=0.25,unmerge=ls,ls_target=dense dotresize:heads=0.5 pca:residual=0.25,residual_maps=per_layer"
    reports = {}
    for name, folder in (("memory", None), ("disk", str(tmp_path / "offload"))):
        reports[name] = run(Job(str(tmp_path / "ckpt"), PassSpec.parse(passes), data="random", calib_samples=4,
                                seq_len=16, dtype="bfloat16", out=str(tmp_path / name), progress=False,
                                offload_folder=folder))
    memory, disk = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("memory", "disk"))
    assert memory.keys() == disk.keys() and all(torch.equal(memory[k], disk[k]) for k in memory)
    assert {t.dtype for t in disk.values()} == {torch.bfloat16}
    compressed = reports["disk"]["_model"]
    assert all(p.untyped_storage().filename.startswith(str(tmp_path / "offload"))
               for p in compressed.parameters())
    assert reports["disk"]["offload"]["written_mb"] > 0 and not (tmp_path / "offload").exists()
    assert all(p.untyped_storage().filename is None for p in reports["memory"]["_model"].parameters())
