"""DINOv3 (RoPE, registers, LayerScale, gated MLP) from transformers' DINOv3ViTModel, loaded exactly
into one vitkit.ViT: outputs, attention maps and train-mode RoPE augmentation against transformers
with random weights; any input size; the parts around it (Predictor, checkpointing, save, export)."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_interop_common import max_diff
from vitkit import ViTConfig
from vitkit.errors import ConfigError
from vitkit.model.rope import patch_centres

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("this transformers has no DINOv3ViTModel", allow_module_level=True)


def make_ref(tmp_path, gated=False, registers=4, **kw):
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, num_register_tokens=registers, image_size=32,
                                       patch_size=8, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                                       layerscale_value=0.5, **kw)
    ref = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # off the init: biases, layer scales and tokens all non-trivial
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path / "d3")
    return ref, tmp_path / "d3"


@pytest.mark.parametrize("gated,registers", [(False, 4), (True, 0)])
def test_dinov3_matches_transformers_at_any_size(gated, registers, tmp_path):
    ref, path = make_ref(tmp_path, gated, registers)
    model = vitkit.from_pretrained(path).eval()
    c = model.config
    assert (c.rope, c.pos_embed, c.num_registers, c.dynamic_img_size) == ("dinov3", "none", registers, True)
    assert c.mlp_layer == ("swiglu" if gated else "mlp") and c.norm_eps == 1e-5
    assert model.pretrained_info["family"] == "dinov3"
    for hw in ((32, 32), (48, 64), (24, 40)):  # native, larger and non-square, smaller
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            out = ref(pixel_values=x)
            assert max_diff(model.forward_features(x), out.last_hidden_state) <= 1e-5
            assert max_diff(model(x), out.pooler_output) <= 1e-5  # the class-token-only last block


def test_dinov3_attention_maps_match_transformers_eager(tmp_path):
    ref, path = make_ref(tmp_path, attn_implementation="eager")
    model = vitkit.from_pretrained(path).eval()
    x = torch.randn(1, 3, 40, 32)
    with torch.no_grad():
        want = ref(pixel_values=x, output_attentions=True).attentions
        _, got = model(x, return_attention=True)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a.shape == b.shape == (1, 4, 1 + 4 + 20, 1 + 4 + 20)
        assert max_diff(a, b) <= 1e-6


def test_dinov3_train_mode_rope_augmentation_draws_as_transformers(tmp_path):
    """shift, jitter and rescale of the patch coordinates in train mode: drawn from the global
    generator in transformers' order and shapes, so with one seed both give the same tokens; eval
    is deterministic and differs from a train-mode forward."""
    ref, path = make_ref(tmp_path, pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=2.0)
    model = vitkit.from_pretrained(path)
    assert (model.config.rope_shift, model.config.rope_jitter, model.config.rope_rescale) == (0.1, 1.2, 2.0)
    x = torch.randn(2, 3, 32, 32)
    ref.train()
    model.train()
    with torch.no_grad():
        torch.manual_seed(5)
        want = ref(pixel_values=x).last_hidden_state
        torch.manual_seed(5)
        got = model.forward_features(x)
        assert max_diff(got, want) <= 1e-5
        model.eval()
        a, b = model.forward_features(x), model.forward_features(x)
    assert torch.equal(a, b) and max_diff(a, got) > 1e-3


def test_dinov3_checkpointing_predictor_save_and_export(tmp_path):
    _, path = make_ref(tmp_path)
    model = vitkit.from_pretrained(path)
    x, y = torch.randn(2, 3, 32, 48), torch.randn(2, 64)
    model.eval()
    torch.nn.functional.mse_loss(model(x), y).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, want[k]), k
    model.set_grad_checkpointing(False)

    from vitkit.infer import Predictor

    pred = Predictor(model, "fp32")  # the engine does not walk RoPE: the model's own forward, said
    assert pred.path == "model" and any("rope" in n for n in pred.notes)
    with torch.no_grad():
        assert torch.equal(pred(x), model(x))
        back = vitkit.from_pretrained(vitkit.save_pretrained(model, tmp_path / "mine")).eval()
        assert back.config.rope == "dinov3" and torch.equal(back(x), model(x))
    with pytest.raises(ConfigError, match="rotary position embedding.*timm"):
        model.export_to("hf", tmp_path / "h")
    out = model.export_to("timm", tmp_path / "t")  # timm's Eva holds DINOv3's RoPE (vitkit.interop.eva)
    with torch.no_grad():
        assert max_diff(vitkit.from_pretrained(out).eval()(x), model(x)) <= 1e-5


def test_patch_centres_and_rope_config_checks():
    torch.testing.assert_close(patch_centres((2, 3)), torch.tensor(
        [[-0.5, -2 / 3], [-0.5, 0.0], [-0.5, 2 / 3], [0.5, -2 / 3], [0.5, 0.0], [0.5, 2 / 3]]))
    with pytest.raises(ConfigError, match="rope must be one of.*did you mean 'dinov3'"):
        ViTConfig(rope="dinov")
    with pytest.raises(ConfigError, match="head_dim divisible by 4, got 6"):
        ViTConfig(dim=12, num_heads=2, rope="dinov3")
    with pytest.raises(ConfigError, match="rope_rescale must be None or >= 1"):
        ViTConfig(rope="dinov3", rope_rescale=0.5)
    old = ViTConfig().to_dict()
    for k in ("rope", "rope_theta", "rope_shift", "rope_jitter", "rope_rescale"):
        del old[k]  # a config saved before RoPE
    assert ViTConfig.from_dict(old).rope == "none"


def test_rope_position_similarity_is_the_kernel_its_rotations_put_on_equal_queries_and_keys():
    """Hand case: head_dim 4 gives one frequency (theta**0 = 1); a 1 x 3 grid has x centres -2/3, 0,
    2/3 and y 0, so neighbours differ by an angle 2 pi * 2/3 on x and 0 on y: the mean cosine over
    [y, x, y, x] is (1 + cos(4 pi / 3)) / 2 = 0.25; two apart: cos(8 pi / 3) likewise -0.5 -> 0.25."""
    from vitkit.viz import posemb_similarity

    model = vitkit.ViT(ViTConfig(image_size=(8, 24), patch_size=8, dim=8, num_heads=2, depth=1, num_classes=0,
                                 pos_embed="none", rope="dinov3"))
    sim = posemb_similarity(model)
    assert sim.shape == (1, 3, 1, 3)
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(sim[0, :, 0, :], [[1, 0.25, 0.25], [0.25, 1, 0.25], [0.25, 0.25, 1]], atol=1e-6)  # angles in fp32, as DINOv3


# ---- timm (Eva) and the original facebookresearch/dinov3 layout; timm's Eva is the oracle ----------
timm = pytest.importorskip("timm")
SMALL = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=0)


def make_timm(name: str, pool: str):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, global_pool=pool, **SMALL).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return ref


@pytest.mark.parametrize("name,pool", [("vit_small_patch16_dinov3", "token"), ("vit_small_patch16_dinov3_qkvb", "avg"),
                                       ("vit_huge_plus_patch16_dinov3", "token")])
def test_timm_dinov3_state_dict_and_hub_dir(name, pool, tmp_path):
    import json

    from vitkit.io import save_state_dict

    ref = make_timm(name, pool)
    save_state_dict(ref.state_dict(), tmp_path / "w.safetensors")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_state_dict(ref.state_dict(), hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": name, "model_args": {**SMALL, "global_pool": pool},
                                                 "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406],
                                                                    "std": [0.229, 0.224, 0.225], "crop_pct": 1.0,
                                                                    "interpolation": "bicubic"}}))
    x = torch.randn(2, 3, 40, 24)  # any size: RoPE
    with torch.no_grad():
        want, want_tokens = ref(x), ref.forward_features(x)
        for src, kw in ((hub, {}), (tmp_path / "w.safetensors", {"num_heads": 4})):
            model = vitkit.from_pretrained(src, **kw).eval()
            assert model.pretrained_info["family"] == "dinov3" and model.config.rope == "dinov3"
            if src == hub:
                assert model.config.pooling == ("cls" if pool == "token" else "mean")
                assert max_diff(model(x), want) <= 1e-5
                assert model.preprocess_cfg["interpolation"] == "bicubic"
            assert max_diff(model.forward_features(x), want_tokens) <= 1e-5


def _original_from_timm(ref) -> dict[str, torch.Tensor]:
    """The facebookresearch/dinov3 layout of a timm Eva DINOv3 (timm's checkpoint_filter_fn inverted;
    the test checks that timm maps it back)."""
    out: dict[str, torch.Tensor] = {"mask_token": torch.zeros(1, SMALL["embed_dim"])}
    hd = SMALL["embed_dim"] // SMALL["num_heads"]
    out["rope_embed.periods"] = 100.0 ** (4 * torch.arange(hd // 4, dtype=torch.float32) / hd)
    for k, v in ref.state_dict().items():
        if k.endswith("attn.q_bias"):
            vb = ref.state_dict()[k.replace("q_bias", "v_bias")]
            junk = torch.randn_like(v)  # what the original stores for k; its bias_mask zeroes it
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, junk, vb])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones_like(v), torch.zeros_like(v),
                                                                   torch.ones_like(v)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        if ".mlp.fc2." in k and "fc1_g" in " ".join(ref.state_dict()):
            k = k.replace("mlp.fc2", "mlp.w3")
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_huge_plus_patch16_dinov3"])
def test_original_dinov3_state_dict(name, tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    from vitkit.interop import detect_format
    from vitkit.io import save_state_dict

    ref = make_timm(name, "token")
    orig = _original_from_timm(ref)
    back = checkpoint_filter_fn(dict(orig), ref)  # timm reads this as the original layout ...
    assert set(back) == set(ref.state_dict()) and all(torch.equal(back[k], ref.state_dict()[k]) for k in back)
    save_state_dict(orig, tmp_path / "dinov3.safetensors")
    assert detect_format(tmp_path / "dinov3.safetensors") == "dinov3"
    model = vitkit.from_pretrained(tmp_path / "dinov3.safetensors", num_heads=4).eval()
    assert model.config.rope_theta == pytest.approx(100.0) and model.config.pooling == "cls"
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():  # ... and vitkit gives timm's outputs from it
        assert max_diff(model(x), ref(x)) <= 1e-5
        assert max_diff(model.forward_features(x), ref.forward_features(x)) <= 1e-5


def test_other_timm_eva_models_are_refused_not_misread(tmp_path):
    import json

    from vitkit.errors import CheckpointError
    from vitkit.io import save_state_dict

    ref = timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False, **SMALL)  # Eva, residual post-norm
    hub = tmp_path / "hub"
    hub.mkdir()
    save_state_dict(ref.state_dict(), hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "eva02_enormous_patch14_clip_224",
                                                 "model_args": SMALL, "pretrained_cfg": {}}))
    with pytest.raises(CheckpointError, match="use_post_norm=True is not a layout vitkit reproduces"):
        vitkit.from_pretrained(hub)
