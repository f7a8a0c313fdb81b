"""`dotresize-fx eval OUT --tasks`: lm-evaluation-harness scores a compressed directory on a task written as a
local jsonl file, with the accuracy one computes by hand from the model's log-likelihoods."""
import json
import random
from pathlib import Path

import pytest
import torch

from dotresize_fx.cli import main
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import load

FACTORY = str(Path(__file__).resolve().parents[1] / "models.py")
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _task(folder: Path, n: int = 12) -> list[dict]:
    r = random.Random(0)
    docs = [{"context": " ".join(f"w{r.randrange(100)}" for _ in range(5)),
             "choices": [f"w{r.randrange(100)} w{r.randrange(100)}" for _ in range(3)], "answer": r.randrange(3)}
            for _ in range(n)]
    folder.mkdir()
    (folder / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny.yaml").write_text(TASK.format(data=folder / "tiny.jsonl"))
    return docs


def _accuracy(model, tok, docs) -> float:
    """log p(" " + choice | context), summed over the choice's tokens; the argmax against the answer."""
    right = 0
    for d in docs:
        ctx = tok(d["context"])["input_ids"]
        scores = []
        for c in d["choices"]:
            ids = tok(d["context"] + " " + c)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    return right / len(docs)


def test_eval_tasks_scores_a_compressed_directory_on_a_local_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = _task(tmp_path / "tasks")
    out = tmp_path / "o"
    assert main(["compress", f"{FACTORY}:llama_with_tokenizer", "--method", "prune", "--mlp", "0.25",
                 "--data", "random", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--tasks", "tiny_mc", "--tasks-dir", str(tmp_path / "tasks"),
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    loaded = load(out)
    assert result["n_samples"]["tiny_mc"]["effective"] == len(docs)
    assert result["tasks"]["tiny_mc"]["acc,none"] == pytest.approx(_accuracy(loaded.model, loaded.tokenizer, docs))


def test_eval_tasks_errors_name_the_cause(tmp_path, monkeypatch):
    from dotresize_fx.lmeval import run_tasks
    from dotresize_fx.load import load as load_model
    loaded = load_model(f"{FACTORY}:llama_with_tokenizer")
    with pytest.raises(DotResizeError, match="no such folder"):
        run_tasks(loaded.model, loaded.tokenizer, ["tiny_mc"], tasks_dir=str(tmp_path / "missing"))
    with pytest.raises(DotResizeError, match="--limit 0"):
        run_tasks(loaded.model, loaded.tokenizer, ["tiny_mc"], limit=0)
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)   # as if lm-eval were not installed
    with pytest.raises(DotResizeError, match=r"pip install 'dotresize-fx\[eval\]'"):
        run_tasks(loaded.model, loaded.tokenizer, ["tiny_mc"])
