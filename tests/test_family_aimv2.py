"""AIMv2 (vitkit.interop.aimv2): random-weight peers built by timm (``aimv2_*``) and transformers
(``Aimv2VisionModel`` / ``Aimv2Model``) themselves, read by vitkit.from_pretrained and compared in
fp32; the original apple/ml-aim layout checked through timm's own converter of it; exports loaded
strictly by the peers."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from vitkit.errors import CheckpointError, ConfigError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models import save_for_hf  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402
from transformers import Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel  # noqa: E402

TOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn anew (timm's SwiGLU init sets the gate near zero, which would hide the MLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _timm(**kw):
    return _randomize(timm.create_model("aimv2_large_patch14_224", pretrained=False, **kw))


TIMM_CONFIGS = [
    dict(embed_dim=32, depth=2, num_heads=2, img_size=28),
    dict(embed_dim=64, depth=2, num_heads=4, img_size=(28, 42), num_classes=5),
    dict(embed_dim=48, depth=1, num_heads=2, img_size=56, qkv_bias=True, proj_bias=True),
]


@pytest.mark.parametrize("kw", TIMM_CONFIGS)
def test_timm_hub_dir_and_state_dict(tmp_path, kw):
    ref = _timm(**kw)
    save_for_hf(ref, tmp_path / "hub", safe_serialization=True,
                model_args={k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    bare = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=kw["num_heads"], image_size=kw["img_size"])
    for model in (vitkit.from_pretrained(tmp_path / "hub"), bare):
        c = model.config
        assert (c.patch_norm, c.proj_bias, c.qkv_bias, c.norm_layer, c.norm_eps, c.class_token, c.pooling) == (
            True, kw.get("proj_bias", False), kw.get("qkv_bias", False), "rmsnorm", 1e-5, False, "mean")
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=TOL, rtol=0)
            torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=TOL, rtol=0)


def test_timm_export_loads_strictly(tmp_path):
    ref = _timm(**TIMM_CONFIGS[1])
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    model = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=4, image_size=(28, 42))
    model.export_to("timm", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["architecture"].startswith("aimv2_")
    back = timm.create_model(meta["architecture"], pretrained=False, **meta["model_args"]).eval()
    back.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=TOL, rtol=0)


HF_CONFIGS = [
    dict(),  # the default: attention-pooling head, learned table
    dict(use_head=False, hidden_size=64, num_attention_heads=4, image_size=42),
    dict(is_native=True),  # MAE sin-cos table per grid, any size
    dict(qkv_bias=True, mlp_bias=False),  # out_proj bias follows qkv_bias: proj_bias with zero MLP biases
    dict(qkv_bias=False, mlp_bias=True),
]


def _hf_config(**kw):
    base = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                patch_size=14)
    return Aimv2VisionConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", HF_CONFIGS)
def test_hf_vision_model(tmp_path, kw):
    ref = _randomize(Aimv2VisionModel(_hf_config(**kw)))
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    size = ref.config.image_size
    shapes = [(size, size)] + ([(42, 28)] if kw.get("is_native") else [])
    for hw in shapes:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            out = ref(pixel_values=x)
            torch.testing.assert_close(model.forward_features(x), out.last_hidden_state, atol=TOL, rtol=0)
            if out.pooler_output is not None:
                torch.testing.assert_close(model(x), out.pooler_output, atol=TOL, rtol=0)
    assert model.config.dynamic_img_size == bool(kw.get("is_native"))


@pytest.mark.parametrize("kw", [HF_CONFIGS[0], HF_CONFIGS[2], HF_CONFIGS[3]])
def test_hf_export_loads_strictly(tmp_path, kw):
    ref = _randomize(Aimv2VisionModel(_hf_config(**kw)))
    ref.save_pretrained(tmp_path / "in")
    vitkit.from_pretrained(tmp_path / "in").export_to("hf", tmp_path / "out")
    cfg = Aimv2VisionConfig.from_pretrained(tmp_path / "out")
    back = Aimv2VisionModel(cfg).eval()
    back.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a, b = back(pixel_values=x), ref(pixel_values=x)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=TOL, rtol=0)


def test_hf_lit_model_image_features(tmp_path):
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8, eos_token_id=63)
    ref = _randomize(Aimv2Model(Aimv2Config(vision_config=_hf_config().to_dict(), text_config=text,
                                            projection_dim=24)))
    ref.save_pretrained(tmp_path)
    model = vitkit.from_pretrained(tmp_path)
    assert model.config.num_classes == 24 and not model.config.head_bias
    assert any("text tower" in n for n in model.load_report.notes)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.get_image_features(pixel_values=x).pooler_output, atol=TOL, rtol=0)


def _ml_aim_from_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original apple/ml-aim names (aim-v2/aim/v2/torch: preprocessor.patchifier, trunk.blocks.N.norm_1,
    SwiGLUFFN fc1 / fc3 / fc2, post_trunk_norm) of a timm aimv2 state dict: the inverse of timm's _convert_aimv2."""
    out = {}
    for k, v in sd.items():
        k = k.replace("mlp.fc1_g", "mlp.fc1").replace("mlp.fc1_x", "mlp.fc3").replace("norm1", "norm_1")
        k = k.replace("norm2", "norm_2").replace("patch_embed.", "preprocessor.patchifier.")
        k = "preprocessor.pos_embed" if k == "pos_embed" else k
        k = "trunk.post_trunk_norm." + k[5:] if k.startswith("norm.") else k
        out["trunk." + k if k.startswith("blocks.") else k] = v
    return out


def test_ml_aim_original_layout(tmp_path):
    ref = _timm(embed_dim=32, depth=2, num_heads=2, img_size=28)
    orig = _ml_aim_from_timm(ref.state_dict())
    # the layout above is what timm's own converter reads back to its names
    assert checkpoint_filter_fn(orig, ref).keys() == ref.state_dict().keys()
    save_file(orig, tmp_path / "aim.safetensors")
    assert vitkit.interop.formats.detect_format(tmp_path / "aim.safetensors") == "ml_aim"
    model = vitkit.from_pretrained(tmp_path / "aim.safetensors", num_heads=2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=TOL, rtol=0)


def test_ml_aim_lit_head_and_v1_refused(tmp_path):
    """An AIMv2LiT file (names from ml-aim's AIMv2LiT: image_encoder. + AttentionPoolingClassifier k, v,
    cls_token, linear; image_projector) with the weights of a transformers Aimv2Model: the same image
    features. AIM v1 (no gated MLP) is refused with its reason."""
    from vitkit.interop.aimv2 import ML_AIM_TABLE

    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8, eos_token_id=63)
    ref = _randomize(Aimv2Model(Aimv2Config(vision_config=_hf_config().to_dict(), text_config=text,
                                            projection_dim=24)))
    ref.save_pretrained(tmp_path / "hf")
    sd = dict(vitkit.from_pretrained(tmp_path / "hf").state_dict())
    sd["attn_pool.k.weight"], sd["attn_pool.v.weight"] = sd.pop("attn_pool.kv.weight").chunk(2)
    for i in range(2):
        sd[f"blocks.{i}.mlp.gate.weight"], sd[f"blocks.{i}.mlp.up.weight"] = sd.pop(f"blocks.{i}.mlp.fc1.weight").chunk(2)
    projector = sd.pop("head.weight")
    orig, left = ML_AIM_TABLE.from_vitkit(sd)
    assert not left
    orig = {**{f"image_encoder.{k}": v for k, v in orig.items()}, "image_projector.weight": projector,
            "text_encoder.trunk.post_trunk_norm.weight": torch.ones(32), "log_logit_scale": torch.zeros(())}
    save_file(orig, tmp_path / "lit.safetensors")
    lit = vitkit.from_pretrained(tmp_path / "lit.safetensors", num_heads=2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(lit(x), ref.get_image_features(pixel_values=x).pooler_output, atol=TOL, rtol=0)
    v1 = {k: v for k, v in _ml_aim_from_timm(_timm(embed_dim=32, depth=1, num_heads=2, img_size=28).state_dict()).items()
          if ".mlp.fc3." not in k}
    save_file(v1, tmp_path / "v1.safetensors")
    with pytest.raises(CheckpointError, match="AIM v1"):
        vitkit.from_pretrained(tmp_path / "v1.safetensors")


def test_exports_refuse_what_the_layout_lacks(tmp_path):
    from vitkit.model.vit import ViT

    aim = ViT(dim=32, depth=1, num_heads=2, image_size=28, patch_size=14, class_token=False, pooling="map",
              map_head="aimv2", qkv_bias=False, proj_bias=False, patch_norm=True, norm_layer="rmsnorm",
              mlp_layer="swiglu", act="silu", num_classes=0)
    with pytest.raises(ConfigError, match="attention-pooling head|aimv2_"):
        aim.export_to("timm", tmp_path / "t")
    with pytest.raises(ConfigError):
        aim.export_to("torchvision", tmp_path / "tv")
    plain = ViT(dim=32, depth=1, num_heads=2, image_size=28, patch_size=14, num_classes=0)
    with pytest.raises(ConfigError, match="Aimv2VisionModel"):
        __import__("vitkit.interop.aimv2", fromlist=["export_hf"]).export_hf(plain, tmp_path / "h")
