"""The text tower on the image engine (vitkit.infer.Predictor over a TextTransformer: the same
block walk, the text's causal / padding masks) and its ONNX export. Oracles: the model's own
forward (itself checked against transformers / open_clip in test_text_model.py and
test_interop_clip_text.py) and onnxruntime."""

from __future__ import annotations

import pytest
import torch

from vitkit.config import TextConfig
from vitkit.infer import Predictor
from vitkit.infer import predictor as predictor_mod
from vitkit.model.text import TextTransformer

L = 16
CLIP_LIKE = dict(causal=True, pooling="eot_argmax", act="quick_gelu", norm_eps=1e-5, proj_bias=False)
SIGLIP_LIKE = dict(causal=False, pooling="last", act="gelu_tanh", norm_eps=1e-6, proj_bias=True)
TOWERS = {"clip": CLIP_LIKE, "siglip": SIGLIP_LIKE}


def _tower(kind: str, seed: int = 0) -> TextTransformer:
    torch.manual_seed(seed)
    m = TextTransformer(TextConfig(vocab_size=100, context_length=L, dim=32, depth=2, num_heads=4, mlp_dim=64,
                                   embed_dim=24, eos_token_id=99, **TOWERS[kind])).eval()
    with torch.no_grad():  # non-zero biases and norms: a misplaced one shows
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ids(B: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids with an end-of-text token (99, the largest id) at a different place per row, and a padding
    mask (1 up to and including it, 0 after), as a tokenizer pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 98, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        end = 3 + 3 * b
        ids[b, end] = 99
        ids[b, end + 1:] = 0
        mask[b, :end + 1] = 1
    return ids, mask


@pytest.mark.parametrize("kind", list(TOWERS))
@pytest.mark.parametrize("padded", [False, True])
def test_fp32_walk_equals_the_text_tower(kind, padded):
    m = _tower(kind)
    ids, mask = _ids()
    mask = mask if padded else None
    want = m(ids, mask)
    fast = Predictor(m, "fp32")
    assert fast.path == "engine", fast.notes
    torch.testing.assert_close(fast(ids, mask), want, rtol=0, atol=1e-5)
    exact = Predictor(m, "fp32", exact=True)
    assert exact.path == "engine" and torch.equal(exact(ids, mask), want)  # addmm walk: the model's kernels
    for output, ref in (("tokens", m.forward_features(ids, mask)),
                        ("pooled", m.forward_head(m.forward_features(ids, mask), ids, pre_logits=True))):
        torch.testing.assert_close(Predictor(m, "fp32", output=output)(ids, mask), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_the_walk_applies_the_masks(kind, monkeypatch):
    """The engine's masks are the model's: the same walk with the mask dropped differs from the
    model (so the equality above can fail), and with CLIP's causal mask a text's embedding does
    not depend on the tokens after its end-of-text token."""
    from vitkit.infer import engine

    m = _tower(kind)
    ids, mask = _ids()
    fast = Predictor(m, "fp32")
    if kind == "clip":
        later = ids.clone()
        later[0, 4:] = 7  # after row 0's end-of-text at 3, smaller than it: the pooled position stays
        torch.testing.assert_close(fast(later)[0], fast(ids)[0], rtol=0, atol=1e-6)
    real = engine.block
    monkeypatch.setattr(engine, "block", lambda p, x, ws, k=None, attn_mask=None: real(p, x, ws, k))
    unmasked = engine.run_text(fast._plan, ids, "tokens", mask)
    assert (unmasked - m.forward_features(ids, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(TOWERS))
def test_bf16_text_agrees_with_fp32(kind, monkeypatch):
    """bf16 weights and activations (forced on, so every CPU runs it: oneDNN emulates bf16 where the
    CPU lacks it): the embeddings within cosine 0.99 of fp32, padding included."""
    monkeypatch.setattr(predictor_mod, "bf16_native", lambda: True)
    m = _tower(kind)
    ids, mask = _ids()
    p = Predictor(m, "bf16")
    assert p.dtype == "bf16" and p.path == "engine", p.notes
    got, want = p(ids, mask), m(ids, mask)
    assert got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.99, cos


def test_bf16_without_cpu_features_runs_fp32_and_says_so(monkeypatch):
    monkeypatch.setenv("VITKIT_CPU_FEATURES_OFF", "all")
    m = _tower("clip")
    ids, mask = _ids()
    p = Predictor(m, "bf16")
    assert p.dtype == "fp32" and any("no native bf16" in n for n in p.notes), p.notes
    assert torch.equal(p(ids, mask), m(ids, mask))  # oneDNN off too: the model's own kernels


def test_text_predictor_refuses_wrong_inputs():
    from vitkit.errors import InputError

    p = Predictor(_tower("siglip"), "fp32")
    with pytest.raises(InputError, match="integer token ids"):
        p(torch.randn(2, L))
    with pytest.raises(InputError, match="attention_mask must be a tensor of the ids' shape"):
        p(torch.ones(2, L, dtype=torch.long), torch.ones(2, L - 1))


# ------------------------------------------------------------------ zero-shot with a dtype
LABELS = ["cat", "dog", "red car", "tree"]


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_zeroshot import _clip_dir
    from vitkit.features.zeroshot import load_pair

    return load_pair(str(_clip_dir(tmp_path_factory.mktemp("clip"))), needed_for="test")


def test_zeroshot_bf16_labels_agree_with_fp32(tmp_path, monkeypatch, clip_pair):
    """`vitkit zeroshot --dtype bf16`: the label embeddings go through the bf16 text tower too (not the
    fp32 ones: they differ), within cosine 0.99 of fp32, and every image ranks the labels alike."""
    from test_zeroshot import _images
    from vitkit.features.zeroshot import classify_files, zeroshot_weights

    monkeypatch.setattr(predictor_mod, "bf16_native", lambda: True)
    w32 = zeroshot_weights(clip_pair, LABELS, "imagenet", dtype="fp32")
    w16 = zeroshot_weights(clip_pair, LABELS, "imagenet", dtype="bf16")
    assert w16.dtype == torch.float32 and not torch.equal(w16, w32)
    assert (w16 * w32).sum(-1).min() > 0.99  # both rows normalised: the cosine
    assert zeroshot_weights(clip_pair, LABELS, "imagenet", dtype="bf16") is w16  # once per label set and dtype
    files = _images(tmp_path / "img", 6)
    res = {dt: classify_files(clip_pair, files, LABELS, "imagenet", top_k=len(LABELS), dtype=dt)
           for dt in ("fp32", "bf16")}
    for a, b in zip(res["fp32"], res["bf16"]):  # every label's rank, and its probability within 0.02
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert max(abs(p["prob"] - q["prob"]) for p, q in zip(a["predictions"], b["predictions"])) < 0.02


def test_zeroshot_bf16_without_cpu_features_says_fp32(monkeypatch, clip_pair):
    from vitkit.features.zeroshot import zeroshot_weights

    monkeypatch.setenv("VITKIT_CPU_FEATURES_OFF", "all")
    notes: list[str] = []
    w = zeroshot_weights(clip_pair, LABELS, "{}", dtype="bf16", cache=False, note=notes.append)
    assert any("text tower" in n and "running fp32" in n for n in notes), notes
    torch.testing.assert_close(w, zeroshot_weights(clip_pair, LABELS, "{}", dtype="fp32", cache=False),
                               rtol=0, atol=0)


# ------------------------------------------------------------------ ONNX export of the text tower
@pytest.mark.parametrize(("kind", "with_mask"), [("clip", False), ("siglip", True)])
def test_text_onnx_equals_vitkit_in_onnxruntime(tmp_path, kind, with_mask):
    """ids [+ padding mask] -> text embeds, in onnxruntime within 1e-5 of the tower, at other batch
    sizes and a shorter length than the example it was exported with (dynamic axes). CLIP as its
    sources call it (ids only: the causal mask in the graph), SigLIP with a padding mask."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from vitkit.text.io import export_text_onnx

    m = _tower(kind)
    path = export_text_onnx(m, tmp_path / "text.onnx", attention_mask=with_mask)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == (["input_ids", "attention_mask"] if with_mask else ["input_ids"])
    ids, mask = _ids()
    for b, n in ((4, L), (1, L), (3, 10)):
        i, k = ids[:b, :n], mask[:b, :n]
        feed = {"input_ids": i.numpy()} | ({"attention_mask": k.numpy()} if with_mask else {})
        got = torch.from_numpy(sess.run(None, feed)[0])
        with torch.no_grad():
            want = m(i, k if with_mask else None)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_text_onnx_refuses_an_image_model(tmp_path):
    from vitkit import ViT
    from vitkit.config import ViTConfig
    from vitkit.errors import ConfigError
    from vitkit.text.io import export_text_onnx

    with pytest.raises(ConfigError, match="image-text model or its text tower, got ViT"):
        export_text_onnx(ViT(ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, num_heads=2)), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_text_onnx_of_the_pair_embeds_its_tokenized_texts(tmp_path, clip_pair):
    """The pair's own tokenizer's ids (context 77) through the exported graph: ``encode_text``."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from vitkit.text.io import export_text_onnx

    ids = clip_pair.tokenize(["a photo of a cat", "a red car", "dog"])
    sess = ort.InferenceSession(str(export_text_onnx(clip_pair, tmp_path / "t.onnx")), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, clip_pair.encode_text(ids), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ OpenCLIP SigLIP with a timm trunk
def _register_tiny_siglip_trunk() -> str:
    """A tiny timm SigLIP ViT under a registered name (timm's vit_*_siglip_* args: no class token,
    MAP pooling), so open_clip's TimmModel builds it as it builds vit_base_patch16_siglip_224."""
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import VisionTransformer

    name = "vitkit_test_siglip_tiny"
    if not is_model(name):
        def vitkit_test_siglip_tiny(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kw):
            kw.pop("cache_dir", None)
            return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
                                     class_token=False, **{"global_pool": "map", **kw})

        register_model(vitkit_test_siglip_tiny)
    return name


def test_open_clip_siglip_with_timm_trunk(tmp_path):
    """open_clip's own model (CustomTextCLIP: timm trunk, SigLIP text tower, logit bias), random weights,
    saved as open_clip saves it: vitkit's pair gives its image and text features and logits."""
    import json

    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    pytest.importorskip("sentencepiece")
    from safetensors.torch import save_file

    import vitkit
    from text_helpers import save_siglip_tokenizer

    vocab = save_siglip_tokenizer(tmp_path / "tok")
    vision_cfg = {"timm_model_name": _register_tiny_siglip_trunk(), "timm_model_pretrained": False, "timm_pool": "map",
                  "timm_proj": "none", "image_size": 32}
    text_cfg = {"context_length": 16, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True,
                "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                "act_kwargs": {"approximate": "tanh"}, "hf_tokenizer_name": "unused", "pad_id": 1}
    torch.manual_seed(0)
    ref = open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_bias=-10).eval()
    with torch.no_grad():  # random everything (zero-initialised biases and latents included)
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 32, "init_logit_bias": -10, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "squash"}}))
    ours = vitkit.load_image_text(tmp_path, tokenizer=tmp_path / "tok", num_heads=2)
    assert ours.vision.load_report.ok and ours.load_report.ok
    assert ours.vision.config.pooling == "map" and ours.loss == "sigmoid"
    assert ours.vision.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    ids = ours.tokenize(["a photo of a cat", "hello world"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img, txt, scale, bias = ref(pixels, ids)  # normalised features, exp(logit_scale), logit_bias
        torch.testing.assert_close(ours.encode_image(pixels), ref.encode_image(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)
        want = scale * img @ txt.T + bias
        torch.testing.assert_close(ours(pixels, ids), want, rtol=0, atol=1e-4)
    # a trunk followed by a projection (open_clip's timm_proj 'linear') is not read as if it were the embedding
    state = {k: v.contiguous() for k, v in ref.state_dict().items()} | {"visual.head.proj.weight": torch.zeros(32, 32)}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    from vitkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="projection after it"):
        vitkit.load_image_text(tmp_path, tokenizer=tmp_path / "tok", num_heads=2)


def test_causal_towers_run_only_up_to_the_last_pooled_token():
    """CLIP pads to 77 but a causal tower reads nothing after the pooled token: forward trims the batch
    there (and so does the engine's walk) and gives what the full-length computation gives."""
    import torch

    from vitkit import TextConfig
    from vitkit.infer import Predictor
    from vitkit.model.text import TextTransformer

    for pooling in ("eot_argmax", "eos_id"):
        torch.manual_seed(0)
        m = TextTransformer(TextConfig(vocab_size=50, context_length=16, dim=32, depth=2, num_heads=4, embed_dim=24,
                                       pooling=pooling, eos_token_id=49, pad_token_id=0)).eval()
        ids = torch.zeros(3, 16, dtype=torch.long)
        for row, n in enumerate((3, 6, 4)):  # start, words, end, then padding
            ids[row, :n] = torch.randint(1, 48, (n,))
            ids[row, n - 1] = 49
        short, _ = m.trim(ids)
        assert short.shape == (3, 6)  # the longest text's end is at position 5
        with torch.no_grad():
            full = m.forward_head(m.forward_features(ids), ids)  # every position, no trimming
            torch.testing.assert_close(m(ids), full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(Predictor(m, "fp32")(ids), full, rtol=1e-5, atol=1e-5)
    siglip = TextTransformer(TextConfig(vocab_size=50, context_length=16, dim=32, depth=1, num_heads=4, causal=False,
                                        pooling="last", embed_dim=None, eos_token_id=49))
    assert siglip.trim(ids)[0] is ids  # bidirectional, last token: every position matters
