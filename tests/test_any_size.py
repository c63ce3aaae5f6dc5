"""Any input size where the source allows it (issue 26, section 3), each against the peer library:

* every loader sets ``dynamic_img_size`` exactly where the source model takes any size (the peer's
  own forward at another size is the oracle: it runs -> vitkit runs with the same numbers; it
  refuses -> vitkit refuses), resampling the table as the source does;
* the checkpoint's preprocessing decides the input size (transformers' AutoImageProcessor on the
  same directory and a real photo is the oracle);
* the CLI's ``--image-size`` is used and its errors name what came; load notes go to stderr once;
* ONNX graphs of dynamic models take two sizes in onnxruntime with vitkit's outputs;
* a size the user gave is never asked for again."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_interop_common import max_diff, randomize
from vitkit.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

# facebook/dinov2-small's preprocessor_config.json (the hub file, verbatim)
DINOV2_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}


def _saved(ref, path):
    torch.manual_seed(0)
    randomize(ref)
    ref.save_pretrained(path)
    return type(ref).from_pretrained(path).eval()


def hf_vit(path):
    return _saved(transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64), add_pooling_layer=False), path)


def hf_deit(path):
    return _saved(transformers.DeiTModel(transformers.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64), add_pooling_layer=False), path)


def hf_clip(path):
    return _saved(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)), path)


def hf_siglip(path):
    return _saved(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)), path)


def hf_dinov2(path, registers: int = 0):
    kw = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**kw, num_register_tokens=registers)
        return _saved(transformers.Dinov2WithRegistersModel(cfg), path)
    return _saved(transformers.Dinov2Model(transformers.Dinov2Config(**kw)), path)


# (builder, another size the patch divides, does the peer's plain forward take it?, HF output = vitkit's
# forward_features (last_hidden_state) or model(x) (pooler_output: CLIP's last_hidden_state is before its norm))
HF_PEERS = {
    "vit": (hf_vit, (40, 48), False, "last_hidden_state"),
    "deit": (hf_deit, (40, 48), False, "last_hidden_state"),
    "clip": (hf_clip, (40, 48), False, "pooler_output"),
    "siglip": (hf_siglip, (40, 48), False, "pooler_output"),
    "dinov2": (hf_dinov2, (42, 70), True, "last_hidden_state"),
    "dinov2_registers": (lambda p: hf_dinov2(p, 2), (42, 70), True, "last_hidden_state"),
}


def _peer_out(ref, x, output="last_hidden_state", **kw):
    with torch.no_grad():
        return getattr(ref(pixel_values=x, **kw), output)


@pytest.mark.parametrize("name", list(HF_PEERS))
def test_hf_loaders_take_other_sizes_exactly_where_transformers_does(name, tmp_path):
    build, other, peer_dynamic, output = HF_PEERS[name]
    ref = build(tmp_path / name)
    got = vitkit.from_pretrained(tmp_path / name)
    assert got.config.dynamic_img_size == peer_dynamic
    x = torch.randn(2, 3, *other)
    if peer_dynamic:
        want = _peer_out(ref, x, output)
    else:
        with pytest.raises((ValueError, RuntimeError)):  # transformers refuses it without interpolate_pos_encoding
            _peer_out(ref, x, output)
        with pytest.raises(InputError, match="expected"):
            got(x)
        # ... and interpolates as vitkit's pos_resample="hf" does when asked to
        want = _peer_out(ref, x, output, interpolate_pos_encoding=True)
        got = vitkit.from_pretrained(tmp_path / name, image_size=other)
    with torch.no_grad():
        assert max_diff(got.forward_features(x) if output == "last_hidden_state" else got(x), want) <= 1e-5


def _timm_vit(dynamic: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomize(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
        dynamic_img_size=dynamic)).eval()


@pytest.mark.parametrize("dynamic", [True, False])
def test_timm_model_args_dynamic_img_size(dynamic, tmp_path):
    from vitkit.io import save_state_dict

    ref = _timm_vit(dynamic)
    save_state_dict(ref.state_dict(), tmp_path / "model.safetensors")
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 3, "pretrained_cfg": {"input_size": [3, 32, 32]},
        "model_args": {**args, **({"dynamic_img_size": True} if dynamic else {})}}))
    got = vitkit.from_pretrained(tmp_path)
    assert got.config.dynamic_img_size == dynamic and got.config.pos_resample == "timm"
    x = torch.randn(2, 3, 24, 48)
    if not dynamic:
        with pytest.raises(AssertionError):  # timm's fixed-size patch embed refuses it
            ref(x)
        with pytest.raises(InputError):
            got(x)
        return
    with torch.no_grad():
        assert max_diff(got(x), ref(x)) <= 1e-5
    # vitkit's timm export writes it back into model_args
    back = vitkit.from_pretrained(got.export_to("timm", tmp_path / "out"))
    assert back.config.dynamic_img_size


def test_hf_preprocessor_decides_the_input_size_as_the_pipeline_does(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from vitkit.data.transforms import eval_transform

    ref = hf_dinov2(tmp_path / "d")
    (tmp_path / "d" / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    model = vitkit.from_pretrained(tmp_path / "d")
    assert model.config.image_hw == (56, 56) and model.preprocess_cfg.input_size == (3, 224, 224)
    assert any("input size 224x224 from the checkpoint's preprocessing" in n for n in model.load_report.notes)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "d")
    for photo in (skdata.chelsea(), skdata.astronaut()):
        img = Image.fromarray(photo)
        want = processor(images=img, return_tensors="pt")["pixel_values"]
        x = eval_transform(model.preprocess_cfg)(img)[None]
        assert x.shape == want.shape == (1, 3, 224, 224)
        assert max_diff(x, want) <= 1e-4
        with torch.no_grad():
            assert max_diff(model.forward_features(x), _peer_out(ref, want)) <= 1e-4


def test_cli_image_size_is_used_and_notes_print_once(tmp_path, capsys):
    from vitkit.cli.main import main
    from vitkit.data.image import load_image
    from vitkit.data.transforms import eval_transform

    hf_dinov2(tmp_path / "d")
    (tmp_path / "d" / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    vectors = {}
    for size in ([], ["--image-size", "42", "70"]):
        assert main(["predict", "sample:china.jpg", "--model", str(tmp_path / "d"), "--json", *size]) == 0
        out, err = capsys.readouterr()
        vectors[len(size)] = torch.tensor(json.loads(out)["results"][0]["embedding"])
        assert err.count("input size 224x224 from the checkpoint's preprocessing") == (0 if size else 1)
        assert err.count("running at 42x70 (--image-size)") == (1 if size else 0)
    # the same numbers as the model run at that size by hand
    model = vitkit.from_pretrained(tmp_path / "d")
    pre = model.preprocess_cfg.for_input(3, (42, 70))
    x = eval_transform(pre)(load_image("sample:china.jpg", mode="RGB"))[None]
    with torch.no_grad():
        assert max_diff(vectors[3], model(x)[0]) <= 1e-5
    assert max_diff(vectors[0], vectors[3]) > 1e-3

    # errors name what came
    assert main(["predict", "sample:china.jpg", "--model", str(tmp_path / "d"), "--image-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 30 30" in err and "14x14" in err and "28 28" in err
    assert main(["explain", "sample:china.jpg", "--model", str(tmp_path / "d"), "--size", "30", "20",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--size 30 20" in capsys.readouterr().err


def test_cli_embed_runs_at_image_size(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from vitkit.cli.main import main
    from vitkit.data.transforms import eval_transform

    hf_dinov2(tmp_path / "d")
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.png")
    assert main(["embed", str(tmp_path / "cat.png"), "--model", str(tmp_path / "d"), "--out",
                 str(tmp_path / "e.parquet"), "--workers", "0", "--image-size", "28", "42"]) == 0
    assert "vitkit embed: note: running at 28x42 (--image-size)" in capsys.readouterr().err
    got = torch.tensor(pq.read_table(tmp_path / "e.parquet").column("embedding").to_pylist()[0])
    model = vitkit.from_pretrained(tmp_path / "d")
    x = eval_transform(model.preprocess_cfg.for_input(3, (28, 42)))(Image.open(tmp_path / "cat.png").convert("RGB"))
    with torch.no_grad():
        assert max_diff(got, model.forward_head(model.forward_features(x[None]), pre_logits=True)[0]) <= 1e-5


def test_cli_mae_decoder_note_and_every_command_takes_image_size(tmp_path, capsys):
    from vitkit.cli.main import build_parser, main

    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=32)
    transformers.ViTMAEForPreTraining(cfg).save_pretrained(tmp_path / "mae")
    assert main(["predict", "sample:flower.jpg", "--model", str(tmp_path / "mae")]) == 0
    err = capsys.readouterr().err
    assert err.count("vitkit predict: note: the MAE decoder (") == 1
    parser = build_parser()
    for cmd in (["embed", "x.png", "--out", "o.parquet"], ["knn", "--dataset", "digits"],
                ["probe", "--dataset", "digits"], ["predict", "x.png"], ["explain", "x.png"]):
        args = parser.parse_args([cmd[0], "--model", "m", *cmd[1:], "--image-size", "48", "64"])
        assert args.image_size == [48, 64], cmd


@pytest.mark.parametrize("pos_resample", ["hf", "timm"])  # plain bicubic; antialiased (as hf_dinov2_registers)
def test_onnx_of_a_dynamic_model_runs_at_two_sizes(pos_resample, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = randomize(vitkit.ViT(vitkit.ViTConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2,
                                                  num_classes=3, dynamic_img_size=True,
                                                  pos_resample=pos_resample))).eval()
    path = model.export_to("onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [str(d) for d in sess.get_inputs()[0].shape[2:]] == ["14*grid_h", "14*grid_w"]
    for hw in ((28, 28), (42, 70)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert max_diff(torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0]), model(x)) <= 1e-4


def test_onnx_keeps_fixed_sizes_where_the_resampling_cannot_be_symbolic():
    from vitkit.interop.graph import dynamic_hw

    cfg = vitkit.ViTConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2, dynamic_img_size=True)
    assert dynamic_hw(vitkit.ViT(cfg))
    with pytest.warns(UserWarning, match="'dinov2' position resampling"):
        assert not dynamic_hw(vitkit.ViT(cfg.replace(pos_resample="dinov2")))
    assert not dynamic_hw(vitkit.ViT(cfg.replace(dynamic_img_size=False)))


def test_onnx_of_a_fixed_model_keeps_its_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize(vitkit.ViT(vitkit.ViTConfig(image_size=28, patch_size=14, dim=32, depth=1, num_heads=2)))
    sess = ort.InferenceSession(str(model.export_to("onnx", tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[2:] == [28, 28]


def test_registers_table_read_by_the_size_hint(tmp_path):
    """2x2 patches + class + 4 registers = 9 rows: square either way. The size the user gives (or
    arch's) says the extra rows are the prefix tokens; without one, timm's default for register models."""
    from vitkit.io import save_state_dict

    model = randomize(vitkit.ViT(vitkit.ViTConfig(image_size=32, patch_size=16, dim=32, depth=1, num_heads=2,
                                                  num_registers=4, pos_embed_prefix=True)))
    save_state_dict(model.state_dict(), tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    for hint in (dict(image_size=32), dict(arch=model.config)):
        got = vitkit.from_pretrained(tmp_path / "m.safetensors", num_heads=2, **hint)
        assert got.config.pos_embed_prefix and got.config.image_hw == (32, 32)
        with torch.no_grad():
            assert max_diff(got(x), model(x)) <= 1e-5


def test_a_size_that_does_not_fit_is_answered_with_ones_that_do(tmp_path):
    """A bare timm file of a 4x5 grid + class row (21 rows, square neither way): the table is read with
    its class row (timm's default), and a size given that does not fit gets the sizes that do."""
    model = randomize(vitkit.ViT(vitkit.ViTConfig(image_size=(32, 40), patch_size=8, dim=32, depth=1, num_heads=2)))
    path = model.export_to("timm", tmp_path / "t") / "model.safetensors"
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained(path, image_size=(48, 48), num_heads=2)
    msg = str(e.value)
    assert "(48, 48)" in msg and "(32, 40)" in msg  # names what came and a size that fits
    got = vitkit.from_pretrained(path, image_size=(32, 40), num_heads=2)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert max_diff(got(x), model(x)) <= 1e-5
