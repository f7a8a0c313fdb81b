"""Bad input through the CLI: exit ≠ 0, one line that names the cause and the fix, and no output left behind."""
from pathlib import Path

import pytest

from dotresize_fx.cli import main

MODELS = str(Path(__file__).resolve().parents[1] / "models.py")
BAD_FACTORY = '''
import torch
def just_a_model():
    return torch.nn.Linear(4, 4)
'''


def _compress(model, tmp_path, *args, data="random"):
    return ["compress", model, "--data", data, "--calib-samples", "2", "--seq-len", "16", "--eval-tokens", "30",
            "--out", str(tmp_path / "out"), *args]


def _fails_with(argv, capsys, *words, out: Path | None = None):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--passes", "shrink:mlp=0.2"], ["unknown pass 'shrink'", "prune", "dotresize"]),
    (["--passes", "dotresize:mlp=0.25,cost=l3"], ["cost='l3' is not a choice", "l2, cosine"]),
    (["--passes", "dotresize:mlp=0.25,marginals=unifrom"], ["marginals='unifrom'", "uniform, energy, semi"]),
    (["--passes", "prune:mlp=0.25,importance=wanda"], ["importance='wanda'", "act_weight"]),
    (["--passes", "prune:mlp=0.25,unmerge=ot"], ["unmerge='ot'", "select, ls"]),
    (["--passes", "dotresize:mlp=0.25,unmerge=select"], ["unmerge='select'", "ot, pinv, ls"]),
    (["--passes", "dotresize:mlp=0.25,regg=0.1"], ["unknown option 'regg'", "reg"]),
    (["--passes", "dotresize:mlp=0.25,refine=maybe"], ["refine='maybe'", "1 or 0"]),
    (["--method", "prune", "--mlp", "0"], ["mlp=0.0", "(0, 1)"]),
    (["--method", "prune", "--mlp", "1.0"], ["mlp=1.0", "(0, 1)"]),
    (["--method", "prune", "--heads", "0.95"], ["remove every head", "lower the fraction"]),
    (["--method", "prune", "--mlp", "0.01"], ["rounds to no change", "raise the fraction"]),
    (["--method", "prune"], ["no targets", "mlp=0.25"]),
    (["--method", "prune", "--mlp", "0.25", "--opset", "12"], None),
])
def test_bad_options(args, words, tmp_path, capsys):
    argv = _compress(f"{MODELS}:llama", tmp_path, *args)
    if words is None:   # argparse's own refusal: usage plus one error line naming the flag and its range
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--opset" in err.splitlines()[-1] and "18..23" in err
        return
    _fails_with(argv, capsys, *words, out=tmp_path / "out")


def test_a_target_that_matches_no_group_names_the_kinds(tmp_path, capsys):
    line = _fails_with(_compress(f"{MODELS}:cnn", tmp_path, "--method", "prune", "--mlp", "0.25"), capsys,
                       "mlp=0.25 matches no group", "channels", out=tmp_path / "out")
    assert "analyze" in line


def test_missing_model_path(tmp_path, capsys):
    _fails_with(_compress(str(tmp_path / "nowhere"), tmp_path, "--method", "prune", "--mlp", "0.25"), capsys,
                "unknown model spec", "Hugging Face directory", out=tmp_path / "out")
    _fails_with(_compress(f"{tmp_path}/nope.py:f", tmp_path, "--method", "prune", "--mlp", "0.25"), capsys,
                "does not exist", "check the path", out=tmp_path / "out")


def test_factory_with_the_wrong_shape(tmp_path, capsys):
    (tmp_path / "f.py").write_text(BAD_FACTORY)
    _fails_with(_compress(f"{tmp_path / 'f.py'}:just_a_model", tmp_path, "--method", "prune", "--mlp", "0.25"),
                capsys, "returned Linear", "(nn.Module, example_inputs_tuple)", out=tmp_path / "out")


def test_corrupt_weights(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["compress", f"{MODELS}:nanogpt", "--method", "prune", "--mlp", "0.5", "--data", "random",
                 "--calib-samples", "2", "--out", str(src)]) == 0
    capsys.readouterr()
    import json
    weights = json.loads((src / "resize_plan.json").read_text())["weights"]     # model.pt2: a program
    (src / weights).write_bytes(b"not a weights file")
    _fails_with(_compress(str(src), tmp_path, "--method", "prune", "--mlp", "0.25"), capsys, "corrupt",
                "compress again", out=tmp_path / "out")


def test_output_inside_the_input_or_existing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    argv = ["compress", str(src), "--method", "prune", "--mlp", "0.25", "--data", "random", "--out"]
    _fails_with(argv + [str(src / "sub")], capsys, "inside the input model's directory", "choose another",
                out=src / "sub")
    (tmp_path / "taken").mkdir()
    _fails_with(["compress", f"{MODELS}:llama", "--method", "prune", "--mlp", "0.25", "--data", "random",
                 "--out", str(tmp_path / "taken")], capsys, "exists", "--overwrite")
    assert not any((tmp_path / "taken").iterdir())


def test_text_too_short_for_the_calibration(tmp_path, capsys):
    (tmp_path / "short.txt").write_text(" ".join(f"w{i % 50}" for i in range(40)))
    _fails_with(_compress(f"{MODELS}:llama_with_tokenizer", tmp_path, "--method", "prune", "--mlp", "0.25",
                          "--calib-samples", "40", data=str(tmp_path / "short.txt")), capsys,
                "too few for 40 windows of 16",
                "lower --calib-samples", out=tmp_path / "out")


@pytest.mark.parametrize("passes,words", [
    ("prune:mlp=0.25 quantize:int8,block_size=32", ["block_size", "weight_only=1"]),
    ("prune:mlp=0.25 quantize:int4,per_channel=1", ["per_channel", "block_size"]),
    ("prune:mlp=0.25 quantize:int8,weight_only=1,algo=hqq", ["hqq", "4-bit only"]),
    ("prune:mlp=0.25 quantize:int4,samples=8", ["samples", "algo=gptq"]),
])
def test_quantize_options_that_do_not_apply_are_refused(passes, words, tmp_path, capsys):
    """An option the scheme would ignore is an error before any work is done."""
    _fails_with(_compress(f"{MODELS}:llama", tmp_path, "--passes", passes), capsys, *words,
                out=tmp_path / "out")
