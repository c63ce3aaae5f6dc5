"""Errors that help when loading, exporting and saving: each names the file / field / command,
is one line from the CLI, and comes at once (no minutes of network retries)."""

from __future__ import annotations

import errno
import json
import time

import pytest
import torch

import vitkit
from vitkit.cli.main import main
from vitkit.errors import CheckpointError, ConfigError


def _tiny(**kw):
    cfg = dict(image_size=16, patch_size=8, num_classes=5, dim=16, depth=1, num_heads=2)
    return vitkit.ViT(vitkit.ViTConfig(**{**cfg, **kw}))


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- export jax
@pytest.mark.parametrize("kw", [dict(pos_embed="sincos2d", class_token=False, pooling="mean"),
                                dict(pos_embed="sincos2d"), dict(num_registers=2), dict(layer_scale=1e-5)])
def test_export_jax_without_equivalent_is_a_clean_error(tmp_path, capsys, kw):
    _tiny(**kw).save_pretrained(tmp_path / "m")
    rc = main(["export", str(tmp_path / "m"), "--format", "jax", "--out", str(tmp_path / "m.npz")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "no JAX vision_transformer / big_vision equivalent" in line
    assert not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------------------- hub offline
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return hub


def test_offline_hub_id_fails_at_once_naming_the_installed_cli(empty_hf_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    rc = main(["predict", "--model", "google/vit-base-patch16-224", "sample:china.jpg"])
    line = _one_error_line(capsys.readouterr().err.replace("\n  ", " "))
    assert rc == 2 and time.monotonic() - t0 < 5
    assert "HF_HUB_OFFLINE is set" in line
    assert "hf download google/vit-base-patch16-224 config.json model.safetensors" in line
    assert "huggingface-cli" not in line  # removed from huggingface_hub 1.0; the installed one is newer


def test_unreachable_hub_is_one_quick_check_not_minutes_of_retries(empty_hf_cache, monkeypatch):
    import socket

    hub = empty_hf_cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    connects = []

    def no_route(addr, timeout=None, *a, **k):
        connects.append((addr, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    real = hub.hf_hub_download
    online_calls = []

    def download(*a, local_files_only=False, **k):
        if not local_files_only:
            online_calls.append(a)  # this is where huggingface_hub would retry for ~24 s per file
        return real(*a, local_files_only=True, **k)

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=r"(?s)cannot reach huggingface.co:443 .*hf download google/vit-b"):
        vitkit.from_pretrained("google/vit-base-patch16-224")
    assert online_calls == [] and len(connects) == 1 and connects[0][1] <= 5


def test_cached_hub_model_loads_without_touching_the_network(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    import socket

    repo = tmp_path / "snap"
    _tiny(dim=32, num_heads=2, norm_eps=1e-12).export_to("hf", repo)

    def cached(repo_id, filename, local_files_only=False, **kw):
        assert local_files_only, "went online although the files are cached"
        if not (repo / filename).exists():
            raise hub.errors.LocalEntryNotFoundError(filename)
        return str(repo / filename)

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(hub, "hf_hub_download", cached)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert vitkit.from_pretrained("google/vit-tiny").config.dim == 32


# --------------------------------------------------------------------------- config.json, labels
def test_malformed_config_json_names_the_file_and_the_json_error(tmp_path, capsys):
    m = tmp_path / "m"
    _tiny().save_pretrained(m)
    (m / "config.json").write_text('{"format": "vitkit", "config": {"dim": 16,,}}')
    rc = main(["predict", "--model", str(m), "sample:china.jpg"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{m / 'config.json'} is not valid JSON: Expecting property name" in line
    assert "line 1 column" in line and "cannot tell the checkpoint format" not in line
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        vitkit.load_model(m)
    run = tmp_path / "run"  # a run dir whose best/config.json is broken
    _tiny().save_pretrained(run / "best")
    (run / "best" / "config.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"best/config.json is not valid JSON"):
        vitkit.from_pretrained(run)


def test_wrong_length_label_list_is_an_error_naming_file_and_field(tmp_path):
    m = tmp_path / "m"
    model = _tiny()
    model.labels = ["a", "b", "c", "d", "e"]
    model.save_pretrained(m)
    assert vitkit.from_pretrained(m).labels == ["a", "b", "c", "d", "e"]
    meta = json.loads((m / "config.json").read_text())
    meta["labels"] = ["a", "b", "c"]
    (m / "config.json").write_text(json.dumps(meta))
    for load in (vitkit.from_pretrained, vitkit.load_model):
        with pytest.raises(CheckpointError, match=r"config.json: field 'labels' has 3 names but config.num_classes is 5"):
            load(m)


# --------------------------------------------------------------------------- disk full
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    m = tmp_path / "m"
    _tiny().save_pretrained(m)
    before = (m / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    with pytest.raises(vitkit.errors.VitkitError) as e:
        _tiny().save_pretrained(m)
    assert str(e.value) == (f"cannot write {m / 'model.safetensors'}: no space left on device; "
                            "the previous file is unchanged")
    assert isinstance(e.value, OSError)  # callers catching OSError still do
    assert (m / "model.safetensors").read_bytes() == before
    assert [p.name for p in m.iterdir() if p.name.endswith(".tmp")] == []


def test_torch_save_runtime_error_on_full_disk_is_named_too(tmp_path, monkeypatch):
    from vitkit.train.checkpoint import save_state

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(vitkit.errors.VitkitError, match=r"cannot write .*train_state.pt: the write failed \("):
        save_state(tmp_path / "train_state.pt", {"x": 1})


def test_disk_full_during_training_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from vitkit.train.checkpoint import load_state

    real, calls = torch.save, {"n": 0}

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first epoch's state is written, then the disk is full
            _enospc()
        return real(*a, **k)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    n = torch.get_num_threads()
    try:
        rc = main(["train", "--out", str(run), "--epochs", "2", "--subset", "32", "--batch-size", "16", "--dim", "16",
                   "--depth", "1", "--num-heads", "2", "--no-progress", "--no-ema", "--threads", "1"])
    finally:
        torch.set_num_threads(n)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line == (f"vitkit train: error: cannot write {run / 'train_state.pt'}: no space left on device; "
                    "the previous file is unchanged")
    assert load_state(run / "train_state.pt")["epoch"] == 1


def test_config_error_type_for_jax_export_direct(tmp_path):
    with pytest.raises(ConfigError, match="pos_embed='sincos2d'"):
        _tiny(pos_embed="sincos2d").export_to("jax", tmp_path / "x.npz")
