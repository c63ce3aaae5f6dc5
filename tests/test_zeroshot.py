"""Zero-shot classification and text search (vitkit.features.zeroshot, `vitkit zeroshot`, `eval --zeroshot`,
`embed --text`, `search --text`) against the peers: transformers' zero-shot pipeline, open_clip's
build_zero_shot_classifier, and the peer models' own logits and similarities. Tiny random-weight models
saved by the peer libraries themselves; images at the models' native size, so both sides' preprocessing
is the same rescale + normalise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("pyarrow")
PIL_Image = pytest.importorskip("PIL.Image")

import vitkit  # noqa: E402
from text_helpers import (  # noqa: E402
    open_clip_model,
    randomize,
    save_clip_tokenizer,
    save_open_clip_dir,
    save_siglip_tokenizer,
)
from vitkit.cli.main import main  # noqa: E402
from vitkit.errors import ConfigError  # noqa: E402
from vitkit.features.zeroshot import IMAGENET_TEMPLATES, TEMPLATE_SETS, ZeroShotClassifier, zeroshot_weights  # noqa: E402

LABELS = ["cat", "dog", "red car"]


def _clip_dir(d, seed=0):
    vocab = save_clip_tokenizer(d)
    tc = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=77, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    ref = randomize(transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc,
                                                                    projection_dim=24)), seed).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(4.0)  # probabilities far from uniform: a wrong head shows
    ref.save_pretrained(str(d))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(d))
    return d


def _siglip_dir(d):
    pytest.importorskip("sentencepiece")
    save_siglip_tokenizer(d)
    # as google/siglip-*'s own tokenizer_config.json: ids only, no padding mask (SigLIP was trained attending
    # to its padding; the pipeline passes whatever the tokenizer returns)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_input_names": ["input_ids"]}))
    tc = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=64, projection_size=24)  # 64: the pipeline pads SigLIP texts to 64
    vc = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    ref = randomize(transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc))).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(2.0)
        ref.logit_bias.fill_(-1.0)
    ref.save_pretrained(str(d))
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(d))
    return d


def _images(d, n, seed=0, size=32):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = d / f"img{i}.png"
        # smooth-ish images: random colour fields, so the tiny models see different inputs
        base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        PIL_Image.fromarray(base).resize((size, size), PIL_Image.NEAREST).save(f)
        out.append(str(f))
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _clip_dir(tmp_path_factory.mktemp("clip"))


def _run_json(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------ vitkit zeroshot == transformers' pipeline
@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("template", ["{}", "a photo of a {}."])
def test_zeroshot_equals_transformers_pipeline(tmp_path, capsys, clip_dir, family, template):
    d = clip_dir if family == "clip" else _siglip_dir(tmp_path / "siglip")
    files = _images(tmp_path / "imgs", 3)
    templates = "simple" if template == "a photo of a {}." else template  # `simple` is that prompt
    rc, out, _ = _run_json(capsys, ["zeroshot", *files, "--model", str(d), "--labels", ",".join(LABELS),
                                    "--templates", templates, "--top-k", "3", "--json"])
    assert rc == 0
    doc = json.loads(out)
    assert doc["probabilities"] == ("softmax" if family == "clip" else "sigmoid")
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(d), device="cpu")
    for f, r in zip(files, doc["results"]):
        want = {x["label"]: x["score"] for x in pipe(PIL_Image.open(f), candidate_labels=LABELS,
                                                     hypothesis_template=template)}
        got = {p["label"]: p["prob"] for p in r["predictions"]}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in LABELS], [want[k] for k in LABELS], atol=1e-5, rtol=0)
        assert [p["label"] for p in r["predictions"]] == sorted(want, key=lambda k: -want[k])  # best first
    if family == "clip":
        assert max(abs(p["prob"] - 1 / 3) for r in doc["results"] for p in r["predictions"]) > 0.02


def test_zeroshot_folder_and_labels_file_text_output(tmp_path, capsys, clip_dir):
    _images(tmp_path / "imgs" / "sub", 2)
    (tmp_path / "labels.txt").write_text("cat\n\ndog\n")
    rc, out, _ = _run_json(capsys, ["zeroshot", str(tmp_path / "imgs"), "--model", str(clip_dir), "--labels-file",
                                    str(tmp_path / "labels.txt"), "-k", "1"])
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(ln.split()[1] in ("cat", "dog") for ln in lines)


# ------------------------------------------------------------------ the template-averaged head == open_clip's
def test_template_sets_are_clips():
    oc = pytest.importorskip("open_clip.zero_shot_metadata")
    assert IMAGENET_TEMPLATES == tuple(t("{}") for t in oc.OPENAI_IMAGENET_TEMPLATES) and len(IMAGENET_TEMPLATES) == 80
    assert TEMPLATE_SETS["imagenet7"] == tuple(t("{}") for t in oc.SIMPLE_IMAGENET_TEMPLATES)


def test_imagenet_head_equals_open_clip_build_zero_shot_classifier(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    ref, vision_cfg, text_cfg = open_clip_model({"width": 32, "heads": 2, "layers": 1, "context_length": 16})
    save_open_clip_dir(ref, tmp_path, vision_cfg, text_cfg)
    pair = vitkit.load_image_text(tmp_path, tokenizer=default_bpe())
    long = "a very long and winding description of an unusually decorated garden gnome"  # past 16 tokens
    labels = ["tench", "goldfish", "Great White Shark", long]
    notes = []
    W = zeroshot_weights(pair, labels, "imagenet", batch_size=50, note=notes.append)  # batches cut across classes
    want = build_zero_shot_classifier(ref, lambda t: open_clip.tokenize(t, context_length=16), labels,
                                      OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=3)  # (E, C)
    torch.testing.assert_close(W, want.T, atol=1e-5, rtol=0)
    assert len(notes) == 1 and repr(long) in notes[0] and "16-token" in notes[0] and "tench" not in notes[0]
    assert zeroshot_weights(pair, labels, "imagenet") is W  # computed once per label set
    # as a head: open_clip's zero-shot logits, 100 * normalize(img) @ W, with the model's own scale
    pixels = torch.randn(3, 3, 32, 32)
    clf = ZeroShotClassifier(pair, labels, "imagenet")
    with torch.no_grad():
        want_logits = ref.logit_scale.exp() * ref.encode_image(pixels, normalize=True) @ want
        torch.testing.assert_close(clf(pixels), want_logits, atol=1e-4, rtol=1e-5)
    assert clf.labels == labels and clf.config.num_classes == 4
    # a text tower changed in place (a training step, load_state_dict) is never served the old embeddings
    with torch.no_grad():
        pair.text.pos_embed.add_(torch.randn_like(pair.text.pos_embed))
    W2 = zeroshot_weights(pair, labels, "imagenet")
    assert W2 is not W and not torch.allclose(W2, W, atol=1e-3)


# ------------------------------------------------------------------ eval --zeroshot == the peer's logits
def test_eval_zeroshot_accuracy_equals_peer(tmp_path, capsys, clip_dir):
    classes = ["cat", "dog", "red car"]
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            _images(tmp_path / "data" / split / c, 4, seed=10 * k + (split == "val"))
    rc, out, _ = _run_json(capsys, ["eval", "--zeroshot", "--model", str(clip_dir), "--dataset", "imagefolder",
                                    "--data-dir", str(tmp_path / "data"), "--split", "val", "--json", "--out",
                                    str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    assert rc == 0
    r = json.loads(out)
    ref = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(str(clip_dir))
    tok = transformers.AutoTokenizer.from_pretrained(str(clip_dir))
    text = tok([f"a photo of a {c}." for c in classes], padding=True, return_tensors="pt")
    cm = np.zeros((3, 3), int)
    for k, c in enumerate(classes):
        for f in sorted((tmp_path / "data" / "val" / c).iterdir()):
            px = proc(images=[PIL_Image.open(f).convert("RGB")], return_tensors="pt").pixel_values
            with torch.no_grad():
                pred = int(ref(pixel_values=px, **text).logits_per_image.argmax())
            cm[k, pred] += 1
    assert r["count"] == 12 and r["labels"] == classes and r["zeroshot"]["templates"] == "simple"
    assert r["confusion_matrix"] == cm.tolist()
    assert r["accuracy"] == pytest.approx(np.trace(cm) / 12)
    assert 0 < np.trace(cm) < 12 or len(set(cm.argmax(1))) > 1  # the predictions differ between images
    # folders named by id, the prompts' names given by --label-map: the same numbers
    for k, c in enumerate(classes):
        for split in ("train", "val"):
            (tmp_path / "data" / split / c).rename(tmp_path / "data" / split / f"n0{k}")
    rc, out, _ = _run_json(capsys, ["eval", "--zeroshot", "--model", str(clip_dir), "--dataset", "imagefolder",
                                    "--data-dir", str(tmp_path / "data"), "--split", "val", "--json", "--out",
                                    str(tmp_path / "out2"), "--workers", "0", "--device", "cpu",
                                    "--label-map", "n00=cat,n01=dog,n02=red car"])
    assert rc == 0 and json.loads(out)["confusion_matrix"] == cm.tolist()


# ------------------------------------------------------------------ text search == the peer's similarity
def test_text_search_nearest_by_peer_similarity(tmp_path, capsys, clip_dir):
    files = _images(tmp_path / "imgs", 6, seed=3)
    idx = tmp_path / "idx.parquet"
    assert main(["embed", str(tmp_path / "imgs"), "--model", str(clip_dir), "--pool", "head", "--out", str(idx),
                 "--workers", "0"]) == 0
    capsys.readouterr()
    queries = ["a red car", "a photo of a dog"]
    rc, out, _ = _run_json(capsys, ["search", "--text", queries[0], "--text", queries[1], "--index", str(idx),
                                    "--json", "-k", "6"])
    assert rc == 0
    got = json.loads(out)
    ref = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(str(clip_dir))
    tok = transformers.AutoTokenizer.from_pretrained(str(clip_dir))
    with torch.no_grad():
        px = proc(images=[PIL_Image.open(f).convert("RGB") for f in files], return_tensors="pt").pixel_values
        img = ref.get_image_features(pixel_values=px)
        txt = ref.get_text_features(**tok(queries, padding=True, return_tensors="pt"))
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        sim = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1).T  # (Q, N)
    for q, r, s in zip(queries, got, sim):
        assert r["query"] == q
        order = [str(files[i]) for i in s.argsort(descending=True).tolist()]
        assert [n["path"] for n in r["neighbors"]] == order
        np.testing.assert_allclose([n["score"] for n in r["neighbors"]], s.sort(descending=True).values.numpy(),
                                   atol=1e-5)
    # the other way: texts embedded into a table, searched by an image
    (tmp_path / "texts.txt").write_text("a red car\na photo of a dog\n\na cat\n")
    assert main(["embed", "--text", str(tmp_path / "texts.txt"), "--model", str(clip_dir), "--out",
                 str(tmp_path / "texts.parquet")]) == 0
    capsys.readouterr()
    rc, out, _ = _run_json(capsys, ["search", files[0], "--index", str(tmp_path / "texts.parquet"), "--json"])
    assert rc == 0
    texts = ["a red car", "a photo of a dog", "a cat"]
    with torch.no_grad():
        t3 = ref.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
        t3 = torch.nn.functional.normalize(getattr(t3, "pooler_output", t3), dim=-1)
    s = t3 @ torch.nn.functional.normalize(img[0], dim=-1)
    assert [n["path"] for n in json.loads(out)[0]["neighbors"]] == [texts[i] for i in s.argsort(descending=True)]


# ------------------------------------------------------------------ bad input
def _dinov2_dir(d):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    transformers.Dinov2Model(cfg).save_pretrained(str(d))
    return d


def _deit_dir(d):
    cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=16, num_labels=3)
    transformers.DeiTForImageClassificationWithTeacher(cfg).save_pretrained(str(d))
    return d


@pytest.mark.parametrize("make,name", [(_dinov2_dir, "dinov2"), (_deit_dir, "deit")])
def test_zeroshot_on_image_only_model_is_refused(tmp_path, capsys, make, name):
    d = make(tmp_path / name)
    files = _images(tmp_path / "imgs", 1)
    capsys.readouterr()  # transformers' save progress
    rc, _, err = _run_json(capsys, ["zeroshot", *files, "--model", str(d), "--labels", "cat,dog"])
    assert rc == 2
    assert "vitkit zeroshot: error: vitkit zeroshot needs an image-text model" in err and f"'{name}'" in err
    assert "CLIP" in err and "SigLIP" in err and err.count("\n") == 1
    # a text query to an index of its images: the same refusal, naming the index's model
    idx = tmp_path / "idx.parquet"
    assert main(["embed", *files, "--model", str(d), "--out", str(idx), "--workers", "0"]) == 0
    capsys.readouterr()
    rc, _, err = _run_json(capsys, ["search", "--text", "a cat", "--index", str(idx)])
    assert rc == 2 and "needs an image-text model" in err and str(d) in err and f"'{name}'" in err


@pytest.mark.parametrize("labels,match", [
    ("cat,,dog", "label 2 of 3 is empty"),
    ("cat,dog,cat", r"label 'cat' is given twice \(labels 1 and 3\)"),
    ("Cat,cat", "labels 'Cat' and 'cat' give the same tokens"),  # CLIP lower-cases: one class twice
])
def test_bad_labels_are_refused(tmp_path, capsys, clip_dir, labels, match):
    import re

    files = _images(tmp_path / "imgs", 1)
    rc, out, err = _run_json(capsys, ["zeroshot", *files, "--model", str(clip_dir), "--labels", labels])
    assert rc == 2 and out == "" and re.search(match, err), err


def test_long_label_is_truncated_with_a_note(tmp_path, capsys, clip_dir):
    files = _images(tmp_path / "imgs", 1)
    long = "an extremely long label " * 4  # byte-level vocabulary: one token a character, past 77
    rc, out, err = _run_json(capsys, ["zeroshot", *files, "--model", str(clip_dir), "--labels", f"cat,{long}",
                                      "--json"])
    assert rc == 0
    doc = json.loads(out)
    assert repr(long.strip()) in err and "truncated" in err and "'cat'" not in err
    assert doc["notes"] and repr(long.strip()) in doc["notes"][0]
    assert sum(p["prob"] for p in doc["results"][0]["predictions"]) == pytest.approx(1, abs=1e-6)


def test_templates_are_checked(tmp_path, capsys, clip_dir):
    files = _images(tmp_path / "imgs", 1)
    rc, _, err = _run_json(capsys, ["zeroshot", *files, "--model", str(clip_dir), "--labels", "cat,dog",
                                    "--templates", "imagenet-typo"])
    assert rc == 2 and "imagenet" in err and "holding {}" in err
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno place for the label\n")
    rc, _, err = _run_json(capsys, ["zeroshot", *files, "--model", str(clip_dir), "--labels", "cat,dog",
                                    "--templates", str(tmp_path / "t.txt")])
    assert rc == 2 and "'no place for the label'" in err


def test_text_search_refuses_an_index_of_another_model(tmp_path, capsys, clip_dir):
    other = _clip_dir(tmp_path / "other", seed=1)
    files = _images(tmp_path / "imgs", 2)
    idx = tmp_path / "idx.parquet"
    assert main(["embed", *files, "--model", str(clip_dir), "--pool", "head", "--out", str(idx), "--workers", "0"]) == 0
    capsys.readouterr()
    rc, _, err = _run_json(capsys, ["search", "--text", "a cat", "--index", str(idx), "--model", str(other)])
    assert rc == 2 and str(clip_dir.resolve()) in err and str(other.resolve()) in err
    # CLIP's pooled output before its projection is not in the image-text space
    idx2 = tmp_path / "idx2.parquet"
    assert main(["embed", *files, "--model", str(clip_dir), "--out", str(idx2), "--workers", "0"]) == 0
    capsys.readouterr()
    rc, _, err = _run_json(capsys, ["search", "--text", "a cat", "--index", str(idx2)])
    assert rc == 2 and "--pool model" in err and "--pool head" in err


def test_embed_text_refuses_an_image_table(tmp_path, capsys, clip_dir):
    files = _images(tmp_path / "imgs", 1)
    idx = tmp_path / "idx.parquet"
    assert main(["embed", *files, "--model", str(clip_dir), "--pool", "head", "--out", str(idx), "--workers", "0"]) == 0
    (tmp_path / "t.txt").write_text("a cat\n")
    capsys.readouterr()
    rc, _, err = _run_json(capsys, ["embed", "--text", str(tmp_path / "t.txt"), "--model", str(clip_dir), "--out",
                                    str(idx)])
    assert rc == 2 and "a table of images" in err and "--overwrite" in err


def test_models_families_says_which_have_both_towers(capsys):
    assert main(["models", "--families", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["clip"]["towers"] == rows["siglip"]["towers"] == "image + text"
    assert rows["dinov2"]["towers"] == rows["deit"]["towers"] == "image"
    assert any(s.startswith("hf: CLIPModel") for s in rows["clip"]["text_sources"])
    assert main(["models", "--families"]) == 0
    assert "towers:     image + text" in capsys.readouterr().out


# ------------------------------------------------------------------ train --zeroshot-head
def test_train_zeroshot_head_starts_as_the_zero_shot_classifier(tmp_path, clip_dir):
    from vitkit.data import DataSpec, build_data
    from vitkit.eval.evaluate import eval_loader, normalize
    from vitkit.train.arch import build_model
    from vitkit.train.config import TrainConfig

    classes = ["cat", "dog", "red car"]
    for k, c in enumerate(classes):
        _images(tmp_path / "data" / c, 4, seed=20 + k)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "data"), pretrained=str(clip_dir),
                      zeroshot_head=True, image_size=32, workers=0)
    data = build_data(DataSpec.from_config(cfg))
    model, _ = build_model(cfg, data)
    x = normalize(next(iter(eval_loader(data.train, 64, workers=0)))[0].float(), data.mean, data.std)
    pair = vitkit.load_image_text(clip_dir)
    model.eval()
    with torch.no_grad():
        got = model(x)  # (B, 3)
        zs = ZeroShotClassifier(pair, classes)(x)  # exp(scale) * cos
        z = pair.vision(x)  # (B, E): the projected embedding
        rho = z.norm(dim=-1).mean()
    assert torch.equal(got.argmax(1), zs.argmax(1))  # the zero-shot predictions, exactly
    # the same logits up to each image's norm against the batch's mean norm (the head is linear)
    torch.testing.assert_close(got * rho / z.norm(dim=-1, keepdim=True), zs, atol=1e-4, rtol=1e-4)
    # CLIP's projection had no bias, the classifier has one: the run's own checkpoint loads back
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(vitkit.load_model(tmp_path / "saved").eval()(x), got)
    with pytest.raises(ConfigError, match="needs --pretrained"):
        TrainConfig(zeroshot_head=True)


def test_export_of_an_image_text_model_says_which_tower_and_writes_the_text_one(tmp_path, capsys, clip_dir):
    """`vitkit export CLIP --format onnx` writes the image tower and its load note says the text tower was
    left out; `--tower text` writes the text tower, whose graph gives the peer's text embeddings."""
    ort = pytest.importorskip("onnxruntime")
    rc, out, err = _run_json(capsys, ["export", str(clip_dir), "--format", "onnx", "--out", str(tmp_path / "img.onnx")])
    assert rc == 0 and "text tower" in err and "wrote onnx export" in out
    rc, out, err = _run_json(capsys, ["export", str(clip_dir), "--format", "onnx", "--tower", "text",
                                      "--out", str(tmp_path / "text.onnx")])
    assert rc == 0 and "text tower" in out
    pair = vitkit.load_image_text(clip_dir)
    ids = pair.tokenizer(["a photo of a cat", "a red car"])
    got = ort.InferenceSession(str(tmp_path / "text.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    ref = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids)
    np.testing.assert_allclose(got, getattr(want, "pooler_output", want).numpy(), atol=1e-4, rtol=0)
    rc, out, err = _run_json(capsys, ["export", str(clip_dir), "--format", "hf", "--tower", "text",
                                      "--out", str(tmp_path / "t")])
    assert rc == 2 and "expected --format onnx" in err
