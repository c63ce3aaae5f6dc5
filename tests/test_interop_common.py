"""Shared helpers of the interop tests, and tests of the shared pieces (rename tables, the
strict report, adapting to another resolution / class count / channel count, detection)."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.errors import CheckpointError
from vitkit.interop.common import LoadReport, adapt_state, load_into
from vitkit.io import save_state_dict


def randomize(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (LayerNorm, biases, tokens, layer-scale gammas included) a random value,
    so a wrongly mapped or dropped tensor cannot hide behind a default init of ones / zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def tiny(**kw) -> vitkit.ViT:
    cfg = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, num_heads=2)
    return randomize(vitkit.ViT(vitkit.ViTConfig(**{**cfg, **kw})))


def images(size) -> torch.Tensor:
    """A batch of 2 random RGB images; ``size``: an int (square) or (H, W)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(2, 3, *hw)


def load_saved_hf(ref, path, **hints) -> vitkit.ViT:
    """Save a transformers peer as a Hugging Face directory and load it back with vitkit."""
    ref.save_pretrained(path)
    return vitkit.from_pretrained(path, **hints)


def load_saved_timm(ref, img_size, path) -> tuple[vitkit.ViT, torch.Tensor]:
    """Save a timm peer's bare state dict and load it back with vitkit (the head count given, as a
    bare state dict cannot say it; a non-square size given too, as the pos table alone cannot say
    it). Returns (model, images at ``img_size``)."""
    save_state_dict(ref.state_dict(), path / "w.safetensors")
    size = img_size if isinstance(img_size, tuple) else (img_size,) * 2
    hint = {"image_size": size} if size[0] != size[1] else {}
    return vitkit.from_pretrained(path / "w.safetensors", num_heads=2, **hint), images(size)


# --------------------------------------------------------------------------- unit tests
def test_load_into_report_and_no_partial_copy_when_strict():
    model = tiny(depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    state["head.weight"] = torch.ones(3, 32)
    del state["norm.bias"]
    rep = LoadReport(source="x", format="test")
    with pytest.raises(CheckpointError, match=r"mis-shaped: head\.weight: model expects \[10, 32\], checkpoint has \[3, 32\]"):
        load_into(model, state, rep, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing copied
    rep = load_into(model, state, LoadReport(), strict=False)
    assert rep.missing == ["norm.bias"] and not rep.ok
    assert torch.equal(model.cls_token, torch.ones_like(model.cls_token))


def test_adapt_in_channels_sums_kernels_exactly():
    """A grey image replicated to RGB through the RGB model == the grey image through the summed kernel."""
    rgb = tiny()
    notes: list[str] = []
    new_cfg = rgb.config.replace(in_channels=1)
    state, _ = adapt_state(rgb.state_dict(), rgb.config, new_cfg, notes)
    grey = vitkit.ViT(new_cfg).eval()
    grey.load_state_dict(state)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert max_diff(grey(x), rgb(x.expand(-1, 3, -1, -1))) <= 1e-5
    assert any("summed" in n for n in notes)


def test_from_pretrained_vitkit_dir_adapt(tmp_path):
    """vitkit's own format through from_pretrained: exact; image_size resamples; in_channels=1 sums;
    num_classes re-initialises the head with a warning."""
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    same = vitkit.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert max_diff(same(x), model(x)) == 0.0
    assert same.pretrained_info["format"] == "vitkit"
    big = vitkit.from_pretrained(tmp_path / "m", image_size=64)
    assert big.pos_embed.shape == (1, 1 + 64, 32)
    assert big.preprocess_cfg is None or big.preprocess_cfg["input_size"] == [3, 64, 64]
    with pytest.warns(UserWarning, match="re-initialised"):
        other = vitkit.from_pretrained(tmp_path / "m", num_classes=4)
    assert other.head.weight.shape == (4, 32)
    assert torch.equal(other.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    assert any("re-initialised" in n for n in other.pretrained_info["report"]["notes"])


def test_resample_same_grid_is_identity_and_224_to_384(tmp_path):
    model = tiny(image_size=224, patch_size=16, depth=1)
    model.save_pretrained(tmp_path / "m")
    same = vitkit.from_pretrained(tmp_path / "m", image_size=224)
    assert torch.equal(same.pos_embed, model.pos_embed)
    big = vitkit.from_pretrained(tmp_path / "m", image_size=384)
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(big.pos_embed[:, :1], model.pos_embed[:, :1])  # class row kept as is
    small = vitkit.from_pretrained(tmp_path / "m", image_size=32)
    assert small.pos_embed.shape == (1, 1 + 4, 32)
    # the resampled table is a smooth version: its mean over the grid stays close
    assert max_diff(small.pos_embed[0, 1:].mean(0), model.pos_embed[0, 1:].mean(0)) < 0.05


def test_detect_format_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        vitkit.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        vitkit.from_pretrained(tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        vitkit.from_pretrained(tmp_path / "junk.safetensors")
