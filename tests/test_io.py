"""vitkit's own format: bit-exact save/load, config.json content, safetensors (no pickle), atomic
writes, run-directory resolution, corrupt files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import vitkit
from vitkit import ViT
from vitkit.errors import CheckpointError, ConfigError
from vitkit.interop import load_model, resolve_model_dir
from vitkit.io import (
    atomic_write,
    atomic_write_text,
    is_vitkit_dir,
    latest_run,
    load_safetensors,
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
    C = m.config.in_channels
    m.preprocess_cfg = {"input_size": [C, *m.config.image_hw], "mean": [0.5] * C, "std": [0.5] * C,
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
    with pytest.raises(CheckpointError, match=r"head.weight: model expects \[10, 32\], checkpoint has \[3, 32\]"):
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


# --------------------------------------------------------------------------- one loader, typed preprocessing
def test_from_pretrained_vitkit_dir_builds_the_model_once(tmp_path, tiny_config, monkeypatch):
    """One strict loader: a vitkit directory is read as tensors + config and built once (it used
    to be built by load_model, then again by from_pretrained)."""
    from vitkit.model import vit as vit_mod

    m = ViT(tiny_config()).eval()
    m.save_pretrained(tmp_path / "m")
    built = []
    real_init = vit_mod.ViT.__init__

    def counting_init(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(vit_mod.ViT, "__init__", counting_init)
    back = vitkit.from_pretrained(tmp_path / "m")
    assert len(built) == 1
    load_model(tmp_path / "m")
    assert len(built) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_preprocess_attribute_accepts_a_dict_and_stores_a_preprocess(tiny_config):
    from vitkit.preprocess import Preprocess

    m = ViT(tiny_config())
    assert m.preprocess_cfg is None
    m.preprocess_cfg = {"input_size": [3, 16, 16], "mean": [0.1, 0.2, 0.3], "std": [0.5] * 3, "crop_pct": 0.9}
    pre = m.preprocess_cfg
    assert isinstance(pre, Preprocess) and pre.crop_mode == "center" and pre.interpolation == "bicubic"
    assert pre["mean"] == [0.1, 0.2, 0.3] and pre.get("crop_pct") == 0.9 and dict(pre) == pre.to_dict()
    with pytest.raises(ConfigError, match=r"preprocess.std: values must be non-zero"):
        m.preprocess_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}
    assert m.preprocess_cfg is pre  # a rejected value changes nothing


@pytest.mark.parametrize("bad, match", [
    (dict(input_size=[3, 0, 16]), r"preprocess.input_size: expected three positive integers"),
    (dict(input_size=[3, 16]), r"preprocess.input_size"),
    (dict(mean=[0.5, 0.5]), r"preprocess.mean: has 2 values but input_size \[3, 16, 16\] has 3 channel"),
    (dict(std=[1, 1, 0]), r"preprocess.std: values must be non-zero"),
    (dict(interpolation="lanczos9"), r"preprocess.interpolation: expected one of"),
    (dict(crop_pct=0), r"preprocess.crop_pct: expected a number in \(0, 1\]"),
    (dict(crop_mode="border"), r"preprocess.crop_mode"),
    (dict(colour="yes"), r"unknown key\(s\) \['colour'\]"),
])
def test_preprocess_validation_names_the_field(bad, match):
    from vitkit.preprocess import Preprocess

    good = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ConfigError, match=match):
        Preprocess.from_dict({**good, **bad})


def test_bad_saved_preprocess_names_the_file_and_field(tmp_path, tiny_config):
    ViT(tiny_config()).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["preprocess"] = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5, 0.5]}
    cfg.write_text(json.dumps(meta))
    for load in (load_model, vitkit.from_pretrained):
        with pytest.raises(CheckpointError, match=r"config.json: preprocess.std: has 2 values"):
            load(tmp_path / "m")


def test_old_config_json_without_crop_mode_loads_and_transforms_as_before(tmp_path, tiny_config):
    """Files saved before Preprocess: no crop_mode key. They load, save back with crop_mode, and
    give the transform vitkit built from them then (oracle: that transform written out)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    from vitkit.data.transforms import eval_transform

    m = ViT(tiny_config())
    m.save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    img = Image.fromarray((torch.rand(30, 47, 3) * 255).byte().numpy())
    for crop_pct in (0.875, 1.0):
        meta = json.loads(cfg.read_text())
        meta["preprocess"] = {"input_size": [3, 16, 16], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4],
                              "interpolation": "bilinear", "crop_pct": crop_pct}
        cfg.write_text(json.dumps(meta))
        back = load_model(tmp_path / "m")
        bil = InterpolationMode.BILINEAR
        size = [T.Resize(18, interpolation=bil, antialias=True), T.CenterCrop((16, 16))] if crop_pct < 1 else \
            [T.Resize((16, 16), interpolation=bil, antialias=True)]
        old = T.Compose([T.ToImage(), *size, T.ToDtype(torch.float32, scale=True),
                         T.Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])])
        assert torch.equal(eval_transform(back.preprocess_cfg)(img), old(img))
        assert torch.equal(back.preprocess(img), old(img))
        back.save_pretrained(tmp_path / "again")
        saved = json.loads((tmp_path / "again" / "config.json").read_text())["preprocess"]
        assert saved["crop_mode"] == ("center" if crop_pct < 1 else "squash")


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_eval_transform_matches_timm(crop_mode, crop_pct):
    """Oracle: timm's eval transform with the same settings on a non-square image."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from vitkit.data.transforms import eval_transform
    from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (61, 90, 3), dtype=np.uint8))
    pre = Preprocess((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, "bicubic", crop_pct, crop_mode)
    ref = create_transform((3, 32, 32), is_training=False, interpolation="bicubic", mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, crop_pct=crop_pct, crop_mode=crop_mode)
    ours, theirs = eval_transform(pre)(img), ref(img)
    # same geometry; torchvision's tensor bicubic and PIL's round a few pixels one level apart
    level = 1 / 255 / min(IMAGENET_STD)
    torch.testing.assert_close(ours, theirs, atol=level * 1.01, rtol=0)
    assert (ours - theirs).abs().gt(1e-5).float().mean() < 0.02
