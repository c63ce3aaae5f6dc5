"""vitkit bench: the timm twin is the same function, results are well-formed (no timing thresholds)."""

import importlib.util
import json
import shutil
import statistics
import sys

import pytest
import torch

import vitkit
from vitkit import cpu
from vitkit.bench.throughput import run_benchmark, timm_equivalent
from vitkit.cli.main import main
from vitkit.errors import ConfigError

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("kw", [
    {},
    {"pooling": "mean", "class_token": False, "fc_norm": True},
    {"num_registers": 3, "pos_embed_prefix": False, "layer_scale": 1e-2},
    {"qkv_bias": False, "image_size": (32, 48), "patch_size": (8, 16), "act": "gelu_tanh"},
])
def test_timm_equivalent_computes_the_same_function(kw):
    torch.manual_seed(0)
    kw = {"image_size": 32, "patch_size": 8, **kw}
    m = vitkit.create_model("vit_tiny_patch16_224", depth=2, num_classes=5, **kw).eval()
    t = timm_equivalent(m.config).eval()
    t.load_state_dict(m.state_dict())  # strict: same names, same shapes
    x = torch.randn(2, 3, *m.config.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)


def test_timm_equivalent_refuses_what_timm_cannot_express():
    for kw in ({"norm_first": False}, {"pos_embed": "sincos2d"}, {"head_hidden_dim": 32}):
        assert timm_equivalent(vitkit.get_config("vit_tiny_patch16_224", **kw)) is None


@pytest.mark.parametrize("train", [False, True])
def test_run_benchmark_reports_both_impls(train):
    res = run_benchmark("vit_tiny_patch16_224", batch_size=2, train=train, warmup=1, runs=2,
                        image_size=32, depth=1)
    assert [r.impl for r in res] == ["vitkit", "timm"]
    for r in res:
        assert len(r.times_s) == 2 and r.median_s > 0
        assert r.images_per_s == pytest.approx(2 / r.median_s)
        assert r.mode == ("train" if train else "inference") and r.mfu is None  # no MFU on CPU
        assert r.page_faults is not None and r.page_faults >= 0  # counted on Linux
    vk, tm = res
    want = sorted(t / v for t, v in zip(tm.times_s, vk.times_s))
    assert vk.ratio_vs_timm == pytest.approx((want[0] + want[1]) / 2)  # median of the 2 paired ratios


@pytest.mark.parametrize("same", [False, True])
def test_train_step_optimizers(same):
    """By default each side steps with its own library's AdamW (vitkit: fused; timm:
    create_optimizer_v2); --same-optimizer gives both a plain torch AdamW."""
    res = run_benchmark("vit_tiny_patch16_224", batch_size=2, train=True, warmup=0, runs=1,
                        image_size=32, depth=1, same_optimizer=same)
    names = {r.impl: r.optimizer for r in res}
    if same:
        assert names == {"vitkit": "AdamW (torch default)", "timm": "AdamW (torch default)"}
    else:
        assert names == {"vitkit": "AdamW (fused)", "timm": "AdamW (torch default)"}


def test_bench_cli_json(capsys):
    assert main(["bench", "vit_tiny_patch16_224", "--batch-size", "1", "2", "--runs", "1", "--warmup", "0",
                 "--image-size", "32", "--json", "--predictor"]) == 0  # --predictor alone: no Predictor rows
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert [(d["impl"], d["batch_size"]) for d in lines] == [("vitkit", 1), ("timm", 1), ("vitkit", 2), ("timm", 2)]
    assert all(d["ratio_vs_timm"] > 0 for d in lines if d["impl"] == "vitkit")
    assert all(d["ratio_vs_timm"] is None for d in lines if d["impl"] == "timm")


def test_bench_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        run_benchmark("vit_tiny_patch16_224", dtype="fp8", image_size=32)


def test_bench_predictor_rows_are_paired_against_timm_fp32(capsys):
    """Default CPU inference: the model's forward, timm, and the Predictor's fp32/bf16/int8 rows,
    each with its paired ratio against timm fp32 eager (the same rounds) and a note on what ran."""
    assert main(["bench", "vit_tiny_patch16_224", "--batch-size", "2", "--runs", "2", "--warmup", "0",
                 "--image-size", "32", "--json", "--num-classes", "3"]) == 0
    rows = {d["impl"]: d for d in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert list(rows) == ["vitkit", "timm", "vitkit-fp32", "vitkit-bf16", "vitkit-int8"]
    for impl in ("vitkit", "vitkit-fp32", "vitkit-bf16", "vitkit-int8"):
        assert rows[impl]["ratio_vs_timm"] > 0
    assert rows["vitkit-fp32"]["note"] == "Predictor fp32 (engine)"
    assert rows["vitkit-int8"]["dtype"] == "int8" and "int8 (engine)" in rows["vitkit-int8"]["note"]
    assert rows["timm"]["ratio_vs_timm"] is None


@pytest.mark.slow
def test_bench_ort_int8_row():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    res = run_benchmark("vit_tiny_patch16_224", batch_size=2, warmup=0, runs=2, image_size=32, depth=1,
                        predictor=("int8",), ort_int8=True)
    rows = {r.impl: r for r in res}
    assert list(rows) == ["vitkit", "timm", "vitkit-int8", "ort-int8"]
    assert rows["ort-int8"].ratio_vs_timm > 0 and "quantize_dynamic" in rows["ort-int8"].note


def test_ort_int8_session_matches_the_model():
    """The ORT peer computes the same function (int8-close): its logits against the model's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import tempfile

    from vitkit.bench.throughput import ort_int8_step

    torch.manual_seed(0)
    m = vitkit.create_model("vit_tiny_patch16_224", image_size=32, depth=1, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with tempfile.TemporaryDirectory() as d:
        step, _ = ort_int8_step(m, x, d)
        got = torch.from_numpy(step()[0])  # the timed call returns the session's outputs
    with torch.no_grad():
        want = m(x)
    assert (got - want).abs().max() < 0.1 * want.abs().max()


TINY = vitkit.ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10)



def test_every_row_names_the_cpu(capsys):
    """The printed table and the JSON lines name the processor (model and ISA flags) on every row."""
    args = ["bench", "vit_tiny_patch16_224", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--image-size",
            "16", "--predictor"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [s for s in out if s.split()[:1] in (["vitkit"], ["timm"])]
    assert len(rows) == 2 and all(f"[{cpu.describe()}]" in s for s in rows), out
    assert main([*args, "--json"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert [d["machine"] for d in lines] == [cpu.describe()] * 2


def test_runtime_rows_that_cannot_run_say_why(monkeypatch, tmp_path, capsys):
    """No C++ compiler (an empty PATH), OpenVINO not importable, then a CPU without native bf16: the
    benchmark still runs, and each runtime's row says why it did not run, with no figures."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError, find_spec -> None
    monkeypatch.setattr(cpu, "bf16_native", lambda: True)  # the compiler and the package are the reasons
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx512_vnni"}))  # int8 units: the package is the reason
    res = run_benchmark(TINY, batch_size=2, warmup=0, runs=1, runtimes=("compile", "openvino", "int8"))
    rows = {r.impl: r for r in res}
    assert list(rows) == ["vitkit", "timm", "compile-bf16", "openvino-bf16", "static-int8"]
    assert "C++ compiler" in rows["compile-bf16"].skipped
    assert rows["openvino-bf16"].skipped == "not installed: pip install 'vitkit[openvino]'"
    assert "openvino" in rows["static-int8"].skipped and "vitkit[int8]" in rows["static-int8"].skipped
    for impl in ("compile-bf16", "openvino-bf16", "static-int8"):
        r = rows[impl]
        assert r.times_s == [] and r.images_per_s is None and r.ratio_vs_timm is None and r.setup_s is None
        assert r.dtype == impl.split("-")[-1] and r.batch_size == 2 and r.machine == cpu.describe()
    monkeypatch.undo()
    monkeypatch.setenv(cpu.OFF_ENV, "all")
    assert main(["bench", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--image-size", "16",
                 "--predictor", "--runtimes", "compile", "openvino", "int8", "--json", "vit_tiny_patch16_224"]) == 0
    lines = {d["impl"]: d for d in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    for impl in ("compile-bf16", "openvino-bf16", "static-int8"):
        assert lines[impl]["images_per_s"] is None and lines[impl]["machine"] == cpu.describe()
    assert "no native bf16" in lines["compile-bf16"]["skipped"]
    assert "no int8 dot-product units" in lines["static-int8"]["skipped"]


def test_unknown_runtime_is_a_config_error():
    with pytest.raises(ConfigError, match=r"runtimes must be among \['compile', 'openvino', 'int8'\]"):
        run_benchmark(TINY, batch_size=1, warmup=0, runs=1, runtimes=("tensorrt",))


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")
def test_compile_and_openvino_rows_time_the_predictors_runtimes(isolated, monkeypatch):
    """The runtime rows are Predictor(model, "bf16", backend=...) built before timing (timing compiles
    nothing), computing the model's function within bf16 rounding, paired against timm in the same rounds."""
    if isolated():
        return
    from torch._dynamo.utils import counters

    from vitkit.bench import runtimes

    monkeypatch.setattr(cpu, "bf16_native", lambda: True)  # the bf16 runtimes on any CPU
    built = {}

    def keep(*a, **k):
        built["rows"] = real(*a, **k)
        built["graphs"] = counters["stats"]["unique_graphs"]
        return built["rows"]

    real = runtimes.runtime_rows
    monkeypatch.setattr(runtimes, "runtime_rows", keep)
    res = run_benchmark(TINY, batch_size=2, warmup=1, runs=3, predictor=("bf16",),
                        runtimes=("compile", "openvino", "int8"))
    rows = {r.impl: r for r in res}
    assert list(rows) == ["vitkit", "timm", "vitkit-bf16", "compile-bf16", "openvino-bf16", "static-int8"]
    assert counters["stats"]["unique_graphs"] == built["graphs"]  # the timed rounds built nothing
    ran = ["compile-bf16"] + (["openvino-bf16"] if importlib.util.find_spec("openvino") else [])
    for impl in ran:
        r = rows[impl]
        assert r.skipped is None and r.dtype == "bf16" and r.setup_s > 0 and len(r.times_s) == 3
        want = statistics.median(t / v for t, v in zip(rows["timm"].times_s, r.times_s))
        assert r.ratio_vs_timm == pytest.approx(want)
        step = built["rows"].steps[impl]  # functools.partial(Predictor, x)
        p, (x,) = step.func, step.args
        assert p._chooser.chosen == {(tuple(x.shape), None): impl.split("-")[0]}
        with torch.no_grad():
            want = p.model(x)
        assert (step() - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3  # bf16 rounding of fp32
    assert "inductor, freezing" in rows["compile-bf16"].note
    assert "OpenVINO" in (rows["openvino-bf16"].note or rows["openvino-bf16"].skipped)
    assert rows["vitkit-bf16"].setup_s is None
    from vitkit.infer import int8

    q = rows["static-int8"]
    if int8.unavailable():  # no int8 units or no nncf here: the row says which
        assert q.skipped == int8.unavailable()
    else:  # the static int8 Predictor, timed in the same rounds, computing the model's function
        assert q.skipped is None and q.dtype == "int8" and q.setup_s > 0 and len(q.times_s) == 3
        step = built["rows"].steps["static-int8"]
        p, (x,) = step.func, step.args
        assert p.path == "int8" and "NNCF" in q.note
        with torch.no_grad():
            want = p.model(x)
        assert (step() - want).abs().max() <= 0.1 * want.abs().max() + 1e-2  # int8 rounding of fp32
