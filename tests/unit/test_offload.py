"""Weights kept on disk: `Offload` writes accelerate's offload layout and maps the files back."""
import pytest
import torch
from accelerate.utils import OffloadedWeightsLoader

from dotresize_fx.errors import DotResizeError
from dotresize_fx.offload import Offload


def _tied():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    return torch.nn.ModuleDict({"emb": emb, "mid": torch.nn.Linear(4, 4), "head": head})


def test_store_maps_every_parameter_from_files_accelerate_reads(tmp_path):
    model = _tied()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    off = Offload(tmp_path / "w")
    assert off.store(model) == 3   # emb/head once: tied
    assert model["head"].weight is model["emb"].weight
    for name, p in model.named_parameters():
        assert off.is_stored(p) and torch.equal(p, want[name])
    on_disk = OffloadedWeightsLoader(save_folder=str(tmp_path / "w"))
    assert set(on_disk) == {"emb.weight", "mid.weight", "mid.bias"}
    assert all(torch.equal(on_disk[k], want[k]) for k in on_disk)
    assert off.store(model) == 0   # nothing left in memory: nothing written


def test_a_replaced_weight_is_written_again_and_the_old_file_stays_readable(tmp_path):
    model = _tied()
    off = Offload(tmp_path / "w")
    off.store(model)
    old = model["mid"].weight
    model["mid"].weight = torch.nn.Parameter(torch.ones(2, 4))   # a rewrite made it narrower
    assert not off.is_stored(model["mid"].weight)
    off.store(model)
    assert off.is_stored(model["mid"].weight) and torch.equal(model["mid"].weight, torch.ones(2, 4))
    assert old.shape == (4, 4) and torch.isfinite(old).all()   # unlinked, never overwritten under the map
    assert OffloadedWeightsLoader(save_folder=str(tmp_path / "w"))["mid.weight"].shape == (2, 4)


def test_cast_on_store_and_bfloat16_round_trip(tmp_path):
    model = _tied()
    want = model["mid"].weight.detach().to(torch.bfloat16)
    off = Offload(tmp_path / "w")
    off.store(model, dtype=torch.bfloat16)
    assert model["mid"].weight.dtype == torch.bfloat16 and torch.equal(model["mid"].weight, want)
    assert OffloadedWeightsLoader(save_folder=str(tmp_path / "w"))["mid.weight"].dtype == torch.bfloat16


def test_copy_is_on_disk_and_independent(tmp_path):
    model = _tied()
    off = Offload(tmp_path / "w")
    off.store(model)
    twin = off.copy(model)
    assert twin["head"].weight is twin["emb"].weight and off.is_stored(twin["mid"].weight)
    with torch.no_grad():
        twin["mid"].weight.zero_()
    assert model["mid"].weight.abs().sum() > 0


def test_close_removes_what_it_wrote_and_a_used_folder_is_refused(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("someone's")
    with pytest.raises(DotResizeError, match="new or empty directory"):
        Offload(tmp_path / "used")
    off = Offload(tmp_path / "w")
    model = _tied()
    off.store(model)
    off.close()
    assert not (tmp_path / "w").exists()
    assert torch.isfinite(model["mid"].weight).all()   # still mapped, still readable
