"""``ViTConfig.pos_resample``: dynamic image size resamples the position table as the weights'
source does. A model loaded at its native size and run with ``dynamic_img_size=True`` at another
size equals the source implementation run at that size. Oracles: transformers' Dinov2Model /
Dinov2WithRegistersModel (always interpolate), CLIPVisionModelWithProjection and
ViTForImageClassification (``interpolate_pos_encoding=True``), timm's ``dynamic_img_size``."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.config import POS_RESAMPLES, ViTConfig
from vitkit.errors import ConfigError
from vitkit.io import save_state_dict
from vitkit.model.pos_embed import POS_RESAMPLERS

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

SIZES = [42, (42, 98)]  # from a 4x4 grid (patch 14): shrink (where antialias matters), non-square


def loud_positions(module):
    """randomize()'s 0.2 std leaves the position table small beside the patch tokens; a larger one
    makes the difference between interpolations visible in the outputs."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "position" in name or "pos_embed" in name:
                p.mul_(10)
    return module.eval()


def _differs(model, x, want, other="timm"):
    """The same weights resampled as another implementation does give other numbers: the test can
    fail (the dynamic path used timm's interpolation for every source before pos_resample)."""
    other = vitkit.ViT(model.config.replace(pos_resample=other))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        return max_diff(other.eval()(x), want) > 5e-5  # 5x the tolerance the tests hold vitkit to


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", SIZES)
def test_hf_dinov2_dynamic_size_equals_hf(registers, size, tmp_path):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
              image_size=56)
    if registers:
        ref = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **kw))
    else:
        ref = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    ref = loud_positions(randomize(ref))
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path, dynamic_img_size=True)
    assert model.config.pos_resample == ("hf_dinov2_registers" if registers else "hf")
    assert model.config.image_hw == (56, 56)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = ref(pixel_values=x).pooler_output
        assert max_diff(model(x), want) <= 1e-5
    # WithRegisters' antialiased bicubic is timm's; it differs from plain Dinov2's
    assert _differs(model, x, want, "hf" if registers else "timm")


@pytest.mark.parametrize("size", [48, (32, 96)])
def test_hf_clip_dynamic_size_equals_hf(size, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=64, patch_size=16, projection_dim=24)
    ref = loud_positions(randomize(transformers.CLIPVisionModelWithProjection(cfg)))
    _hf_dynamic_equals_hf(ref, size, tmp_path, lambda out: out.image_embeds)
    # the user's choice wins over the source's
    assert vitkit.from_pretrained(tmp_path, pos_resample="timm").config.pos_resample == "timm"


@pytest.mark.parametrize("size", [48, (32, 96)])
def test_hf_vit_dynamic_size_equals_hf(size, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=16, num_labels=5)
    ref = loud_positions(randomize(transformers.ViTForImageClassification(cfg)))
    _hf_dynamic_equals_hf(ref, size, tmp_path, lambda out: out.logits)


def _hf_dynamic_equals_hf(ref, size, tmp_path, output):
    """``ref`` saved, loaded with dynamic_img_size: at ``size`` it equals ``output(ref(...,
    interpolate_pos_encoding=True))`` within 1e-5, and another interpolation would not."""
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path, dynamic_img_size=True)
    assert model.config.pos_resample == "hf"
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = output(ref(pixel_values=x, interpolate_pos_encoding=True))
        assert max_diff(model(x), want) <= 1e-5
    assert _differs(model, x, want)


@pytest.mark.parametrize("variant", ["vit_base_patch16_clip_224", "vit_base_patch16_224"])
def test_timm_dynamic_size_equals_timm(variant, tmp_path):
    torch.manual_seed(0)
    ref = randomize(timm.create_model(variant, pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=32,
                                      num_classes=5, dynamic_img_size=True)).eval()
    save_state_dict(ref.state_dict(), tmp_path / "w.safetensors")
    model = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2, image_size=32, dynamic_img_size=True)
    assert model.config.pos_resample == "timm"
    for hw in ((48, 48), (32, 64)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert max_diff(model(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("name", POS_RESAMPLES)
def test_dynamic_size_equals_set_image_size_for_every_resampler(name):
    """One resampler, two paths: the table resampled on the fly equals the table resampled in place."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2, num_classes=3,
                    dynamic_img_size=True, pos_resample=name)
    model = vitkit.ViT(cfg).eval()
    torch.nn.init.normal_(model.pos_embed)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        dynamic = model(x)
        model.set_image_size(56)
        assert max_diff(model(x), dynamic) <= 1e-6


def test_pos_resample_config_names_validation_and_old_configs():
    assert tuple(POS_RESAMPLERS) == POS_RESAMPLES  # the config's choices are the functions
    cfg = ViTConfig(pos_resample="dinov2")
    assert ViTConfig.from_json(cfg.to_json()).pos_resample == "dinov2"
    old = cfg.to_dict()
    del old["pos_resample"]  # a config saved before the field existed
    assert ViTConfig.from_dict(old).pos_resample == "timm"
    with pytest.raises(ConfigError, match="pos_resample must be one of.*'hf'.*got 'hff'"):
        ViTConfig(pos_resample="hff")


def test_vitkit_copy_saved_with_old_pretrained_info_key(tmp_path):
    """A copy saved when the name lived in pretrained_info["pos_resample"] keeps resampling as its source."""
    import json

    model = vitkit.ViT(ViTConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2, num_classes=0))
    torch.nn.init.normal_(model.pos_embed)
    vitkit.save_pretrained(model, tmp_path)
    meta_path = next(p for p in tmp_path.glob("*.json") if "pretrained_info" in p.read_text())
    meta = json.loads(meta_path.read_text())
    meta["pretrained_info"] = {"format": "hf", "pos_resample": "hf"}
    del meta["config"]["pos_resample"]  # the config of such a copy has no field
    meta_path.write_text(json.dumps(meta))
    loaded = vitkit.from_pretrained(tmp_path, image_size=56)
    assert loaded.config.pos_resample == "hf" and "pos_resample" not in loaded.pretrained_info
    assert vitkit.load_model(tmp_path).config.pos_resample == "hf"
    from vitkit.model.pos_embed import resample_hf
    assert max_diff(loaded.pos_embed, resample_hf(model.pos_embed.detach(), (4, 4), (2, 2), 1)) <= 1e-6
