"""Issue 22, section 7: a full disk is one line naming the file; a weight file's content, not its
name, picks its reader (and a wrong extension is said); `summary` reads any model source; a timm
export names the timm model it is; the "next:" commands paste into a shell and use the run's own
images; `predict` takes a folder; docs/weights.md says DINOv3 loads."""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from test_interop_common import max_diff, tiny
from vitkit.cli.main import main
from vitkit.errors import CheckpointError
from vitkit.io import WriteError, atomic_write

pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py (train sets --threads)


def _one_error_line(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vitkit {cmd}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- 1. a full disk
def _safetensors_error(code: int, text: str):
    from safetensors import SafetensorError

    # safetensors 0.8's words for an io::Error while saving (seen on a full 64 KiB tmpfs)
    return SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")


# How each writer vitkit uses reports a full disk (seen on a full tmpfs; see vitkit.io._write_failure)
FULL_DISK = {
    "safetensors": lambda: _safetensors_error(errno.ENOSPC, "No space left on device"),
    "safetensors quota": lambda: _safetensors_error(errno.EDQUOT, "Disk quota exceeded"),
    "torch.save short write": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                                                   "vs 534"),
    "faiss": lambda: RuntimeError("Error in void faiss::write_index(const Index*, IOWriter*, int) at "
                                  "/project/faiss/impl/index_write.cpp:499: Error: 'ret == (size * 4)' failed: write "
                                  "error in x.faiss: 4051 != 2560000 (No space left on device)"),
}


@pytest.mark.parametrize("kind", sorted(FULL_DISK))
def test_every_writer_s_full_disk_is_one_write_error(tmp_path, kind):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise FULL_DISK[kind]()

    with pytest.raises(WriteError) as e:
        atomic_write(target, write)
    why = {"safetensors quota": "disk quota exceeded", "torch.save short write": "the write failed ("}.get(
        kind, "no space left on device")
    assert str(e.value).startswith(f"cannot write {target}: {why}")
    assert str(e.value).endswith("; the previous file is unchanged") and "\n" not in str(e.value)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_other_write_errors_keep_their_type(tmp_path):
    """Only a full disk is rewritten: a permission error from safetensors stays what it was."""
    from safetensors import SafetensorError

    def write(tmp):
        raise _safetensors_error(errno.EACCES, "Permission denied")

    with pytest.raises(SafetensorError):
        atomic_write(tmp_path / "x", write)


def test_no_room_for_the_temporary_file_is_one_line_too(tmp_path, monkeypatch):
    """A full inode table fails at mkstemp, before any byte is written."""
    import tempfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(WriteError, match=r"^cannot write .*model\.safetensors: no space left on device; nothing"):
        tiny().save_pretrained(tmp_path / "m")


def test_cli_prints_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    src, out = tmp_path / "m", tmp_path / "timm out"
    tiny().save_pretrained(src)

    def full(*a, **k):
        raise _safetensors_error(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["export", str(src), "--format", "timm", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert line == (f"vitkit export: error: cannot write {out / 'model.safetensors'}: no space left on device; "
                    "nothing was written")


# --------------------------------------------------------------------------- 2. content, not name
def _weights(path: Path, kind: str) -> Path:
    state = {"patch_embed.proj.weight": torch.randn(8, 3, 4, 4), "blocks.0.attn.qkv.weight": torch.randn(24, 8)}
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif kind == "zip":
        torch.save(state, path)
    elif kind == "legacy pickle":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in state.items()})
    return path


@pytest.mark.parametrize("kind, name, what, fix", [
    ("safetensors", "w.pth", "a safetensors file, not a PyTorch checkpoint (torch.save)", "w.safetensors"),
    ("safetensors", "pytorch_model.bin", "a safetensors file, not a PyTorch", "pytorch_model.safetensors"),
    ("zip", "w.safetensors", "a PyTorch checkpoint (torch.save), not a safetensors file", "w.pth"),
    ("legacy pickle", "w.safetensors", "a PyTorch checkpoint (torch.save), not a safetensors file", "w.pth"),
    ("npz", "w.pth", "a NumPy .npz archive, not a PyTorch checkpoint", "w.npz"),
])
def test_a_wrong_extension_is_named_and_renaming_fixes_it(tmp_path, kind, name, what, fix):
    from vitkit.interop.common import read_state_dict

    path = _weights(tmp_path / name, kind)
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is {what}") and msg.endswith(f"; rename it to {fix}")
    assert "\n" not in msg and "weights_only=False" not in msg and "header too large" not in msg
    if kind != "npz":  # the advice works: the same file under the name it asks for reads
        good = path.rename(tmp_path / fix)
        assert set(read_state_dict(good)) == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight"}


def test_a_pickle_saved_as_a_vitkit_model_safetensors_is_named(tmp_path):
    m = tmp_path / "m"
    tiny().save_pretrained(m)
    torch.save(tiny().state_dict(), m / "model.safetensors")
    for load in (vitkit.load_model, vitkit.from_pretrained):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is a PyTorch checkpoint \(torch\.save\), not a "
                                                  r"safetensors file: .* rename it to model\.pth$"):
            load(m)


class _Unsafe:
    def __reduce__(self):  # unpickling would call os.getcwd(): harmless, but not a tensor
        return (os.getcwd, ())


def test_refused_pickles_never_suggest_weights_only_false(tmp_path):
    """torch's own message for a refused global tells the user to retry with weights_only=False or
    to allowlist the class; vitkit says which global it met and nothing of the kind."""
    path = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(2), "x": _Unsafe()}, path)
    with pytest.raises(Exception) as torch_says:
        torch.load(path, weights_only=True)
    assert "weights_only" in str(torch_says.value)  # what vitkit must not pass on
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained(path, format="timm")
    msg = str(e.value)
    assert msg.startswith(f"refusing to load {path}: ") and "never executes" in msg
    assert f"(it refers to the Python object {os.getcwd.__module__}.getcwd)" in msg
    assert "weights_only=False" not in msg and "safe_globals" not in msg and "\n" not in msg


# --------------------------------------------------------------------------- 3. summary of any source
def test_summary_reads_a_hugging_face_dir_and_load_model_says_what_it_is(tmp_path, capsys):
    model = tiny(num_classes=3)
    hf = model.export_to("hf", tmp_path / "hf vit")
    assert main(["summary", str(hf), "--no-walkthrough"]) == 0
    out = capsys.readouterr().out
    assert f"Total params: {model.num_params():,}" in out and "neither" not in out
    with pytest.raises(CheckpointError) as e:
        vitkit.load_model(hf)
    assert str(e.value) == (f'{hf} is not a vitkit model directory: its config.json has no "format": "vitkit" key '
                            "(a Hugging Face transformers dir: ViT, DeiT, Dinov2[WithRegisters], DINOv3ViT, CLIP, "
                            "SigLIP/SigLIP2, ViTMAE, Aimv2); vitkit.from_pretrained reads it, as every vitkit command does")


def test_summary_of_a_checkpoint_file_resizes_and_refuses_its_patch_size(tmp_path, capsys):
    """A timm state dict file (no config): summary reads it as from_pretrained does, at a new size."""
    model = tiny(num_classes=3)
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    assert main(["summary", str(path), "--no-walkthrough", "--image-size", "48"]) == 0
    ref = vitkit.from_pretrained(path, image_size=48)
    out = capsys.readouterr().out
    assert f"Total params: {ref.num_params():,}" in out and "(B, 3, 48, 48)" in out and "(B, 36, 32)" in out
    assert main(["summary", str(path), "--patch-size", "4"]) == 2
    assert "--patch-size applies to a preset only" in _one_error_line(capsys.readouterr().err, "summary")
    assert main(["summary", str(tmp_path / "nowhere")]) == 2
    line = _one_error_line(capsys.readouterr().err, "summary")
    assert "no such file, directory or hub id, nor a preset" in line


# --------------------------------------------------------------------------- 4. timm's name for an export
@pytest.mark.parametrize("kw, name", [
    (dict(image_size=112, patch_size=14, dim=384, depth=12, num_heads=6), "vit_small_patch14_dinov2"),
    (dict(image_size=112, patch_size=14, dim=384, depth=12, num_heads=6, num_registers=4, layer_scale=1e-5),
     "vit_small_patch14_reg4_dinov2"),
    (dict(image_size=384, patch_size=16, dim=768, depth=12, num_heads=12), "vit_base_patch16_384"),
    (dict(image_size=256, patch_size=16, dim=768, depth=12, num_heads=12, class_token=False, pooling="map"),
     "vit_base_patch16_siglip_256"),
    (dict(image_size=224, patch_size=14, dim=1024, depth=24, num_heads=16, norm_pre=True, patch_bias=False,
          norm_eps=1e-5, act="quick_gelu"), "vit_large_patch14_clip_quickgelu_224"),
    (dict(image_size=224, patch_size=16, dim=192, depth=12, num_heads=3, dist_token=True),
     "deit_tiny_distilled_patch16_224"),
])
def test_timm_architecture_is_the_registered_model_of_those_sizes(kw, name):
    """The oracle is timm's registry: the named model, built on the meta device, has the config's
    width, depth, heads, patch and registers."""
    timm = pytest.importorskip("timm")
    from vitkit.interop.timm import timm_architecture

    c = vitkit.ViTConfig(num_classes=10, **kw)
    assert timm_architecture(c) == name
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert (ref.embed_dim, len(ref.blocks), ref.blocks[0].attn.num_heads, ref.patch_embed.patch_size[0],
            ref.num_reg_tokens) == (c.dim, c.depth, c.num_heads, c.patch_hw[0], c.num_registers)


@pytest.mark.parametrize("kw, name", [
    (dict(image_size=48, patch_size=16, dim=192, depth=12, num_heads=3, num_registers=4, layer_scale=1e-5),
     "vit_tiny_patch16_224"),  # ViT-Ti/16, the cheapest registered size (ViT-S/14: the test above)
    (dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2), "vit_base_patch16_224"),  # no timm model
])
def test_timm_export_loads_in_timm_by_its_name_with_the_same_logits(tmp_path, kw, name):
    """timm's own loader of a local hub dir (create_model("local-dir:DIR")) builds the named model
    with the exported model_args (img_size, registers, layer scale...) and gives the same logits."""
    timm = pytest.importorskip("timm")
    model = tiny(num_classes=3, **kw)
    out = model.export_to("timm", tmp_path / "timm")
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == name and meta["model_args"]["img_size"] == [kw["image_size"]] * 2
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, kw["image_size"], kw["image_size"])
    with torch.no_grad():
        assert max_diff(ref(x), model(x)) <= 1e-5


# --------------------------------------------------------------------------- 5. next: lines
def _next_commands(text: str) -> list[list[str]]:
    """The "next:" commands as a shell would split them (the comment after "  # " dropped)."""
    lines = text.split("next:\n", 1)[1].splitlines()
    return [shlex.split(ln.rsplit("  # ", 1)[0]) for ln in lines if ln.strip().startswith("vitkit ")]


def _faces(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c in ("face", "no face"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"img {i}.png")
    return root


def test_next_lines_paste_into_a_shell_and_use_the_run_s_own_images(tmp_path, monkeypatch, capsys):
    """A face model trained in a folder with spaces: every suggested command splits back into the
    real paths, the image is one of the run's test images (no digits:5), and the predict command
    runs as suggested."""
    monkeypatch.chdir(tmp_path)
    _faces(tmp_path / "my photos")
    assert main(["train", "--dataset", "imagefolder", "--data-dir", "my photos", "--out", "runs/face run",
                 "--dim", "16", "--depth", "1", "--num-heads", "2", "--epochs", "1", "--batch-size", "8",
                 "--image-size", "8", "--patch-size", "4", "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    cmds = _next_commands(text)
    assert "digits:" not in text
    predict, explain, evaluate = cmds[:3]
    assert predict[:4] == ["vitkit", "predict", "--model", "runs/face run"] and explain[3] == "runs/face run"
    assert evaluate == ["vitkit", "eval", "--model", "runs/face run"]
    image = Path(predict[4])
    assert image.parent.parent == Path("my photos/test") and image.is_file() and explain[4] == predict[4]
    assert main(predict[1:]) == 0
    assert "face" in capsys.readouterr().out


def test_next_lines_without_files_use_a_placeholder():
    from vitkit.cli.train import next_steps

    text = next_steps({"run_dir": "runs/it's mine", "dataset": "hf", "example_image": None})
    assert _next_commands(text)[0] == ["vitkit", "predict", "--model", "runs/it's mine", "IMAGE.png"]
    assert "digits:" not in text


# --------------------------------------------------------------------------- 6. predict on a folder
def test_predict_takes_a_folder_one_line_per_image_in_embed_s_order(tmp_path, capsys):
    from vitkit.features.inputs import list_images

    model = tiny(num_classes=4)
    model.labels = ["ant", "bee", "cat", "dog"]
    src = model.save_pretrained(tmp_path / "m")
    photos = tmp_path / "photos"
    (photos / "sub dir").mkdir(parents=True)
    for i, p in enumerate([photos / "b.png", photos / "a.jpg", photos / "sub dir" / "c.png"]):
        Image.new("RGB", (40, 30), (60 * i, 200, 90)).save(p)
    (photos / "notes.txt").write_text("not an image")
    files = list_images([str(photos)])[0]
    assert main(["predict", "--model", str(src), "--json", "-k", "2", *files]) == 0
    want = json.loads(capsys.readouterr().out)["results"]
    assert main(["predict", "--model", str(src), str(photos), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{r['file']}  " + "  ".join(f"{p['label']} {p['prob']:.4f}" for p in r["predictions"])
                     for r in want]
    assert [ln.split("  ")[0] for ln in lines] == [str(photos / "a.jpg"), str(photos / "b.png"),
                                                   str(photos / "sub dir" / "c.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", str(src), str(empty)]) == 2
    assert "no images" in _one_error_line(capsys.readouterr().err, "predict")


# --------------------------------------------------------------------------- 7. docs
def test_weights_doc_does_not_list_dinov3_as_not_yet():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "weights.md").read_text()
    not_yet = doc.split("**Not yet:**", 1)[1].split("\n\n", 1)[0] if "**Not yet:**" in doc else ""
    assert "DINOv3" not in not_yet
    assert "**DINOv3 loads**" in doc and "`dinov3`" in doc
