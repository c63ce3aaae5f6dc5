"""vitkit bench: the timm twin is the same function, results are well-formed (no timing thresholds)."""

import json

import pytest
import torch

import vitkit
from vitkit.bench.throughput import run_benchmark, timm_equivalent
from vitkit.cli.main import main

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
