"""vitkit.infer.backends: which runtime runs a bf16 Predictor on the CPU. The compiled backend (inductor,
freezing) runs on a tiny model and agrees with the fp32 model within bf16 rounding; a built runtime is
kept (a second call compiles nothing); "auto" measures once per shape once the walk has run it a while, and keeps
its choice (timings replaced by fixed ones: no test depends on which CPU runs it), also on disk for a later
process; a runtime that is unavailable or fails to build falls back to the hand-written walk with a note."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vitkit import ViT, ViTConfig
from vitkit.errors import ConfigError
from vitkit.infer import Predictor, backends

TINY = dict(image_size=16, patch_size=8, dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """The disk cache of "auto"'s choices in this test's own folder (never the user's)."""
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(backends.CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def native_bf16(monkeypatch):
    """The bf16 path on any CPU (without native bf16 the Predictor would run fp32 and skip backends)."""
    monkeypatch.setattr("vitkit.infer.predictor.bf16_native", lambda: True)


def tiny(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    m = ViT(ViTConfig(**TINY)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m



def close_bf16(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within bf16 rounding of fp32 (8 bits of mantissa through one block)."""
    return got.shape == want.shape and bool((got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")
def test_compiled_backend_matches_fp32_and_compiles_once(isolated, native_bf16, monkeypatch):
    if isolated():
        return
    from torch._dynamo.utils import counters

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(3, 3, 16, 16)
    for seed in (0, 1):  # two models: each Predictor's graph holds its own weights
        m = tiny(seed)
        p = Predictor(m, "bf16", backend="compile")
        with torch.no_grad():
            want = m(x)
        assert close_bf16(p(x), want)
        graphs = counters["stats"]["unique_graphs"]
        assert close_bf16(p(x), want)
        assert counters["stats"]["unique_graphs"] == graphs  # the second call compiled nothing
        assert p._chooser.chosen == {((3, 3, 16, 16), None): "compile"}
        assert any("compile (asked for" in n for n in p.notes)
        again = Predictor(m, "bf16", backend="compile")  # as features / zero-shot build one per call
        assert close_bf16(again(x), want) and counters["stats"]["unique_graphs"] == graphs
        assert again._chooser is p._chooser and any("compile (asked for" in n for n in again.notes)
    assert len(calls) == 2 and all(k["options"] == {"freezing": True} for k in calls)
    with torch.no_grad():
        m.head.bias.add_(1.0)  # changed weights: a new bf16 copy, measured and built anew
    changed = Predictor(m, "bf16", backend="compile")
    assert changed._chooser is not p._chooser
    assert close_bf16(changed(x), m(x).detach())


class FakeRuntime:
    """Stands in for a built runtime: the model's own forward, counted."""

    def __init__(self, stages, net):
        self.stages, self.net, self.calls = stages, net, 0

    def __call__(self, x, mask):
        self.calls += 1
        return self.stages(self.net, x, mask)


def fake_compile(monkeypatch, speedup: float) -> list[str]:
    """"compile" available (openvino not), built as the model's own forward, timed ``speedup`` x the
    walk; returns the names of the runtimes built, in order."""
    built = []

    def build(name, net, stages, x, mask, trim):
        built.append(name)
        return FakeRuntime(stages, net)

    monkeypatch.setattr(backends, "build", build)
    monkeypatch.setattr(backends, "unavailable", lambda name, text: "" if name == "compile" else "not installed")
    monkeypatch.setattr(backends, "_timed", lambda runs, x, mask: {n: 1.0 if n == "eager" else 1 / speedup
                                                                    for n in runs})
    return built


@pytest.mark.parametrize("speedup,want", [(2.0, "compile"), (1.01, "eager")])
def test_auto_measures_once_per_shape_and_keeps_the_choice(native_bf16, monkeypatch, speedup, want):
    built = fake_compile(monkeypatch, speedup)
    m = tiny()
    p = Predictor(m, "bf16")  # backend="auto" is the default
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 1e9)
    for _ in range(3):  # until the walk has spent AUTO_AFTER_S on a shape, nothing is built
        p(x)
    assert built == [] and p._chooser.chosen == {} and p._chooser.spent[((2, 3, 16, 16), None)] > 0
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 0.0)
    for _ in range(3):
        p(x)
    assert built == ["compile"]  # measured once, kept
    assert p._chooser.chosen == {((2, 3, 16, 16), None): want}  # a gain under MARGIN keeps the walk
    assert any(n.startswith(f"bf16 backend for input 2x3x16x16: {want}, measured") for n in p.notes)
    fake = p._chooser.built[("compile", x.shape[1:], True)]
    before = fake.calls
    with torch.no_grad():
        ref = m(x)
    assert close_bf16(p(x), ref)
    assert fake.calls == before + (want == "compile")
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 1e9)
    p(torch.randn(4, 3, 16, 16))  # another shape starts its own count
    assert ((4, 3, 16, 16), None) not in p._chooser.chosen


def test_unavailable_or_failing_backend_falls_back_to_the_walk(native_bf16, monkeypatch):
    m = tiny()
    x = torch.randn(2, 3, 16, 16)
    walk = Predictor(m, "bf16", backend="eager")
    assert walk._chooser is None
    find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",  # openvino not installed
                        lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    p = Predictor(m, "bf16", backend="openvino")
    assert torch.equal(p(x), walk(x))
    assert "OpenVINO is not installed" in p.notes[-1] and p._chooser.chosen[((2, 3, 16, 16), None)] == "eager"

    def broken(name, net, stages, x, mask, trim):
        raise RuntimeError("no graph for you")

    monkeypatch.setattr(backends, "build", broken)
    monkeypatch.setattr(backends, "unavailable", lambda name, text: "")
    p = Predictor(m, "bf16", backend="compile")
    assert torch.equal(p(x), walk(x))
    assert "compile failed to build (RuntimeError: no graph for you)" in p.notes[-1]


def test_auto_with_nothing_else_available_never_times(native_bf16, monkeypatch):
    monkeypatch.setattr(backends, "unavailable", lambda name, text: "not here")
    monkeypatch.setattr(backends, "_timed", lambda *a: pytest.fail("nothing to compare the walk with"))
    p = Predictor(tiny(), "bf16")
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 0.0)
    for _ in range(3):
        p(torch.randn(2, 3, 16, 16))
    assert p._chooser.chosen == {} and p.notes == []


def test_text_tower_compile_stays_on_the_walk():
    assert "text tower" in backends.unavailable("compile", text=True)


def test_backend_arguments():
    m = tiny()
    with pytest.raises(ConfigError, match="backend must be one of"):
        Predictor(m, "bf16", backend="tensorrt")
    for dt in ("fp32", "int8"):
        with pytest.raises(ConfigError, match="runs a bf16 Predictor"):
            Predictor(m, dt, backend="compile")
    assert Predictor(m, "fp32")._chooser is None  # fp32 (and exact) keep their walk


def test_no_native_bf16_runs_fp32_without_backends(monkeypatch):
    monkeypatch.setattr("vitkit.infer.predictor.bf16_native", lambda: False)
    p = Predictor(tiny(), "bf16", backend="compile")
    assert p.dtype == "fp32" and p._chooser is None


def test_openvino_backend_matches_fp32(isolated, native_bf16):
    if isolated():
        return
    pytest.importorskip("openvino")
    m = tiny()
    x = torch.randn(3, 3, 16, 16)
    p = Predictor(m, "bf16", backend="openvino", output="pooled")
    with torch.no_grad():
        want = m.forward_head(m.forward_features(x), pre_logits=True)
    assert close_bf16(p(x), want)
    assert p._chooser.chosen == {((3, 3, 16, 16), None): "openvino"}


def test_openvino_backend_runs_a_text_tower_at_every_trimmed_length(isolated, native_bf16):
    if isolated():
        return
    pytest.importorskip("openvino")
    from vitkit import TextConfig
    from vitkit.model.text import TextTransformer

    torch.manual_seed(0)
    m = TextTransformer(TextConfig(vocab_size=100, context_length=16, dim=32, depth=1, num_heads=4, mlp_dim=64,
                                   embed_dim=24, eos_token_id=99, causal=True, pooling="eot_argmax")).eval()
    p = Predictor(m, "bf16", backend="openvino")
    g = torch.Generator().manual_seed(1)
    for end in (3, 9, 15):  # CLIP's trim cuts after the batch's last end token: 4, 10, 16 positions
        ids = torch.randint(1, 98, (3, 16), generator=g)
        ids[:, end] = 99
        mask = (torch.arange(16) <= end).long().expand(3, 16)
        for am in (None, mask):
            with torch.no_grad():
                want = m(ids, am)
            assert close_bf16(p(ids, am), want)
    assert set(p._chooser.chosen.values()) == {"openvino"}


@pytest.fixture
def fake_runtimes(monkeypatch):
    """"compile" available, measured 2x the walk, chosen at the first call."""
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 0.0)
    return fake_compile(monkeypatch, 2.0)


def fresh_process(monkeypatch):
    """What a new Python process has: no chooser kept in memory, and no time to measure."""
    monkeypatch.setattr(backends, "_CHOOSERS", backends.weakref.WeakKeyDictionary())
    monkeypatch.setattr(backends, "AUTO_AFTER_S", 1e9)
    monkeypatch.setattr(backends, "_timed", lambda *a: pytest.fail("a cached choice is not measured again"))


def test_auto_choice_is_cached_on_disk_for_a_later_process(native_bf16, fake_runtimes, cache_dir, monkeypatch):
    x = torch.randn(2, 3, 16, 16)
    Predictor(tiny(), "bf16")(x)  # measured: compile, 2x
    assert fake_runtimes == ["compile"] and backends.cache_path() == cache_dir / backends.CACHE_FILE
    (entry,) = json.loads(backends.cache_path().read_text()).values()
    assert entry["backend"] == "compile" and entry["input"] == [2, 3, 16, 16] and entry["output"] == "logits"
    fresh_process(monkeypatch)
    m = tiny(seed=1)  # other weights, the same architecture: the same choice
    p = Predictor(m, "bf16")
    with torch.no_grad():
        assert close_bf16(p(x), m(x))  # the first call already runs the cached winner
    assert fake_runtimes == ["compile", "compile"] and p._chooser.chosen == {((2, 3, 16, 16), None): "compile"}
    assert any("compile (chosen by measurement on" in n and f"cached in {backends.cache_path()}" in n
               for n in p.notes)
    p(torch.randn(4, 3, 16, 16))  # another shape was never measured: the walk, waiting its turn
    assert ((4, 3, 16, 16), None) not in p._chooser.chosen
    other = Predictor(m, "bf16", output="pooled")  # another output: its own entry
    other(x)
    assert ((2, 3, 16, 16), None) not in other._chooser.chosen
    backends.clear_cache()
    assert not backends.cache_path().exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"k": 3}'])
def test_a_bad_cache_file_is_ignored_and_rewritten(native_bf16, fake_runtimes, monkeypatch, text):
    path = backends.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(text)
    x = torch.randn(2, 3, 16, 16)
    p = Predictor(tiny(), "bf16")
    p(x)
    assert p._chooser.chosen == {((2, 3, 16, 16), None): "compile"}  # measured, as with no cache
    assert [e["backend"] for e in json.loads(path.read_text()).values()] == ["compile"]


def test_the_cache_can_be_switched_off(native_bf16, fake_runtimes, monkeypatch):
    monkeypatch.setenv(backends.CACHE_ENV, "off")
    Predictor(tiny(), "bf16")(torch.randn(2, 3, 16, 16))
    assert fake_runtimes == ["compile"] and not backends.cache_path().exists()


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    assert backends.cache_path() == tmp_path / "cache" / backends.CACHE_FILE
    monkeypatch.delenv("VITKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.cache_path() == tmp_path / "xdg" / "vitkit" / backends.CACHE_FILE
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backends.cache_path() == tmp_path / "home" / ".cache" / "vitkit" / backends.CACHE_FILE


def test_a_predictor_built_again_reuses_the_checked_bf16_copy(native_bf16, monkeypatch):
    m = tiny()
    x = torch.randn(2, 3, 16, 16)
    p = Predictor(m, "bf16")
    want = p(x)
    with monkeypatch.context() as mp:
        mp.setattr(Predictor, "_verify", lambda *a: pytest.fail("checked again"))
        mp.setattr("vitkit.infer.predictor.copy.deepcopy", lambda *a: pytest.fail("copied again"))
        again = Predictor(m, "bf16")
    assert again._net is p._net and again._plan is p._plan and again.path == "engine"
    assert torch.equal(again(x), want)
    with torch.no_grad():
        m.head.bias.add_(1.0)  # changed weights: a new copy
    changed = Predictor(m, "bf16")
    assert changed._net is not p._net
    with torch.no_grad():
        assert close_bf16(changed(x), m(x))
    m.blocks[0].register_forward_hook(lambda *a: None)  # a hook now: not the copy made without it
    assert Predictor(m, "bf16")._net is not changed._net
