"""NaFlex (SigLIP2 / timm NaFlexVit): images at their own aspect ratio, patches packed with a mask.
Oracles: transformers' Siglip2VisionModel / Siglip2Model and Siglip2ImageProcessor, timm's NaFlexVit,
and vitkit's own model called one image at a time (the packed batch must not change any image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.errors import ConfigError
from vitkit.io import save_state_dict
from vitkit.model.naflex import NaFlexBatch, naflex_transform, pack, size_for_max_patches

transformers = pytest.importorskip("transformers")
timm_naflex = pytest.importorskip("timm.models.naflexvit")

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# (patch, table patches, max_num_patches, image sizes (H, W) of one batch)
HF_CONFIGS = {
    "p4_t16_max24": (4, 16, 24, [(40, 90), (64, 64), (100, 20)]),  # padding in two images, one at the table's grid
    "p8_t16_max64_tanh": (8, 16, 64, [(30, 200), (120, 90)]),
    "p4_t36_max16_gelu": (4, 36, 16, [(50, 50), (10, 70), (90, 33)]),
}


def uint8_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def hf_naflex(tmp_path, patch, table, max_patches, whole=False, **kw):
    """A random transformers Siglip2 tower saved with its processor config, and vitkit's load of it."""
    torch.manual_seed(0)
    vision = dict(VISION, patch_size=patch, num_patches=table, **kw)
    if whole:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=1)
        ref = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=text))
    else:
        ref = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision))
    ref = randomize(ref)
    ref.save_pretrained(tmp_path)
    proc = transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=max_patches)
    proc.save_pretrained(tmp_path)
    return ref, proc, vitkit.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_siglip2_naflex_matches_transformers(name, tmp_path):
    patch, table, max_patches, sizes = HF_CONFIGS[name]
    kw = {"hidden_act": "gelu"} if name.endswith("gelu") else {}
    whole = name.endswith("tanh")
    ref, proc, model = hf_naflex(tmp_path, patch, table, max_patches, whole=whole, **kw)
    assert model.config.naflex_max_patches == max_patches and model.config.pos_resample == "big_vision"
    inp = proc(images=uint8_images(sizes), return_tensors="pt")
    mask = inp["pixel_attention_mask"].bool()
    assert not mask.all()  # padding present
    batch = NaFlexBatch(inp["pixel_values"], inp["spatial_shapes"], mask)
    with torch.no_grad():
        vision = ref.vision_model if whole else ref
        want = vision(**inp)
        tokens, pooled = model.forward_features(batch), model(batch)
    assert max_diff(tokens[mask], want.last_hidden_state[mask]) < 1e-5
    assert max_diff(pooled, want.pooler_output) < 1e-5


def test_siglip2_preprocessing_matches_the_processor(tmp_path):
    """Real photos at their aspect ratios (skimage) -> the same patches, mask and spatial shapes."""
    data = pytest.importorskip("skimage.data")
    photos = [data.astronaut()[:300], data.chelsea(), data.coffee()[50:, :180]]
    _, proc, model = hf_naflex(tmp_path, 8, 16, 40)
    want = proc(images=[torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1) for p in photos],
                return_tensors="pt")
    tf = naflex_transform(model)
    got = pack([tf(p) for p in photos], 8, length=40)
    assert torch.equal(got.grids, want["spatial_shapes"].long())
    assert torch.equal(got.mask, want["pixel_attention_mask"].bool())
    assert max_diff(got.patches, want["pixel_values"]) < 1e-5
    # the binary search itself, on sizes where rounding decides
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches
    for h, w, p, n in [(300, 451, 16, 256), (1, 999, 14, 100), (512, 512, 16, 64), (37, 5, 4, 7)]:
        assert size_for_max_patches(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n)


def timm_naflexvit(**kw):
    cfg = timm_naflex.NaFlexVitCfg(patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=(4, 4), **kw)
    return randomize(timm_naflex.NaFlexVit(cfg, num_classes=5))


def timm_inputs(batch: NaFlexBatch) -> dict:
    """timm's NaFlex inputs for a vitkit batch: (y, x) patch coordinates and the validity mask."""
    coord = torch.zeros(*batch.mask.shape, 2, dtype=torch.long)
    for i, (gh, gw) in enumerate(batch.grids.tolist()):
        yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[i, :gh * gw] = torch.stack([yy.flatten(), xx.flatten()], dim=1)
    return dict(patch_coord=coord, patch_valid=batch.mask)


TIMM_CONFIGS = {
    "map_reg1": dict(global_pool="map", reg_tokens=1),
    "avg_reg2_ls": dict(global_pool="avg", reg_tokens=2, fc_norm=True, init_values=1e-5),
    "token_bilinear": dict(global_pool="token", class_token=True, pos_embed_interp_mode="bilinear"),
}


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_timm_naflexvit_matches_timm(name, tmp_path):
    kw = TIMM_CONFIGS[name]
    ref = timm_naflexvit(**kw)
    state = dict(ref.state_dict())
    save_state_dict(state, tmp_path / "sd.safetensors")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_state_dict(state, hub / "model.safetensors")
    args = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=[4, 4], **kw)
    (hub / "config.json").write_text(json.dumps({"architecture": "naflexvit_base_patch16_gap", "model_args": args,
                                                 "pretrained_cfg": {"input_size": [3, 384, 384]}}))
    batch = pack([torch.randn(3, h, w) for h, w in [(12, 28), (16, 16), (40, 8)]], 4)
    with torch.no_grad():
        want = ref(batch.patches, **timm_inputs(batch))
        # a bare state dict cannot say the table's interpolation: the hub dir's model_args can
        bare = vitkit.from_pretrained(tmp_path / "sd.safetensors", num_heads=2,
                                      pos_resample="big_vision" if "bilinear" in name else "timm")
        for model in (bare, vitkit.from_pretrained(hub)):
            assert model.config.naflex_max_patches
            assert max_diff(model(batch), want) < 1e-5


def test_padding_and_batching_do_not_change_an_image(tmp_path):
    """Each image of a packed batch (padded to any length) = the model on that image alone, as an
    image tensor (the dynamic-size path) and as a batch of one; mean pooling counts real tokens only."""
    _, _, model = hf_naflex(tmp_path, 4, 16, 24)
    mean = vitkit.ViT(model.config.replace(pooling="mean"))
    imgs = [torch.randn(3, 12, 28), torch.randn(3, 16, 16), torch.randn(3, 36, 8)]
    for m in (model, mean):
        with torch.no_grad():
            packed = m(pack(imgs, 4, length=30))
            for i, x in enumerate(imgs):
                assert max_diff(packed[i], m(x[None])[0]) < 1e-5
                assert max_diff(packed[i], m(pack([x], 4))[0]) < 1e-5


def test_embed_and_predict_on_a_folder_of_mixed_aspect_photos(tmp_path):
    """vitkit embed / predict batch a NaFlex model's images packed with a mask: the same vectors as
    the model called on each preprocessed image alone."""
    from PIL import Image

    from vitkit.cli.predict import predict_files
    from vitkit.features.embed import embed_files

    _, _, model = hf_naflex(tmp_path / "m", 4, 16, 24)
    folder = tmp_path / "photos"
    folder.mkdir()
    g = np.random.default_rng(0)
    for k, (h, w) in enumerate([(30, 90), (64, 48), (100, 20), (33, 33)]):
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    tf = naflex_transform(model)
    files = sorted(str(p) for p in folder.iterdir())
    with torch.no_grad():
        want = torch.stack([model(tf(Image.open(f).convert("RGB"))[None])[0] for f in files])
    res = embed_files(model, [str(folder)], tmp_path / "emb.parquet", batch_size=3, workers=0, progress=False)
    assert res.rows == 4
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "emb.parquet").to_pydict()
    got = {p: torch.tensor(e) for p, e in zip(table["path"], table["embedding"])}
    assert max(max_diff(got[f], w) for f, w in zip(files, want)) < 1e-5
    preds = predict_files(model, files, batch_size=3)
    assert max(max_diff(torch.tensor(r["embedding"]), w) for r, w in zip(preds, want)) < 1e-5


def test_naflex_config_round_trips_and_is_checked():
    c = vitkit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, class_token=False,
                         pooling="map", pos_embed_prefix=False, dynamic_img_size=True, naflex_max_patches=24)
    assert vitkit.ViTConfig.from_dict(c.to_dict()) == c
    assert vitkit.ViTConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "naflex_max_patches"}
                                      ).naflex_max_patches is None  # configs saved before the field
    with pytest.raises(ConfigError, match="dynamic_img_size=True"):
        c.replace(dynamic_img_size=False)
    with pytest.raises(ConfigError, match="positive int"):
        c.replace(naflex_max_patches=0)
