"""The distill pass: its loss, its early stopping, and the saved model it leaves."""
from pathlib import Path

import pytest
import torch

from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import load
from passes.distill import coarse_kl

FACTORY = str(Path(__file__).resolve().parents[1] / "models.py")


def _full_kl(t_logits, s_logits):
    p, logq = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    return (p.exp() * (p - logq)).sum(-1)


def test_coarse_kl_is_the_full_kl_when_k_covers_the_output_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 5, 40, generator=g) * 3, torch.randn(3, 5, 40, generator=g) * 3
    full = _full_kl(teacher, student)
    logp = torch.log_softmax(teacher, -1)
    every = logp.topk(40, -1)
    torch.testing.assert_close(coarse_kl(student, *every), full, rtol=1e-5, atol=1e-6)
    some = coarse_kl(student, *logp.topk(8, -1))
    assert (some <= full + 1e-6).all() and (some > 0).all() and not torch.allclose(some, full)
    assert coarse_kl(teacher, *logp.topk(8, -1)).abs().max() < 1e-5     # the teacher itself: zero


def _job(passes, tmp_path, name="out", **kw):
    return Job(f"{FACTORY}:llama", PassSpec.parse(passes), data="random", progress=False, out=str(tmp_path / name),
               **{"calib_samples": 32, **kw})


def test_distill_lowers_the_held_out_loss_and_the_saved_model_carries_its_weights(tmp_path):
    pruned = run(_job("prune:mlp=0.75,heads=0.5", tmp_path, "p"))["_model"]
    report = run(_job("prune:mlp=0.75,heads=0.5 distill:epochs=3,lr=1e-3", tmp_path))
    d = report["passes"][1]
    assert d["method"] == "distill" and d["best_epoch"] >= 1
    assert d["held_out_loss"][d["best_epoch"]] < 0.9 * d["held_out_loss"][0]
    assert (d["train_batches"], d["held_out_batches"]) == (24, 8)   # random data: 32 batches, every 4th held out
    model, ids = report["_model"], torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    assert model.model.layers[0].mlp.down_proj.weight.shape == pruned.model.layers[0].mlp.down_proj.weight.shape
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(pruned.named_parameters())[n])]
    assert "model.embed_tokens.weight" not in changed and "model.layers.0.mlp.up_proj.weight" in changed
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "out").model(ids).logits, model(ids).logits)


def test_distill_that_only_hurts_returns_the_weights_it_was_given(tmp_path):
    pruned = run(_job("prune:mlp=0.5,unmerge=ls", tmp_path, "p"))["_model"]
    report = run(_job("prune:mlp=0.5,unmerge=ls distill:epochs=2,lr=1e-2", tmp_path))   # already near the teacher
    d = report["passes"][1]
    assert d["best_epoch"] == 0 and d["held_out_loss"][1] > d["held_out_loss"][0] and len(d["held_out_loss"]) == 2
    for (name, p), q in zip(report["_model"].named_parameters(), pruned.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("passes, kw, message", [
    ("distill", {}, "after a width pass"),
    ("prune:mlp=0.5 distill:lr=2", {}, "lr=2"),
    ("prune:mlp=0.5 distill:loss=l1", {}, "kl, mse"),
    ("prune:mlp=0.5 distill:epoch=2", {}, "unknown option 'epoch'"),
    ("prune:mlp=0.5 distill:micro_batch=0", {}, "micro_batch=0"),
    ("prune:mlp=0.5 distill", {"calib_samples": 3}, "raise --calib-samples"),
])
def test_distill_refuses_what_it_cannot_do(passes, kw, message, tmp_path):
    with pytest.raises(DotResizeError, match=message):
        run(_job(passes, tmp_path, **kw))


def test_distill_trains_on_its_own_number_of_windows(tmp_path):
    report = run(_job("prune:mlp=0.75,heads=0.5 distill:epochs=1,lr=1e-3,samples=12", tmp_path, calib_samples=4))
    d = report["passes"][1]
    assert (d["train_batches"], d["held_out_batches"]) == (9, 3)


def test_distill_built_outside_a_job_says_it_needs_the_dense_outputs():
    from passes import PassContext, build, width_config
    spec = PassSpec.parse("distill")[0]
    with pytest.raises(DotResizeError, match="dense model's outputs"):
        build(spec, width_config(spec), PassContext(analysis=None, inputs=(), batches=[]))


def test_micro_batches_train_as_the_whole_batch_does(tmp_path):
    """Pieces of 3 and 1 sequences of each batch of 4, their losses weighted by share: the same steps."""
    passes = "prune:mlp=0.75,heads=0.5 distill:epochs=2,lr=1e-3,micro_batch="
    whole, pieces = (run(_job(passes + n, tmp_path, f"m{n}")) for n in ("4", "3"))
    torch.testing.assert_close(pieces["passes"][1]["held_out_loss"], whole["passes"][1]["held_out_loss"], rtol=1e-4,
                               atol=0)
    assert pieces["passes"][1]["best_epoch"] == whole["passes"][1]["best_epoch"] == 2
    for (name, p), q in zip(pieces["_model"].named_parameters(), whole["_model"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_a_bfloat16_model_trains_float32_master_weights_and_stays_bfloat16(tmp_path):
    pruned = run(_job("prune:mlp=0.75,heads=0.5", tmp_path, "p", dtype="bfloat16"))["_model"]
    report = run(_job("prune:mlp=0.75,heads=0.5 distill:epochs=2,lr=1e-3", tmp_path, dtype="bfloat16"))
    d, model = report["passes"][1], report["_model"]
    own = d["held_out_loss_in_dtype"]
    assert own["dtype"] == "bfloat16" and own["after"] < 0.9 * own["before"] and d["best_epoch"] >= 1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and report["dtype"] == "bfloat16"
    assert {b.dtype for b in model.buffers()} == {b.dtype for b in pruned.buffers()}   # inv_freq left alone
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), pruned.parameters())]
    assert sum(changed) > len(changed) // 2
    assert [p.requires_grad for p in model.parameters()] == [q.requires_grad for q in pruned.parameters()]
    saved = load(tmp_path / "out").model
    assert next(saved.parameters()).dtype == torch.bfloat16
    for (name, p), q in zip(saved.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
