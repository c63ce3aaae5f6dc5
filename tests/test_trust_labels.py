"""Issue 22, sections 2, 3 and 7 (knn / probe): classes matched to a model's labels by name (one
matcher, vitkit.data.labels), validation never on the test split (one helper,
vitkit.data.validation), honest split names, and top-5 / one-class results that say what they are.

The oracle model is set by hand: output 0 ("face" by default) exactly when a 16x16 image is bright
(mean pixel > 0.5), so every expected accuracy is known without training."""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli.main import main
from vitkit.data import DataSpec, build_data
from vitkit.data.labels import match_labels, parse_label_map
from vitkit.errors import ConfigError, InputError

BRIGHT, DARK = 200, 50


def bright_model(path: Path, labels=("face", "nonface"), bright_output: int = 0) -> Path:
    """A ViT whose output ``bright_output`` wins exactly for bright images: the patch embedding
    puts (mean - 0.5) and -(mean - 0.5) in two channels, the blocks are identities (zero output
    projections), LayerNorm turns them into +-4 and the head reads them."""
    cfg = vitkit.ViTConfig(image_size=16, patch_size=8, in_channels=3, num_classes=len(labels) if labels else 2,
                           dim=32, depth=1, num_heads=2, mlp_dim=32, pooling="mean", class_token=False,
                           pos_embed="none")
    m = vitkit.create_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for n in ("blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"):
            m.get_parameter(n).fill_(1.0)
        w = m.patch_embed.proj.weight
        w[0].fill_(1 / w[0].numel())
        w[1].fill_(-1 / w[1].numel())
        m.patch_embed.proj.bias[:2] = torch.tensor([-0.5, 0.5])
        m.head.weight[bright_output, :2] = torch.tensor([1.0, -1.0])
        m.head.weight[1 - bright_output, :2] = torch.tensor([-1.0, 1.0])
    m.labels = list(labels) if labels else None
    m.preprocess_cfg = {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3,
                        "interpolation": "bilinear", "crop_pct": 1.0}
    m.save_pretrained(path)
    return path


def _png(value: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(value + rng.integers(-20, 21, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def folder(root: Path, classes: dict[str, int], splits=("train", "test"), n: int = 6) -> Path:
    """root/<split>/<class>/<i>.png, each class a brightness."""
    for split in splits:
        for k, (name, value) in enumerate(classes.items()):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(_png(value, 100 * k + i + (7 if split == "test" else 0)))
    return root


def _eval(model: Path, data: Path, *extra: str) -> int:
    out = next(data.parent / f"eval{i}" for i in range(100) if not (data.parent / f"eval{i}").exists())
    return main(["eval", "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data), "--workers",
                 "0", "--out", str(out), "--json", *extra])


# --------------------------------------------------------------------------- the label matcher
def test_match_labels_by_name_position_and_map():
    assert match_labels(["a", "b"], ["a", "b"]).identity
    m = match_labels(["nonface", "face"], ["face", "nonface"])
    assert m.index == (1, 0) and m.by == "name" and "by name" in m.note
    m = match_labels(None, ["x", "y"], num_outputs=2)
    assert m.by == "position" and m.identity and "no labels" in m.note
    with pytest.raises(InputError, match="2 outputs and no labels.*3 classes"):
        match_labels(None, ["x", "y", "z"], num_outputs=2)
    with pytest.raises(InputError, match=r"not among the model's labels: \['a_nonface', 'b_face'\].*label-map"):
        match_labels(["face", "nonface"], ["a_nonface", "b_face"])
    with pytest.raises(InputError, match=r"labels not in the data: \['c'\]"):
        match_labels(["a", "b", "c"], ["a", "b"])
    m = match_labels(["face", "nonface"], ["a_nonface", "b_face"], {"a_nonface": "nonface", "b_face": "face"})
    assert m.index == (1, 0) and m.by == "label map"
    assert match_labels(["dog", "cat"], ["husky", "malamute", "cat"], {"husky": "dog", "malamute": "dog"}).index \
        == (0, 0, 1)  # several classes onto one label: only through an explicit map
    with pytest.raises(ConfigError, match=r"names class\(es\) \['zebra'\]"):
        match_labels(["a", "b"], ["a", "b"], {"zebra": "a"})
    with pytest.raises(ConfigError, match=r"maps to \['q'\]"):
        match_labels(["a", "b"], ["a", "c"], {"c": "q"})
    with pytest.raises(InputError, match=r"\['a'\] appear more than once"):
        match_labels(["a", "b"], ["a", "a"])
    with pytest.raises(InputError, match="more than one output labelled"):
        match_labels(["crane", "crane", "bird"], ["crane", "bird"], {"crane": "crane"})
    with pytest.raises(ConfigError, match="has none"):
        match_labels(None, ["a"], {"a": "b"})


def test_parse_label_map_inline_json_and_lines(tmp_path):
    assert parse_label_map("a_nonface=nonface, b_face=face") == {"a_nonface": "nonface", "b_face": "face"}
    (tmp_path / "m.json").write_text('{"x y": "face"}')
    assert parse_label_map(str(tmp_path / "m.json")) == {"x y": "face"}
    (tmp_path / "m.txt").write_text("a=b\n\nc=d\n")
    assert parse_label_map(str(tmp_path / "m.txt")) == {"a": "b", "c": "d"}
    with pytest.raises(ConfigError, match="expected data_class=model_label entries, got 'ab'"):
        parse_label_map("ab")
    with pytest.raises(ConfigError, match="mapped twice"):
        parse_label_map("a=b,a=c")
    assert parse_label_map(None) is None


def test_eval_matches_classes_by_name(tmp_path, capsys):
    """The issue's case: a folder whose class names sort the other way than the model's labels.
    Same names in another order: remapped (1.0, not 0.0); other names: refused naming both lists,
    or mapped with --label-map."""
    plain = folder(tmp_path / "plain", {"face": BRIGHT, "nonface": DARK})
    model = bright_model(tmp_path / "m")
    assert _eval(model, plain) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    # the model's labels in the other order (output 0 = nonface, bright wins output 1)
    reordered = bright_model(tmp_path / "m2", labels=("nonface", "face"), bright_output=1)
    assert _eval(reordered, plain) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert r["accuracy"] == 1.0 and r["label_match"] == "name" and r["labels"] == ["nonface", "face"]
    assert "matched to the model's labels by name" in cap.err
    assert [pc["support"] for pc in r["per_class"]] == [6, 6]
    # renamed folders (sorting the other way): refused, naming both lists
    swapped = folder(tmp_path / "swapped", {"a_nonface": DARK, "b_face": BRIGHT})
    assert _eval(model, swapped) == 2
    err = capsys.readouterr().err
    assert "['a_nonface', 'b_face']" in err and "['face', 'nonface']" in err and "--label-map" in err
    assert len(err.strip().splitlines()) == 1
    assert _eval(model, swapped, "--label-map", "a_nonface=nonface,b_face=face") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["accuracy"] == 1.0 and r["label_match"] == "label map"
    (tmp_path / "map.json").write_text('{"a_nonface": "nonface", "b_face": "face"}')
    assert _eval(model, swapped, "--label-map", str(tmp_path / "map.json")) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


def test_eval_of_a_model_without_labels_matches_by_position_and_says_so(tmp_path, capsys):
    data = folder(tmp_path / "d", {"a_bright": BRIGHT, "b_dark": DARK})
    model = bright_model(tmp_path / "m", labels=None)
    assert _eval(model, data) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert r["accuracy"] == 1.0 and r["label_match"] == "position" and r["labels"] == ["a_bright", "b_dark"]
    assert len([line for line in cap.err.splitlines() if "has no labels" in line]) == 1
    assert _eval(model, data, "--label-map", "a_bright=x") == 2
    assert "has none" in capsys.readouterr().err


# --------------------------------------------------------------------------- class lists in the data
def _shard(path: Path, labels: list[int]) -> None:
    with tarfile.open(path, "w") as tf:
        for i, y in enumerate(labels):
            for ext, data in (("png", _png(BRIGHT if y == 0 else DARK, i)), ("cls", str(y).encode())):
                info = tarfile.TarInfo(f"s{path.stem}{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, BytesIO(data))


def test_classes_txt_with_a_name_twice_is_refused(tmp_path):
    _shard(tmp_path / "train-000.tar", [0, 1, 0, 1])
    _shard(tmp_path / "val-000.tar", [0, 1])
    (tmp_path / "classes.txt").write_text("face\nface\n")
    with pytest.raises(InputError, match=r"classes.txt: class name\(s\) \['face'\] appear more than once"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(tmp_path)))


def test_hf_split_with_class_names_in_another_order_is_matched_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")

    def split(labels, names):
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        imgs = [{"bytes": _png(BRIGHT if names[y] == "face" else DARK, i), "path": None} for i, y in enumerate(labels)]
        return datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)

    # test's ClassLabel lists the names the other way: its 0 is "nonface"
    datasets.DatasetDict(train=split([0, 1] * 4, ["face", "nonface"]), validation=split([0, 1], ["face", "nonface"]),
                         test=split([0, 0, 1], ["nonface", "face"])).save_to_disk(str(tmp_path / "dd"))
    d = build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "dd")))
    assert d.classes == ["face", "nonface"] and d.test.targets.tolist() == [1, 1, 0]
    assert any("matched to train's by name" in n for n in d.notes)
    datasets.DatasetDict(train=split([0, 1] * 4, ["face", "nonface"]),
                         validation=split([0, 1], ["face", "cat"])).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(InputError, match=r"the val split's class names: .*not among the train split's labels: "
                                         r"\['cat'\]"):
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "other")))


# --------------------------------------------------------------------------- validation never on test
def test_probe_chooses_C_on_a_split_held_out_from_train_not_on_test(tmp_path, capsys):
    data = folder(tmp_path / "d", {"face": BRIGHT, "nonface": DARK}, n=10)
    splits = build_data(DataSpec(dataset="imagefolder", data_dir=str(data), seed=3))
    train_files = {str(p) for p in (data / "train").rglob("*.png")}
    assert splits.val_name == "train-holdout" and splits.test_name == "test"
    assert {str(p) for p in splits.val.paths} <= train_files and len(splits.val) == 2
    assert not {str(p) for p in splits.val.paths} & {str(p) for p in splits.train.paths}
    assert any("held out for validation" in n for n in splits.notes)
    model = bright_model(tmp_path / "m")
    assert main(["probe", "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data),
                 "--workers", "0", "--C", "0.1,1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["split"], r["select_split"], r["count"], r["train_count"]) == ("test", "train-holdout", 20, 18)
    assert main(["probe", "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data),
                 "--workers", "0", "--C", "1"]) == 0
    out = capsys.readouterr().out
    assert "train-holdout top-1" in out and "imagefolder test split" in out and "chosen on the train-holdout" in out


def test_probe_without_a_test_split_scores_val_and_chooses_C_on_train(tmp_path, capsys):
    data = folder(tmp_path / "d", {"face": BRIGHT, "nonface": DARK}, splits=("train", "val"), n=10)
    model = bright_model(tmp_path / "m")
    assert main(["probe", "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data),
                 "--workers", "0", "--C", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["split"], r["select_split"], r["count"], r["train_count"]) == ("val", "train-holdout", 20, 18)
    assert main(["knn", "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data),
                 "--workers", "0", "--k", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["split"], r["count"], r["top1"]) == ("val", 20, 1.0)


def test_webdataset_and_hf_without_test_split_name_the_split_they_use(tmp_path):
    from vitkit.train.config import TrainConfig
    from vitkit.train.loop import test_split_name, train

    (tmp_path / "w").mkdir()
    _shard(tmp_path / "w" / "train-000.tar", [0, 1] * 4)
    _shard(tmp_path / "w" / "val-000.tar", [0, 1])
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(tmp_path / "w")))
    assert test_split_name(d) == "val" and d.test is d.val
    (tmp_path / "w" / "val-000.tar").rename(tmp_path / "w" / "test-000.tar")
    with pytest.raises(InputError, match="no val-\\*.tar shards.*never used to validate"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(tmp_path / "w")))
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["face", "nonface"])})
    mk = lambda ys: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [{"bytes": _png(BRIGHT if y == 0 else DARK, i), "path": None} for i, y in enumerate(ys)],
         "label": ys}, features=feats)
    datasets.DatasetDict(train=mk([0, 1] * 4), validation=mk([0, 1, 0])).save_to_disk(str(tmp_path / "hf"))
    said = []
    s = train(TrainConfig(dataset="hf", data_dir=str(tmp_path / "hf"), out=str(tmp_path / "run"), dim=16, depth=1,
                          num_heads=2, batch_size=4, epochs=1, max_steps=1, progress=False, threads=1, workers=0),
              log=said.append)
    assert s["test_split"] == "val"
    assert any("on the val split" in line for line in said) and not any("on the test split" in x for x in said)
    # no validation split either: held out from train, and named so
    datasets.DatasetDict(train=mk([0, 1] * 5)).save_to_disk(str(tmp_path / "hf2"))
    d = build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "hf2")))
    assert (d.val_name, d.test_name, len(d.train), len(d.val)) == ("train-holdout", "train-holdout", 8, 2)


# --------------------------------------------------------------------------- top-5 and one class
def test_knn_and_probe_report_top5_only_with_more_than_5_classes(tmp_path, capsys):
    data = folder(tmp_path / "d", {"face": BRIGHT, "nonface": DARK})
    model = bright_model(tmp_path / "m")
    for cmd in (["knn", "--k", "3"], ["probe", "--C", "1"]):
        args = [cmd[0], "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data), "--workers", "0",
                *cmd[1:]]
        assert main(args + ["--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["top5"] is None and "more than 5 classes" in r["top5_note"] and r["top1"] == 1.0
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "top-5 1.0" not in out and "more than 5 classes" in out


def test_knn_and_probe_on_one_class_are_refused_in_one_line(tmp_path, capsys):
    data = folder(tmp_path / "d", {"face": BRIGHT})
    model = bright_model(tmp_path / "m")
    for cmd in ("knn", "probe"):
        assert main([cmd, "--model", str(model), "--dataset", "imagefolder", "--data-dir", str(data),
                     "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if "error" in line] == [
            f"vitkit {cmd}: error: {'k-NN' if cmd == 'knn' else 'the linear probe'} needs training samples of at "
            "least 2 classes; the train split has 1: ['face']"]
