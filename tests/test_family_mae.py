"""MAE encoders against their peers with the same weights: transformers' ViTMAEModel /
ViTMAEForPreTraining (random weights saved by transformers itself; run with mask_ratio 0 and
noise = arange(N) so HF keeps every patch in order) and timm's MAE layout (vit_*_224.mae, the
facebookresearch/mae ``{"model": ...}`` .pth). Tolerance 1e-5 in fp32."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.errors import InputError

transformers = pytest.importorskip("transformers")

# three encoder shapes: patch 8 on 32 px; patch 7 on 28 px with tanh GELU; one block, no qkv bias, 3 heads
CONFIGS = {
    "p8": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64),
    "p7_gelu_new": dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, hidden_act="gelu_new", layer_norm_eps=1e-6),
    "p16_no_qkv_bias": dict(image_size=32, patch_size=16, hidden_size=48, num_hidden_layers=1,
                            num_attention_heads=3, intermediate_size=96, qkv_bias=False),
}
DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
               decoder_intermediate_size=32)


def hf_model(cls_name: str, name: str, tmp_path, **extra):
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(**CONFIGS[name], **DECODER, mask_ratio=0.0, **extra)
    ref = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # random weights everywhere (the sin-cos table is MAE's own, kept)
        for n, p in ref.named_parameters():
            if "position_embeddings" not in n and "pos_embed" not in n:
                p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path / name)
    return getattr(transformers, cls_name).from_pretrained(tmp_path / name).eval(), tmp_path / name


def hf_tokens(encoder, x: torch.Tensor, **kw) -> torch.Tensor:
    """HF's last_hidden_state with every patch kept, in order (noise sorts to the identity)."""
    ph, pw = (encoder.config.patch_size,) * 2
    n = (x.shape[-2] // ph) * (x.shape[-1] // pw)
    noise = torch.arange(n, dtype=torch.float32).repeat(x.shape[0], 1)
    with torch.no_grad():
        return encoder(pixel_values=x, noise=noise, **kw).last_hidden_state


@pytest.mark.parametrize("cls_name", ["ViTMAEModel", "ViTMAEForPreTraining"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_vitmae_last_hidden_state(cls_name, name, tmp_path):
    ref, path = hf_model(cls_name, name, tmp_path)
    encoder = ref.vit if cls_name == "ViTMAEForPreTraining" else ref
    got = vitkit.from_pretrained(path)
    assert got.load_report.ok and got.pretrained_info["family"] == "mae"
    assert got.config.pos_resample == "hf" and not got.config.dynamic_img_size  # HF ViTMAE is fixed-size
    decoder_notes = [n for n in got.load_report.notes if "decoder" in n]
    assert bool(decoder_notes) == (cls_name == "ViTMAEForPreTraining")
    # the position table is the checkpoint's sin-cos table, class row zero
    table = encoder.embeddings.position_embeddings.detach()
    assert torch.equal(got.pos_embed.detach(), table) and not table[0, 0].any()
    x = torch.randn(2, 3, *(CONFIGS[name]["image_size"],) * 2)
    want = hf_tokens(encoder, x)
    with torch.no_grad():
        assert max_diff(got.forward_features(x), want) <= 1e-5
        assert max_diff(got(x), want[:, 0]) <= 1e-5


def test_hf_vitmae_other_size_only_as_interpolate_pos_encoding(tmp_path):
    ref, path = hf_model("ViTMAEModel", "p8", tmp_path)
    x = torch.randn(2, 3, 48, 40)
    with pytest.raises(InputError):  # HF refuses it too without interpolate_pos_encoding
        vitkit.from_pretrained(path)(x)
    got = vitkit.from_pretrained(path, image_size=(48, 40))
    want = hf_tokens(ref, x, interpolate_pos_encoding=True)
    with torch.no_grad():
        assert max_diff(got.forward_features(x), want) <= 1e-5


def test_hf_vitmae_export_round_trip(tmp_path):
    ref, path = hf_model("ViTMAEForPreTraining", "p7_gelu_new", tmp_path)
    model = vitkit.from_pretrained(path)
    out = model.export_to("hf", tmp_path / "out")
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "vit_mae" and meta["architectures"] == ["ViTMAEModel"]
    back = transformers.ViTMAEModel.from_pretrained(out).eval()
    x = torch.randn(2, 3, 28, 28)
    assert max_diff(hf_tokens(back, x), hf_tokens(ref.vit, x)) <= 1e-5


def _timm_mae(seed: int = 0):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    # timm's vit_base_patch16_224.mae at tiny width: class token, global_pool 'token', no fc_norm, no head
    return randomize(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="token")).eval()


def test_timm_mae_hub_dir(tmp_path):
    from vitkit.io import save_state_dict

    ref = _timm_mae()
    d = tmp_path / "vit_base_patch16_224.mae"
    d.mkdir()
    save_state_dict(ref.state_dict(), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 0, "num_features": 32, "global_pool": "token",
        "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "pretrained_cfg": {"tag": "mae", "input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.9,
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 0}}))
    got = vitkit.from_pretrained(d)
    assert got.load_report.ok and got.config.pooling == "cls" and not got.config.fc_norm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(got.forward_features(x), ref.forward_features(x)) <= 1e-5
        assert max_diff(got(x), ref(x)) <= 1e-5


def test_original_mae_pth(tmp_path):
    ref = _timm_mae(1)
    torch.save({"model": ref.state_dict()}, tmp_path / "mae_pretrain_vit_tiny.pth")  # the facebookresearch/mae file
    got = vitkit.from_pretrained(tmp_path / "mae_pretrain_vit_tiny.pth", num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(got(x), ref(x)) <= 1e-5
