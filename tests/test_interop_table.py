"""Two-way rename tables and per-implementation resampling: hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from vitkit.interop.table import RenameTable
from vitkit.model.pos_embed import POS_RESAMPLERS as RESAMPLERS
from vitkit.model.pos_embed import resample_hf, resample_timm


def test_rename_table_both_directions_and_dropped_notes():
    t = RenameTable([("blocks.{i}.fc.{p}", "layer.{i}.dense.{p}"), ("blocks.{i}.fc.{p}", "layers.{i}.fc.{p}"),
                     ("cls_token", "cls")], dropped={"mask": "unused at inference"})
    src = {"layer.3.dense.weight": torch.ones(1), "layers.4.fc.bias": torch.zeros(1), "cls": torch.ones(1),
           "mask": torch.ones(1), "other": torch.ones(1)}
    notes: list[str] = []
    out, unmatched = t.to_vitkit(src, notes)
    assert set(out) == {"blocks.3.fc.weight", "blocks.4.fc.bias", "cls_token"}
    assert unmatched == ["other"] and notes == ["mask ignored: unused at inference"]
    back, left = t.from_vitkit({**out, "head.weight": torch.ones(1)})
    # export writes the first spelling of each name (the file names), and reports what has none
    assert set(back) == {"layer.3.dense.weight", "layer.4.dense.bias", "cls"} and left == ["head.weight"]


@pytest.mark.parametrize("name", list(RESAMPLERS))
def test_every_resampler_is_the_identity_on_the_same_grid(name):
    pos = torch.randn(1, 1 + 12, 8)
    assert torch.equal(RESAMPLERS[name](pos, (3, 4), (3, 4), 1), pos)


def test_hf_and_timm_resampling_differ_both_ways():
    """torch's antialiased bicubic (timm) uses PIL's cubic coefficient a=-0.5, the plain one (HF)
    a=-0.75: they differ when enlarging too, which is why each source gets its own function."""
    pos = torch.randn(1, 1 + 36, 8)
    up_hf, up_timm = resample_hf(pos, (9, 9), (6, 6), 1), resample_timm(pos, (9, 9), (6, 6), 1)
    assert (up_hf - up_timm).abs().max() > 1e-3
    down_hf, down_timm = resample_hf(pos, (4, 4), (6, 6), 1), resample_timm(pos, (4, 4), (6, 6), 1)
    assert (down_hf - down_timm).abs().max() > 1e-3
    assert torch.equal(down_hf[:, :1], pos[:, :1])  # the prefix row is kept as it is
