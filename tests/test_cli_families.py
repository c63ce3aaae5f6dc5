"""`vitkit models --families`: the families, their sources, hub ids and outputs (table and JSON)."""

from __future__ import annotations

import json

from vitkit.cli.main import main


def test_models_families_lists_sources_and_hub_ids(capsys):
    assert main(["models", "--families", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"deit", "dinov2", "clip", "siglip"} <= set(rows)
    assert "facebook/dinov2-small" in rows["dinov2"]["hub_ids"]
    assert "openai/clip-vit-base-patch16" in rows["clip"]["hub_ids"]
    assert "google/siglip-base-patch16-224" in rows["siglip"]["hub_ids"]
    assert "facebook/deit-base-distilled-patch16-224" in rows["deit"]["hub_ids"]
    assert any(s.startswith("openai_clip:") for s in rows["clip"]["sources"])
    assert main(["models", "--families"]) == 0
    assert "timm/vit_small_patch14_reg4_dinov2.lvd142m" in capsys.readouterr().out


def test_convert_openai_clip_with_act_hint(tmp_path, recwarn):
    """`vitkit convert --act quick_gelu` passes the activation an OpenAI/OpenCLIP state dict cannot
    carry: no assumption warning, and the converted model equals the source."""
    import torch

    import vitkit
    from test_interop_common import randomize

    cfg = vitkit.ViTConfig(image_size=32, patch_size=16, num_classes=16, dim=32, depth=2, num_heads=2, norm_pre=True,
                           patch_bias=False, head_bias=False, act="quick_gelu", norm_eps=1e-5)
    model = randomize(vitkit.ViT(cfg))
    src = model.export_to("openai_clip", tmp_path / "clip.safetensors")
    assert main(["convert", str(src), str(tmp_path / "out"), "--act", "quick_gelu", "--num-heads", "2"]) == 0
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]
    got = vitkit.from_pretrained(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (got(x) - model(x)).abs().max().item() <= 1e-5
    assert got.config.act == "quick_gelu" and got.pretrained_info["family"] == "clip"
