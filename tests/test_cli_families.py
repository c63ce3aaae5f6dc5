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
