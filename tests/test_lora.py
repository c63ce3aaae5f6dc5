"""LoRA through peft (vitkit.train.adapt): vitkit's adapted model against peft's own PeftModel on the
same base, the q,k,v split against the hand-computed block-diagonal update, the merged model and
`vitkit export --merge-lora` against the adapted logits, the saved adapter loaded by peft, each bad
input before training, and an interrupted LoRA run resumed bit for bit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from vitkit import ViT, ViTConfig, load_model  # noqa: E402
from vitkit.errors import ConfigError  # noqa: E402
from vitkit.train.config import TrainConfig  # noqa: E402
from vitkit.train.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny pretrained source for the digits (1 channel, 16 px): class-token pooling, so the last
    block's class-token-only path is exercised with LoRA on qkv."""
    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=16, patch_size=4, in_channels=1, dim=32, depth=2, num_heads=4, num_classes=3,
                      pooling="cls", class_token=True))
    d = tmp_path_factory.mktemp("base") / "base"
    m.save_pretrained(d)
    return d


def _cfg(base: Path, out: Path, **kw) -> TrainConfig:
    opts = dict(pretrained=str(base), lora=4, lora_alpha=8, epochs=2, subset=96, batch_size=32, lr=2e-2,
                warmup_epochs=0, ema=False, deterministic=True, progress=False, threads=1, out=str(out) if out else None)
    return TrainConfig(**{**opts, **kw})


def _x(n=5):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _peft_on_base(run: Path):
    from vitkit.train.adapt import base_for_run

    base, best = base_for_run(run)
    return peft.PeftModel.from_pretrained(base, str(best / "adapter")).eval()


def test_adapted_forward_equals_peft_model_and_merged_weights(base_dir, tmp_path):
    """The adapter vitkit saved, loaded by peft itself onto the base, gives the logits of the merged
    model in best/ (what predict / eval read); training moved the adapters (else equality is trivial)."""
    run = tmp_path / "r"
    train(_cfg(base_dir, run, lora_targets="qkv,proj,fc1,fc2", lora_dropout=0.1), log=lambda *a: None)
    conf = json.loads((run / "best" / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["modules_to_save"] == ["head"]
    assert (run / "best" / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_model(run).eval()
    pm = _peft_on_base(run)
    x = _x()
    with torch.no_grad():
        got, want = merged(x), pm(x)
        with pm.disable_adapter():  # the base with the adapters off, but the trained head (modules_to_save) on
            base_only = pm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base_only).abs().max() > 1e-3


def test_vitkit_injection_equals_peft_get_peft_model(base_dir):
    """adapt_model's injected model against peft.get_peft_model with a hand-written LoraConfig, with the
    same (random, non-zero) adapter weights: the forward is peft's own."""
    from vitkit.train.adapt import adapt_model

    torch.manual_seed(3)
    ours = load_model(base_dir).train(False)
    theirs = copy.deepcopy(ours)
    adapt_model(_cfg(base_dir, Path("unused"), lora_targets="qkv,fc1", lora_alpha=16), ours)
    ref = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv", "fc1"],
                                                      modules_to_save=["head"]))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_()
        ref.get_base_model().load_state_dict(ours.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
        # the class-token-only last block goes through the LoRA layer too: as running every token
        ref.get_base_model().last_block_prefix_only = False
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.get_base_model().named_parameters() if p.requires_grad}


def test_qkv_split_is_one_lora_per_slice(base_dir):
    """q,k,v: the merged update of the fused qkv is B_q A_q, B_k A_k, B_v A_v on its three row blocks,
    each scaled alpha / rank (computed by hand from the adapter's factors)."""
    from vitkit.train.adapt import adapt_model

    torch.manual_seed(4)
    model = load_model(base_dir).eval()
    w0 = model.blocks[0].attn.qkv.weight.detach().clone()
    pm = adapt_model(_cfg(base_dir, Path("unused"), lora=2, lora_alpha=6, lora_targets="q,k,v"), model)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    A = layer.lora_A["default"].weight.detach()  # (3R, D)
    B = layer.lora_B["default"].weight.detach()  # (3D, R): the three diagonal blocks stacked
    D, R = 32, 2
    merged = copy.deepcopy(pm).merge_and_unload().blocks[0].attn.qkv.weight.detach()
    for i in range(3):
        want = (6 / 2) * B[i * D:(i + 1) * D] @ A[i * R:(i + 1) * R]
        torch.testing.assert_close(merged[i * D:(i + 1) * D] - w0[i * D:(i + 1) * D], want, atol=1e-5, rtol=0)


def test_export_merge_lora_equals_adapted_logits(base_dir, tmp_path):
    from vitkit.cli.main import main

    run, out = tmp_path / "r", tmp_path / "merged"
    train(_cfg(base_dir, run, epochs=1), log=lambda *a: None)
    assert main(["export", "--merge-lora", str(run), "--out", str(out)]) == 0
    plain = load_model(out).eval()
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), _peft_on_base(run)(x), atol=1e-5, rtol=0)
    assert plain.labels == load_model(run).labels


def test_bad_input_is_refused_before_training(base_dir, tmp_path, capsys):
    from vitkit.cli.main import main

    quiet = dict(log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"lora_targets must be .*qkv, proj, fc1, fc2.*got 'attn'"):
        train(_cfg(base_dir, tmp_path / "a", lora_targets="attn"), **quiet)
    with pytest.raises(ConfigError, match=r"--lora 33 is larger than blocks.0.attn.qkv \(96x32\)'s smaller side 32"):
        train(_cfg(base_dir, tmp_path / "b", lora=33), **quiet)
    with pytest.raises(ConfigError, match=r"--lora 33 is larger than each 32x32 slice of blocks.0.attn.qkv"):
        train(_cfg(base_dir, tmp_path / "b", lora=33, lora_targets="q,k,v"), **quiet)
    with pytest.raises(ConfigError, match="q, k and v are slices"):
        train(_cfg(base_dir, tmp_path / "c", lora_targets="q,v"), **quiet)
    with pytest.raises(ConfigError, match="needs --pretrained"):
        train(_cfg(None, tmp_path / "d"), **quiet)
    with pytest.raises(ConfigError, match="cannot combine with --lora"):
        train(_cfg(base_dir, tmp_path / "e", train_only="last:1"), **quiet)
    assert not any((tmp_path / n).exists() for n in "abcde")  # nothing claimed
    # --merge-lora on a run without LoRA
    plain = tmp_path / "plain"
    train(_cfg(base_dir, plain, lora=0, epochs=1), **quiet)
    assert main(["export", "--merge-lora", str(plain), "--out", str(tmp_path / "m")]) == 2
    assert "expected a run trained with --lora" in capsys.readouterr().err
    # resuming a LoRA run with another rank
    run = tmp_path / "r"
    train(_cfg(base_dir, run, max_steps=1), **quiet)
    with pytest.raises(ConfigError, match=r"--lora 4 -> 8 \(it changes the LoRA adapters' shapes"):
        train(_cfg(base_dir, None, lora=8), resume=run, **quiet)


def test_target_matching_no_layer_is_refused():
    from vitkit.train.adapt import lora_config

    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=4, num_classes=3))
    model.blocks[0].mlp.fc2 = torch.nn.Identity()  # a family without that Linear
    with pytest.raises(ConfigError, match=r"--lora-targets fc2: expected a Linear layer blocks.N.mlp.fc2 in this "
                                          r"model, got a Identity"):
        lora_config(TrainConfig(pretrained="x", lora=2, lora_targets="fc2"), model)


def test_lora_run_resumes_bit_for_bit(base_dir, tmp_path):
    """Stopped after 4 of 6 steps (mid-epoch 2) and resumed == uninterrupted: adapters, head,
    optimizer state (the saved train_state.pt) and the merged weights."""
    from vitkit.train.checkpoint import load_state

    quiet = dict(log=lambda *a: None)
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(base_dir, full, ema=True, lora_dropout=0.2), **quiet)
    train(_cfg(base_dir, part, ema=True, lora_dropout=0.2, max_steps=4), **quiet)
    train(_cfg(base_dir, None, ema=True, lora_dropout=0.2), resume=part, **quiet)
    a, b = load_state(full / "train_state.pt"), load_state(part / "train_state.pt")
    assert a["step"] == b["step"] == 6
    assert any("lora_A" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    wa, wb = load_model(full).state_dict(), load_model(part).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
