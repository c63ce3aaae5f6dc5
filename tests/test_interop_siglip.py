"""SigLIP image towers (attention-pooled) load exactly from Hugging Face (SiglipVisionModel, whole
SiglipModel), timm ``vit_*_siglip_*`` and big_vision ``.npz`` (stacked and unstacked blocks).
Oracles: transformers' Siglip classes, timm's VisionTransformer, timm's ``_load_weights`` (npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from test_interop_common import images, load_saved_hf, load_saved_timm, max_diff, randomize
from vitkit.io import save_state_dict

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HF_CONFIGS = {
    "p16_32": dict(image_size=32, patch_size=16),
    "p14_28": dict(image_size=28, patch_size=14),
    "p32_64_gelu": dict(image_size=64, patch_size=32, hidden_act="gelu", layer_norm_eps=1e-5),
}


def hf_model(whole: bool, **kw):
    torch.manual_seed(0)
    if whole:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=1)
        m = transformers.SiglipModel(transformers.SiglipConfig(vision_config={**VISION, **kw}, text_config=text))
    else:
        m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**VISION, **kw}))
    return randomize(m)


def hf_pooled(m, x, **kw):
    with torch.no_grad():
        if isinstance(m, transformers.SiglipModel):
            out = m.get_image_features(pixel_values=x, **kw)
            return out if torch.is_tensor(out) else out.pooler_output
        return m(pixel_values=x, **kw).pooler_output


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_siglip_dir_exact(whole, name, tmp_path):
    kw = HF_CONFIGS[name]
    ref = hf_model(whole, **kw)
    model = load_saved_hf(ref, tmp_path)
    x = images(kw["image_size"])
    with torch.no_grad():
        assert max_diff(model(x), hf_pooled(ref, x)) <= 1e-5
        if not whole:
            assert max_diff(model.forward_features(x), ref(pixel_values=x).last_hidden_state) <= 1e-5
    assert model.config.pooling == "map" and not model.config.class_token
    assert model.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    if whole:
        assert any("text tower" in n for n in model.load_report.notes)


@pytest.mark.parametrize("size", [48, (32, 64)])
def test_hf_siglip_other_size_matches_interpolate_pos_encoding(size, tmp_path):
    ref = hf_model(False, **HF_CONFIGS["p16_32"])
    model = load_saved_hf(ref, tmp_path, image_size=size)
    x = images(size)
    with torch.no_grad():
        assert max_diff(model(x), hf_pooled(ref, x, interpolate_pos_encoding=True)) <= 1e-5


def timm_siglip(**kw):
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, embed_dim=32, depth=2, num_heads=2, **kw)
    return randomize(m)


@pytest.mark.parametrize("kw", [dict(img_size=32, patch_size=16), dict(img_size=(32, 48), patch_size=16),
                                dict(img_size=28, patch_size=14, num_classes=5)])
def test_timm_siglip_state_dict_exact(kw, tmp_path):
    ref = timm_siglip(**kw)
    model, x = load_saved_timm(ref, kw["img_size"], tmp_path)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.config.pooling == "map"


def _unstack(path, out):
    """big_vision without scan: encoderblock_N/... instead of one stacked encoderblock/..."""
    with np.load(path) as f:
        w = {k: f[k] for k in f.files}
    res = {}
    for k, v in w.items():
        if "/Transformer/encoderblock/" in k:
            for i in range(v.shape[0]):
                res[k.replace("/encoderblock/", f"/encoderblock_{i}/")] = v[i]
        else:
            res[k] = v
    np.savez(out, **res)
    return out


@pytest.mark.parametrize("stacked", [True, False])
def test_big_vision_npz_exact_and_timm_loader_agrees(stacked, tmp_path):
    from timm.models.vision_transformer import _load_weights

    ref = timm_siglip(img_size=32, patch_size=16)
    save_state_dict(ref.state_dict(), tmp_path / "w.safetensors")
    mine = vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=2)
    npz = vitkit.interop.jax.export_npz(mine, tmp_path / "siglip.npz", layout="big_vision_img")
    if not stacked:
        npz = _unstack(npz, tmp_path / "siglip_unstacked.npz")
    with np.load(npz) as f:
        assert "params/img/MAPHead_0/probe" in f.files
    back = timm_siglip(img_size=32, patch_size=16)
    _load_weights(back, str(npz))  # independent oracle: timm's own big_vision reader
    # flax checkpoints mean tanh-GELU; the timm peer runs exact GELU, so the act is given here
    model = vitkit.from_pretrained(npz, act="gelu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(back(x), ref(x)) <= 1e-5
        assert max_diff(model(x), ref(x)) <= 1e-5
    assert model.pretrained_info["format"] == "jax" and model.config.num_heads == 2
