"""vitkit's own format: bit-exact save/load, config.json content, safetensors (no pickle), atomic
writes, run-directory resolution, corrupt files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import vitkit
from vitkit import ViT
from vitkit.errors import CheckpointError
from vitkit.io import (
    atomic_write,
    atomic_write_text,
    is_vitkit_dir,
    latest_run,
    load_model,
    load_safetensors,
    resolve_model_dir,
    save_pretrained,
    save_state_dict,
)

CONFIGS = [
    {},
    dict(pos_embed="sincos2d", pooling="mean", fc_norm=True),
    dict(pos_embed="sincos1d", task="regression", num_classes=1),
    dict(image_size=(16, 24), patch_size=(4, 8), in_channels=1, num_registers=2, layer_scale=1e-3,
         head_hidden_dim=12, qkv_bias=False),
    dict(norm_first=False, act="relu"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(k) for k in CONFIGS])
def test_round_trip_bit_exact(tmp_path, tiny_config, kw):
    m = ViT(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m.labels = [f"class{i}" for i in range(m.config.num_classes)]
    m.preprocess_cfg = {"input_size": [m.config.in_channels, *m.config.image_hw], "mean": [0.5], "std": [0.5],
                        "interpolation": "bicubic", "crop_pct": 0.9}
    m.save_pretrained(tmp_path / "m")
    back = vitkit.load_model(tmp_path / "m")
    assert back.config == m.config and not back.training
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    if m.config.pos_embed.startswith("sincos"):
        assert torch.equal(m.pos_embed, back.pos_embed)  # recomputed, identical
    x = torch.randn(2, m.config.in_channels, *m.config.image_hw)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert back.labels == m.labels and back.preprocess_cfg == m.preprocess_cfg


def test_config_json_content(tmp_path, tiny_config):
    m = ViT(tiny_config(image_size=(16, 24)))
    save_pretrained(m, tmp_path, note="hello")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "vitkit" and meta["format_version"] == 1
    assert meta["config"] == m.config.to_dict() and meta["config"]["image_size"] == [16, 24]
    assert meta["note"] == "hello" and meta["labels"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert is_vitkit_dir(tmp_path)


def test_weights_are_safetensors_not_pickle(tmp_path, tiny_config):
    m = ViT(tiny_config(pos_embed="sincos2d"))
    m.save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor torch.save's zip
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    sd = m.state_dict()
    assert set(tensors) == set(sd) and "pos_embed" not in tensors  # sincos table is not stored
    for k, v in tensors.items():
        assert v["dtype"] == "F32" and v["shape"] == list(sd[k].shape)
    assert len(raw) == 8 + n + sum(sd[k].numel() * 4 for k in sd)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def bad(tmp):
        with open(tmp, "w") as f:
            f.write("half-writ")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, bad)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # temp file cleaned up
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_save_state_dict_atomic_and_shared_storage(tmp_path):
    base = torch.randn(4, 4)
    state = {"a": base, "b": base[1:]}  # shared storage is split into copies
    p = save_state_dict(state, tmp_path / "w.safetensors")
    back = load_safetensors(p)
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base[1:])


def test_resolve_model_dir(tmp_path, tiny_config):
    m = ViT(tiny_config())
    d = tmp_path / "model"
    m.save_pretrained(d)
    assert resolve_model_dir(d) == d
    assert resolve_model_dir(d / "model.safetensors") == d
    assert resolve_model_dir(d / "config.json") == d
    run = tmp_path / "runs" / "r1"
    m.save_pretrained(run / "last")
    assert resolve_model_dir(run) == run / "last"
    m.save_pretrained(run / "best")
    assert resolve_model_dir(run) == run / "best"  # best wins over last
    assert latest_run(tmp_path / "runs") == run
    assert latest_run(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no such"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        resolve_model_dir(tmp_path / "empty")
    # load through the run dir
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_model(run)(x), m.eval()(x))


def test_corrupt_and_mismatched_checkpoints(tmp_path, tiny_config):
    m = ViT(tiny_config())
    m.save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(b"\x00garbage that is not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "m")
    w.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    w.write_bytes(good)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "m", depth=3)  # config no longer matches the weights
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    cfg.write_text(json.dumps({"format": "other"}))
    assert not is_vitkit_dir(tmp_path / "m")


def test_load_with_overrides(tmp_path, tiny_config):
    m = ViT(tiny_config(dropout=0.0))
    m.save_pretrained(tmp_path)
    back = load_model(tmp_path, dropout=0.1)
    assert back.config.dropout == 0.1
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_saved_files_get_ordinary_permissions(tmp_path, tiny_config):
    """mkstemp creates 0600 files; saved models must be readable like any file the user writes."""
    import os

    umask = os.umask(0o022)
    try:
        ViT(tiny_config()).save_pretrained(tmp_path)
        for name in ("config.json", "model.safetensors"):
            assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
        os.chmod(tmp_path / "config.json", 0o640)  # an existing file keeps its mode on overwrite
        atomic_write_text(tmp_path / "config.json", "{}")
        assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_misshaped_weights_are_a_checkpoint_error(tmp_path, tiny_config):
    m = ViT(tiny_config(num_classes=3))
    m.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"head.weight: file \(3, 32\) vs model \(10, 32\)"):
        load_model(tmp_path, num_classes=10)
    # strict=False: everything but the new head is loaded (fine-tuning with a new class count)
    ft = load_model(tmp_path, strict=False, num_classes=10)
    assert ft.head.weight.shape == (10, 32)
    assert torch.equal(ft.blocks[1].mlp.fc2.weight, m.blocks[1].mlp.fc2.weight)
    assert torch.equal(ft.cls_token, m.cls_token)


def test_load_at_a_new_image_size_resamples(tmp_path, tiny_config):
    m = ViT(tiny_config()).eval()
    m.preprocess_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
                        "interpolation": "bicubic", "crop_pct": 1.0}
    m.save_pretrained(tmp_path)
    big = load_model(tmp_path, image_size=(24, 32))
    m.set_image_size((24, 32))  # the same operation done in memory
    assert big.config.image_hw == (24, 32) and big.preprocess_cfg["input_size"] == [3, 24, 32]
    assert torch.equal(big.pos_embed, m.pos_embed)
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(big(x), m(x))
    assert load_model(tmp_path, image_size=16).config.image_hw == (16, 16)  # same size: a no-op
