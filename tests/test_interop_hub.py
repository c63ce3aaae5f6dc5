"""Hub ids: resolved through huggingface_hub.hf_hub_download (monkeypatched to a fake cache dir, no
network); offline gives a clear error saying what to download and where to point source."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_interop_common import max_diff, tiny
from vitkit.interop.hub import looks_like_hub_id, parse_hub_id


def test_parse_hub_ids(tmp_path):
    assert parse_hub_id("google/vit-base-patch16-224") == ("google/vit-base-patch16-224", None)
    assert parse_hub_id("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k@main") == (
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "main")
    assert looks_like_hub_id("google/vit-base-patch16-224")
    assert not looks_like_hub_id(str(tmp_path))  # an existing path is never a hub id
    assert not looks_like_hub_id("./relative/x")


def test_hub_id_loads_from_fake_cache(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    model = tiny(dim=64, num_heads=4, norm_eps=1e-12)
    repo = tmp_path / "cache" / "models--google--vit-tiny" / "snapshots" / "abc"
    model.export_to("hf", repo)
    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, filename, revision))
        f = repo / filename
        if not f.exists():
            raise hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(f)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    loaded = vitkit.from_pretrained("google/vit-tiny")
    assert calls[0] == ("google/vit-tiny", "config.json", None)
    assert loaded.pretrained_info["hub_id"] == "google/vit-tiny" and loaded.pretrained_info["format"] == "hf"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(loaded(x), model(x)) <= 1e-5


def test_hub_offline_error_says_what_to_do(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, filename, **kw):
        raise hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(vitkit.CheckpointError) as e:
        vitkit.from_pretrained("google/vit-base-patch16-224")
    msg = str(e.value)
    assert "hf download google/vit-base-patch16-224" in msg
    assert "pass its path as source" in msg
