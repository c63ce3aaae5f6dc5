"""Summary: the layer table's numbers and the walk-through's shapes."""

from __future__ import annotations

import re

import pytest
import torch

import vitkit
from vitkit import ViT, ViTConfig
from vitkit.bench.flops import count_flops
from vitkit.summary import format_table, layer_table, walkthrough


def _line(text: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}\s+(\(.*?\))", text, re.M)
    assert m, f"no line {name!r} in\n{text}"
    return m.group(1)


@pytest.mark.parametrize("kw", [
    {},
    dict(num_registers=2, layer_scale=1e-4, head_hidden_dim=16),
    dict(pooling="mean", fc_norm=True, pos_embed="sincos2d"),
    dict(norm_first=False, num_classes=0),
    dict(class_token=False, pooling="mean", pos_embed="none", image_size=(16, 24), in_channels=1),
])
def test_layer_table_totals(tiny_config, kw):
    m = ViT(tiny_config(**kw))
    rows = layer_table(m)
    assert sum(r.params for r in rows) == m.num_params()
    for r in rows:
        if r.name.startswith("blocks."):
            assert r.params == sum(p.numel() for p in m.get_submodule(r.name).parameters())
            assert r.shape == (1, m.config.num_tokens, m.config.dim)
    assert rows[-1].shape == ((1, m.config.num_classes) if m.config.num_classes else (1, m.config.dim))
    text = format_table(m)
    assert f"Total params: {m.num_params():,}" in text
    blocks = sum(p.numel() for p in m.blocks.parameters())
    assert f"In transformer blocks: {blocks:,} ({100 * blocks / m.num_params():.1f}%)" in text
    assert f"{count_flops(m.config)['gflops']:.3f} GFLOPs" in text


def test_table_of_a_preset_on_meta_device():
    with torch.device("meta"):
        m = vitkit.create_model("vit_tiny_patch16_224")
    text = format_table(m)
    assert "Total params: 5,717,416" in text
    assert re.search(r"patch_embed \(PatchEmbed\(conv\)\)\s+\(B, 196, 192\)\s+147,648", text)
    assert re.search(r"head \(Linear\)\s+\(B, 1000\)\s+193,000", text)


def test_walkthrough_tutorial2_60x100_one_channel():
    c = ViTConfig(image_size=(60, 100), patch_size=20, in_channels=1, dim=768, depth=1, num_heads=8,
                  mlp_dim=600, pos_embed="sincos1d", task="regression", num_classes=1)
    m = ViT(c).eval()
    text = walkthrough(m, torch.randn(1, 60, 100))
    assert _line(text, "image") == "(1, 60, 100)"
    assert _line(text, "patches") == "(15, 400)"
    assert "3x5 grid of 20x20 patches = 15 patches" in text
    assert _line(text, "patch embeddings") == "(15, 768)"
    assert _line(text, "+ class token") == "(16, 768)"
    assert _line(text, "+ position embedding") == "(16, 768)"
    assert _line(text, "1 encoder blocks") == "(16, 768)"
    assert _line(text, "class-token output") == "(768,)"
    assert _line(text, "logits") == "(1,)" and "regression" in text


def test_walkthrough_default_model():
    m = vitkit.create_model("vit_base_patch16_224", depth=1).eval()
    x = torch.randn(3, 224, 224)
    text = walkthrough(m, x, labels=[f"c{i}" for i in range(1000)])
    assert _line(text, "patches") == "(196, 768)"
    assert _line(text, "+ class token") == "(197, 768)"
    assert _line(text, "+ position embedding") == "(197, 768)"
    assert _line(text, "logits") == "(1000,)"
    with torch.no_grad():
        k = int(m(x[None]).argmax())
    assert f"top-1 = c{k} " in text  # the walk-through's prediction is the model's
