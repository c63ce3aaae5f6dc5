"""Partial fine-tuning (--train-only, vitkit.train.adapt): which parameters get gradients in each mode
(against name rules written out here), the linear probe's features computed once whatever the
epochs, its exact resume, and the trainable-parameter line every run prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vitkit import ViT, ViTConfig, load_model
from vitkit.errors import ConfigError
from vitkit.train.adapt import adapt_model
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=16, patch_size=4, in_channels=1, dim=32, depth=3, num_heads=4, num_classes=3,
                      pooling="mean", class_token=False, fc_norm=True))
    d = tmp_path_factory.mktemp("base") / "base"
    m.save_pretrained(d)
    return d


def _cfg(base: Path, out, **kw) -> TrainConfig:
    opts = dict(pretrained=str(base), epochs=1, subset=64, batch_size=32, warmup_epochs=0, ema=False,
                deterministic=True, progress=False, threads=1, out=str(out) if out else None)
    return TrainConfig(**{**opts, **kw})


HEAD = r"head\..*"
NORMS = r"(blocks\.\d+\.norm[12]|norm|fc_norm)\.(weight|bias)"
EXPECTED = {  # the parameters that must get a gradient, by name
    "head": [HEAD],
    "norms+head": [HEAD, NORMS, r".*\.bias"],
    "last:1": [HEAD, r"blocks\.2\..*", r"(norm|fc_norm)\..*"],
    "all": [r".*"],
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_trains_exactly_its_parameters(base_dir, mode):
    model = load_model(base_dir).train()
    adapt_model(_cfg(base_dir, None, train_only=mode), model)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, _ in model.named_parameters() if any(re.fullmatch(r, n) for r in EXPECTED[mode])}
    assert got == want
    assert 0 < len(got) <= len(list(model.parameters()))


def test_last_n_larger_than_depth_and_modes_without_pretrained_are_refused(base_dir):
    with pytest.raises(ConfigError, match="last:4: the model has 3 blocks"):
        adapt_model(_cfg(base_dir, None, train_only="last:4"), load_model(base_dir))
    with pytest.raises(ConfigError, match="train_only must be one of"):
        train(_cfg(base_dir, None, train_only="heads"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="--train-only head adapts pretrained weights.*needs --pretrained"):
        train(_cfg(None, None, train_only="head"), log=lambda *a: None)


def test_param_count_line(base_dir, tmp_path):
    lines = []
    train(_cfg(base_dir, tmp_path / "r", train_only="head"), log=lines.append)
    model = load_model(base_dir)
    head = 32 * 10 + 10  # a fresh 10-class head on 32 features (digits)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) + head
    want = (f"trainable {head:,} / {total:,} params ({100 * head / total:.2f}%), "
            f"optimizer state {2 * 4 * head / 1e6:.1f} MB")
    assert want in lines


def _count_images(monkeypatch):
    """Images through the patch embedding (the backbone), for any model the run builds."""
    seen = [0]
    from vitkit.model.patch_embed import PatchEmbed

    forward = PatchEmbed.forward

    def counting(self, x, *a, **k):
        seen[0] += len(x)
        return forward(self, x, *a, **k)

    monkeypatch.setattr(PatchEmbed, "forward", counting)
    return seen


def test_probe_features_are_computed_once(base_dir, tmp_path, monkeypatch):
    """More epochs of a linear probe cost no more backbone passes: the features of the 64 training
    images are computed once; only the final evaluation (val + test) runs the backbone again."""
    seen = _count_images(monkeypatch)
    counts = []
    for epochs in (1, 3):
        seen[0] = 0
        s = train(_cfg(base_dir, tmp_path / f"e{epochs}", train_only="probe", epochs=epochs, eval_every=100),
                  log=lambda *a: None)
        counts.append(seen[0])
        assert s["steps"] == 2 * epochs
    assert counts[0] == counts[1]
    assert counts[0] == 64 + 179 + 359  # the features once, then validation at the end and the test split


def test_probe_resumes_bit_for_bit(base_dir, tmp_path):
    from vitkit.train.checkpoint import load_state

    quiet = dict(log=lambda *a: None)
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(train_only="probe", epochs=3, batch_size=16, ema=True)
    train(_cfg(base_dir, full, **kw), **quiet)
    train(_cfg(base_dir, part, max_steps=5, **kw), **quiet)
    train(_cfg(base_dir, None, **kw), resume=part, **quiet)
    a, b = load_state(full / "train_state.pt"), load_state(part / "train_state.pt")
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"][-1]["val_accuracy"] == b["history"][-1]["val_accuracy"]


def test_probe_features_are_the_models_own(base_dir):
    """The cached features through ProbeHead give the model's own logits for the same images."""
    from vitkit.data import DataSpec, build_data
    from vitkit.eval.evaluate import normalize
    from vitkit.train.adapt import ProbeHead, probe_features

    data = build_data(DataSpec.from_config(_cfg(base_dir, None, image_size=16)))
    model = load_model(base_dir).eval()
    feats = probe_features(model, data.train, mean=data.mean, std=data.std, device=torch.device("cpu"),
                           workers=0, batch_size=100)
    assert feats.features.shape == (len(data.train), 32)
    idx = [0, 7, 40, len(data.train) - 1]
    x, y = data.train.read_batch(idx)
    with torch.no_grad():
        want = model(normalize(x, data.mean, data.std))
        got = ProbeHead(model)(feats.read_batch(idx)[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(feats.read_batch(idx)[1], y)
