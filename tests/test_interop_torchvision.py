"""torchvision ViT state dicts load exactly (vit_b_32-like, representation_size, ...), carry
torchvision's preprocessing, and vitkit's torchvision export loads back into torchvision."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize, tiny

tv = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

BASE = dict(num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
CONFIGS = {
    "vit_b_32_like": dict(image_size=64, patch_size=32, num_classes=1000),
    "representation_size": dict(image_size=32, patch_size=8, num_classes=10, representation_size=48),
    "input384ish": dict(image_size=96, patch_size=16, num_classes=10),
    "ten_classes_patch4": dict(image_size=16, patch_size=4, num_classes=10),
}


def make_tv(**kw):
    torch.manual_seed(0)
    return randomize(VisionTransformer(**{**BASE, **kw}))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torchvision_exact(name, tmp_path):
    kw = CONFIGS[name]
    ref = make_tv(**kw)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model = vitkit.from_pretrained(tmp_path / "tv.pth", num_heads=4)
    x = torch.randn(2, 3, kw["image_size"], kw["image_size"])
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.pretrained_info["format"] == "torchvision"
    pre = model.preprocess_cfg
    assert pre["crop_pct"] == 0.875 and pre["interpolation"] == "bilinear"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    if kw["num_classes"] == 1000:
        assert model.labels[0] == "tench" and len(model.labels) == 1000
    else:
        assert model.labels is None


def test_real_vit_b_32_shapes_meta():
    """The real torchvision vit_b_32 architecture maps one to one (checked on the meta device: names
    and shapes only, no weights needed)."""
    from vitkit.interop.torchvision import TABLE

    with torch.device("meta"):
        ref = tv.models.vit_b_32()
        mine = vitkit.create_model("vit_base_patch32_224")
    state, unmatched = TABLE.to_vitkit(ref.state_dict())
    assert not unmatched
    back, left = TABLE.from_vitkit(state)  # the same table exports
    assert not left and set(back) == set(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in mine.state_dict().items()}


def test_torchvision_export_roundtrip(tmp_path):
    model = tiny(dim=64, num_heads=4, head_hidden_dim=32)
    path = model.export_to("torchvision", tmp_path / "tv.safetensors")
    from safetensors.torch import load_file

    ref = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256,
                            num_classes=10, representation_size=32).eval()
    ref.load_state_dict(load_file(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("size", [48, 24])  # enlarge and shrink the 4x4 grid (patch 8)
def test_torchvision_at_another_size_resamples_as_interpolate_embeddings(size, tmp_path):
    """Loaded at another input size (and run there with dynamic_img_size), the table is resampled as
    torchvision's own interpolate_embeddings does it (bicubic, align_corners=True): the oracle is
    torchvision's model built at that size holding interpolate_embeddings' state dict."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    from test_pos_resample import _differs, loud_positions

    kw = dict(image_size=32, patch_size=8, num_classes=10)
    ref = loud_positions(make_tv(**kw))
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    there = loud_positions(make_tv(**{**kw, "image_size": size}))
    there.load_state_dict(interpolate_embeddings(size, 8, ref.state_dict()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = there(x)
        model = vitkit.from_pretrained(tmp_path / "tv.pth", num_heads=4, image_size=size).eval()
        assert model.config.pos_resample == "torchvision"
        assert max_diff(model(x), want) <= 1e-5
        dynamic = vitkit.from_pretrained(tmp_path / "tv.pth", num_heads=4, dynamic_img_size=True).eval()
        assert dynamic.config.image_hw == (32, 32)
        assert max_diff(dynamic(x), want) <= 1e-5
    assert _differs(dynamic, x, want)  # timm's interpolation would give other numbers
