"""--amp auto (vitkit.train.amp): fp32 without native bf16 and for tiny steps, unmeasured; otherwise bf16
autocast only where the measured step is >= MARGIN faster; the choice logged, saved with the run and
kept on --resume (bit-exact); --amp off / bf16 never measure. The CPU's flags and the timing are
monkeypatched, so every branch runs on any CPU. Also: a saved run that sets the removed --cpu-linear
still loads and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitkit import ViT, ViTConfig, cpu
from vitkit.errors import ConfigError
from vitkit.io import load_safetensors
from vitkit.train import amp
from vitkit.train.checkpoint import STATE_NAME, load_state
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train

TINY = dict(dim=16, depth=1, num_heads=2, subset=64, batch_size=16, progress=False, threads=1, epochs=1,
            deterministic=True)
pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test measures into a cache of its own (vitkit.measured): a ratio another test faked is not read."""
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(amp.measured.ENV, raising=False)


def _wide() -> ViT:  # 128 wide, 64 tokens: ~3 GFLOP a step at batch 16, above MIN_STEP_GFLOP
    return ViT(ViTConfig(image_size=32, patch_size=4, dim=128, depth=1, num_heads=2, num_classes=10))


def _never(*a, **k):
    raise AssertionError("measured")


def _ratio(r: float):
    return lambda model, shape, budget_s=amp.BUDGET_S: r


def test_no_native_bf16_means_fp32_unmeasured(monkeypatch):
    monkeypatch.setenv(cpu.OFF_ENV, "all")  # no CPU flag at all, on any architecture
    monkeypatch.setattr(amp, "measure_bf16_speedup", _never)
    got = amp.choose_amp("auto", _wide(), torch.device("cpu"), 16)
    assert got.amp == "off" and "no native bf16" in got.note and "--amp bf16 forces it" in got.note


@pytest.mark.parametrize("ratio, want, said", [
    (1.9, "bf16", "amp: bf16 autocast (1.90x the fp32 step here, measured; --amp off for fp32)"),
    (0.8, "off", "amp: fp32 (bf16 autocast 0.80x the fp32 step here, measured, under 1.1x; --amp bf16 forces it)"),
    (1.05, "off", "1.05x the fp32 step here, measured, under"),  # faster, but within the margin: fp32
])
def test_auto_follows_the_measurement(monkeypatch, ratio, want, said):
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)
    shapes = []
    monkeypatch.setattr(amp, "measure_bf16_speedup", lambda m, shape, budget_s=2.0: shapes.append(shape) or ratio)
    got = amp.choose_amp("auto", _wide(), torch.device("cpu"), 16)
    assert got.amp == want and said in got.note
    assert shapes == [(16, 3, 32, 32)]  # the run's micro-batch at the model's input size


def test_a_measured_ratio_is_cached_so_the_same_command_chooses_the_same(monkeypatch, tmp_path):
    """The first run measures (here: 1.12x, bf16); a later one on the same CPU, threads and model reads it,
    even where a new measurement would fall under the margin; another shape, threads, or the cache turned
    off measure again; a corrupt file is measured over and rewritten."""
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)
    monkeypatch.setattr(amp, "measure_bf16_speedup", _ratio(1.12))
    first = amp.choose_amp("auto", _wide(), torch.device("cpu"), 16)
    assert first.amp == "bf16" and "1.12x the fp32 step here, measured;" in first.note
    monkeypatch.setattr(amp, "measure_bf16_speedup", _never)
    again = amp.choose_amp("auto", _wide(), torch.device("cpu"), 16)
    path = tmp_path / "cache" / amp.CACHE_FILE
    assert again.amp == "bf16" and "1.12x the fp32 step here, measured at " in again.note
    assert f"and cached in {path}" in again.note
    (entry,) = json.loads(path.read_text()).values()
    assert entry["ratio"] == 1.12 and entry["input"] == [16, 3, 32, 32] and entry["cpu"] == cpu.describe()
    monkeypatch.setattr(amp, "measure_bf16_speedup", _ratio(0.9))
    assert amp.choose_amp("auto", _wide(), torch.device("cpu"), 8).amp == "off"  # another micro-batch
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert amp.choose_amp("auto", _wide(), torch.device("cpu"), 16).amp == "off"  # other threads
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv(amp.measured.ENV, "off")
    assert amp.choose_amp("auto", _wide(), torch.device("cpu"), 16).amp == "off"  # not read
    monkeypatch.delenv(amp.measured.ENV)
    path.write_text("{not json")
    assert amp.choose_amp("auto", _wide(), torch.device("cpu"), 16).amp == "off"
    assert len(json.loads(path.read_text())) == 1  # rewritten, with the new measurement


def test_explicit_amp_tiny_steps_cuda_and_probes_are_not_measured(monkeypatch):
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)
    monkeypatch.setattr(amp, "measure_bf16_speedup", _never)
    for given in ("off", "bf16"):
        assert amp.choose_amp(given, _wide(), torch.device("cpu"), 16) == amp.AmpChoice(given, None)
    digits = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10))
    tiny = amp.choose_amp("auto", digits, torch.device("cpu"), 64)  # the default digits run: ~0.2 GFLOP a step
    assert tiny.amp == "off" and "too small" in tiny.note
    assert amp.choose_amp("auto", _wide(), torch.device("cuda"), 16).amp == "off"
    assert amp.choose_amp("auto", _wide(), torch.device("cpu"), 16, probe=True).amp == "off"


def test_measuring_leaves_the_model_and_the_rng_as_they_were():
    m = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, num_classes=10,
                      drop_path=0.1)).eval()  # stochastic depth draws from the RNG in training mode
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    r = amp.measure_bf16_speedup(m, (4, 3, 16, 16), budget_s=0.0)
    assert r > 0 and not m.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _last(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "last" / "model.safetensors")


def test_auto_choice_is_saved_and_a_resume_keeps_it_bit_exact(tmp_path, monkeypatch):
    """auto picks bf16 (measured 1.9x); the run records it; resumed where measuring would now say fp32,
    it keeps bf16 without measuring and lands exactly where an uninterrupted --amp bf16 run lands."""
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)
    monkeypatch.setattr(amp, "MIN_STEP_GFLOP", 0.0)
    monkeypatch.setattr(amp, "measure_bf16_speedup", _ratio(1.9))
    said: list[str] = []
    run = tmp_path / "auto"
    train(TrainConfig(out=str(run), max_steps=2, **TINY), log=lambda m, *a, **k: said.append(str(m)))
    assert any(m.startswith("amp: bf16 autocast (1.90x") for m in said)
    assert load_state(run / STATE_NAME)["amp"] == "bf16"
    assert "amp: auto" in (run / "config.yaml").read_text()  # the recipe keeps auto: another CPU measures again
    monkeypatch.setattr(amp, "measure_bf16_speedup", _never)
    said.clear()
    summary = train(TrainConfig(**TINY), resume=run, log=lambda m, *a, **k: said.append(str(m)))
    assert summary["amp"] == "bf16"
    assert any("amp: bf16 autocast (--amp auto: the run's own choice" in m for m in said)
    whole = tmp_path / "bf16"
    assert train(TrainConfig(out=str(whole), amp="bf16", **TINY), log=lambda *a, **k: None)["amp"] == "bf16"
    a, b = _last(run), _last(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_amp_off_never_measures(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)
    monkeypatch.setattr(amp, "MIN_STEP_GFLOP", 0.0)
    monkeypatch.setattr(amp, "measure_bf16_speedup", _never)
    summary = train(TrainConfig(out=str(tmp_path / "r"), amp="off", max_steps=1, **TINY), log=lambda *a, **k: None)
    assert summary["amp"] == "off"


def test_a_run_saved_with_the_removed_cpu_linear_still_resumes(tmp_path, capsys):
    run = tmp_path / "old"
    train(TrainConfig(out=str(run), max_steps=1, **TINY), log=lambda *a, **k: None)
    with open(run / "config.yaml", "a") as f:
        f.write("cpu_linear: onednn\n")
    (run / "amendments.yaml").write_text("- {time: '2026-11-24T14:00:00Z', step: 1, epoch: 0, "
                                         "changes: {cpu_linear: torch}}\n")
    said: list[str] = []
    summary = train(TrainConfig(**TINY), resume=run, log=lambda m, *a, **k: said.append(str(m)))
    assert summary["finished"]
    notes = [m for m in said if "sets cpu_linear: ignored" in m]
    assert len(notes) == 2 and all("0.97x timm's step on an Intel AMX CPU" in m for m in notes)
    assert TrainConfig.from_file(run / "config.yaml").amp == "auto"  # as a recipe: dropped with a note too
    assert "sets cpu_linear: ignored" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"cpu_linear \(the oneDNN fp32 training kernels were removed"):
        TrainConfig.from_dict({"cpu_linear": "torch"})
    assert json.loads((run / "summary.json").read_text())["amp"] == "off"
