"""CPU training kernels (vitkit.train.kernels): fp32 F.linear on oneDNN, checked against torch's own
F.linear (values and gradients), where it routes and where it must not, and the trainer's and the
benchmark's use of it (--cpu-linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit import ViT, ViTConfig
from vitkit.errors import ConfigError
from vitkit.train import kernels
from vitkit.train.build import cpu_linear_kernels
from vitkit.train.config import TrainConfig
from vitkit.train.kernels import MIN_FEATURES, OneDNNLinearFn, onednn_linear

pytestmark = [pytest.mark.usefixtures("restore_torch_state"),
              pytest.mark.skipif(not kernels.available(), reason="no oneDNN matmul on this CPU / torch build")]


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], g)


@pytest.mark.parametrize("shape,out_f,bias", [((2, 7, 192), 256, True),    # widening: weight grad on MKL
                                              ((3, 5, 512), 128, True),    # narrowing: weight grad on oneDNN
                                              ((9, 256), 384, False),      # 2-D input, no bias
                                              ((256,), 128, True)])        # 1-D input
def test_linear_fn_matches_f_linear_values_and_gradients(shape, out_f, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = torch.randn(out_f, shape[-1], generator=gen).div_(shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(out_f, generator=gen, requires_grad=True) if bias else None
    want, want_g = _grads(F.linear, x, w, b)
    got, got_g = _grads(OneDNNLinearFn.apply, x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_g) == len(want_g)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_linear_fn_skips_gradients_nobody_asked_for():
    """A frozen weight (linear probe, fine-tuning a part) or an input without grad: those gradients
    are None and the others still right."""
    x = torch.randn(4, 256)
    w = torch.randn(128, 256, requires_grad=False)
    b = torch.randn(128, requires_grad=True)
    out = OneDNNLinearFn.apply(x.requires_grad_(), w, b)
    gx, gb = torch.autograd.grad(out.sum(), [x, b])
    torch.testing.assert_close(gx, w.sum(0).expand(4, -1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, torch.full((128,), 4.0))


def _model(dim: int) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=32, patch_size=8, num_classes=MIN_FEATURES, dim=dim, depth=2,
                         num_heads=4, mlp_dim=4 * dim))


def test_mode_routes_every_wide_linear_of_a_vit_and_its_gradients_match():
    """Under onednn_linear a ViT's training forward + backward equals the plain one to float rounding,
    with every Linear call routed: per block qkv, proj, fc1, fc2; the class-token-only last block
    projects q and k/v apart (its qkv weight sliced); then the head."""
    m = _model(128)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    F.cross_entropy(m(x), y).backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with onednn_linear() as mode:
        loss = F.cross_entropy(m(x), y)
    loss.backward()
    assert mode.routed == 4 + 5 + 1
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_mode_takes_keyword_arguments_and_leaves_empty_batches_to_f_linear():
    w, b = torch.randn(128, 256), torch.randn(128)
    x = torch.randn(3, 256)
    with onednn_linear() as mode:
        got = F.linear(input=x, weight=w, bias=b)
        empty = F.linear(torch.randn(0, 256), w, b)
    assert mode.routed == 1 and empty.shape == (0, 128)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["narrow", "autocast", "float64", "disabled"])
def test_mode_leaves_what_it_must_not_route_to_f_linear(case):
    m = _model(64 if case == "narrow" else 128)
    x = torch.randn(2, 3, 32, 32)
    if case == "float64":
        m, x = m.double(), x.double()
    want = m(x)
    with onednn_linear(enabled=case != "disabled") as mode, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = m(x)
    if case == "disabled":
        assert mode is None
    else:
        assert mode.routed == 0
    if case != "autocast":
        assert torch.equal(got, want)  # F.linear itself ran: bit-identical
    else:
        assert got.dtype == torch.bfloat16


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_trainer_choice_follows_cpu_linear_and_names_why_not():
    cpu, wide, narrow, said = torch.device("cpu"), _model(128), _model(64), []
    assert cpu_linear_kernels(_cfg(), wide, cpu, said.append) is True
    assert said and "oneDNN" in said[0] and "--cpu-linear torch" in said[0]
    assert cpu_linear_kernels(_cfg(cpu_linear="torch"), wide, cpu, said.append) is False
    assert cpu_linear_kernels(_cfg(), narrow, cpu, said.append) is False  # auto: quietly F.linear
    assert cpu_linear_kernels(_cfg(amp="bf16"), wide, cpu, said.append) is False
    assert cpu_linear_kernels(_cfg(), wide, torch.device("cuda"), said.append) is False
    for kw, why in [(dict(compile=True), "--compile"), (dict(grad_checkpointing=True), "--grad-checkpointing"),
                    (dict(amp="bf16"), "--amp bf16"), ({}, f"{MIN_FEATURES}+ features")]:
        with pytest.raises(ConfigError, match="--cpu-linear onednn cannot apply") as e:
            cpu_linear_kernels(_cfg(cpu_linear="onednn", **kw), narrow if not kw else wide, cpu, said.append)
        assert why in str(e.value)
    with pytest.raises(ConfigError, match="cpu_linear must be one of"):
        _cfg(cpu_linear="mkl")


def test_training_with_onednn_linear_lands_where_f_linear_does(tmp_path, monkeypatch):
    """Two optimizer steps of a 128-wide model: --cpu-linear auto (oneDNN, said in the log) against
    --cpu-linear torch, same seed and batches: the same weights to float rounding. And run to run
    bit-identical, which --deterministic's exact resume needs.

    Whether the oneDNN kernel ran is counted at the kernel call itself, not inferred from rounding:
    on some CPUs (an Intel Xeon with AMX) oneDNN and MKL round these shapes identically."""
    from vitkit.io import load_safetensors
    from vitkit.train.loop import train

    calls = {"onednn": 0}
    real_lp = kernels._onednn_linear

    def counted_lp(x, w, b):
        calls["onednn"] += 1
        return real_lp(x, w, b)

    monkeypatch.setattr(kernels, "_onednn_linear", counted_lp)
    kw = dict(dim=128, depth=1, num_heads=2, subset=64, batch_size=16, progress=False, threads=1, epochs=1,
              max_steps=2, deterministic=True)
    logs: list[str] = []
    train(TrainConfig(out=str(tmp_path / "onednn"), **kw), log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    ran_onednn = calls["onednn"]
    train(TrainConfig(out=str(tmp_path / "torch"), cpu_linear="torch", **kw), log=lambda *a, **k: None)
    ran_with_torch = calls["onednn"] - ran_onednn
    train(TrainConfig(out=str(tmp_path / "again"), **kw), log=lambda *a, **k: None)
    assert any("oneDNN matmuls" in line for line in logs)
    # Two steps through qkv, proj, fc1, fc2 (forward and input gradient at least): the kernel ran ...
    assert ran_onednn >= 2 * 4 * 2, ran_onednn
    assert ran_with_torch == 0  # ... and --cpu-linear torch kept F.linear
    a = load_safetensors(tmp_path / "onednn" / "last" / "model.safetensors")
    again = load_safetensors(tmp_path / "again" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], again[k]) for k in a)
    b = load_safetensors(tmp_path / "torch" / "last" / "model.safetensors")
    for k in a:  # ... to the same training
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bench_train_step_runs_vitkits_linear_on_onednn_unless_asked_not_to():
    from vitkit.bench.throughput import run_benchmark

    cfg = ViTConfig(image_size=32, patch_size=8, num_classes=10, dim=128, depth=1, num_heads=2, mlp_dim=256)
    rows = {r.impl: r for r in run_benchmark(cfg, batch_size=2, train=True, warmup=0, runs=1, compare_timm=False)}
    assert "oneDNN" in (rows["vitkit"].note or "")
    rows = {r.impl: r for r in run_benchmark(cfg, batch_size=2, train=True, warmup=0, runs=1, compare_timm=False,
                                             cpu_linear="torch")}
    assert rows["vitkit"].note is None
    with pytest.raises(ConfigError, match="cpu_linear"):
        run_benchmark(cfg, batch_size=2, train=True, runs=1, compare_timm=False, cpu_linear="onednn")
