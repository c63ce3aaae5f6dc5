"""Export: ONNX (opset >= 17, dynamic batch) runs in onnxruntime like PyTorch; TorchScript reloads
with the same logits; the CLI `vitkit export` / `vitkit convert` write loadable files."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, tiny
from vitkit.cli.main import main


@pytest.fixture(scope="module")
def onnx_model_path(tmp_path_factory):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = tiny(num_registers=1, layer_scale=1e-3)
    path = model.export_to("onnx", tmp_path_factory.mktemp("onnx") / "vit.onnx")
    return model, path


@pytest.mark.slow
def test_onnx_dynamic_batch_matches(onnx_model_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model, path = onnx_model_path
    proto = onnx.load(str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (batch, 10)
        assert abs(got - ref).max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_roundtrip(tmp_path):
    model = tiny()
    path = model.export_to("torchscript", tmp_path / "vit.pt")
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(loaded(x), model(x)) <= 1e-5


def test_unknown_export_format(tmp_path):
    with pytest.raises(vitkit.ConfigError, match="export format must be one of"):
        tiny().export_to("keras", tmp_path / "x")


def test_cli_convert_then_export(tmp_path, capsys):
    """`vitkit convert` a torchvision checkpoint to vitkit format, then `vitkit export` it as timm."""
    tvm = pytest.importorskip("torchvision").models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4).eval()
    torch.save(tvm.state_dict(), tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "vk"), "--num-heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "torchvision" in out and "32x32 input" in out
    model = vitkit.load_model(tmp_path / "vk")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), tvm(x)) <= 1e-5
    assert main(["export", str(tmp_path / "vk"), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    meta = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert meta["model_args"]["num_heads"] == 2 and meta["pretrained_cfg"]["crop_pct"] == 0.875
    back = vitkit.from_pretrained(tmp_path / "timm")
    with torch.no_grad():
        assert max_diff(back(x), tvm(x)) <= 1e-5


def test_cli_convert_resample_and_grey(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "g"), "--image-size", "64",
                 "--in-channels", "1"]) == 0
    grey = vitkit.load_model(tmp_path / "g")
    assert grey.config.in_channels == 1 and grey.config.image_hw == (64, 64)
    assert grey.patch_embed.proj.weight.shape[1] == 1
