"""Both towers of CLIP / SigLIP / SigLIP2 / OpenCLIP checkpoints (random tiny weights saved by the
peer libraries themselves) loaded by vitkit.load_image_text: logits_per_image within 1e-5 (fp32)
of the source model's, text and image embeddings too, and the vitkit round trip bit-exact."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import vitkit  # noqa: E402
from text_helpers import (  # noqa: E402
    open_clip_model,
    randomize,
    save_clip_tokenizer,
    save_open_clip_dir,
    save_siglip2_tokenizer,
    save_siglip_tokenizer,
)
from vitkit.errors import CheckpointError  # noqa: E402


def _ids(vocab: int, n: int, L: int, eos: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, min(vocab, 500) - 2, (n, L), generator=g)
    for i in range(n):  # an end token at a different place per text, padding after it
        end = 3 + i * 2
        ids[i, end] = eos
        ids[i, end + 1:] = eos
    return ids


def _check(ours, logits, ids, pixels):
    ours.eval()
    with torch.no_grad():
        got = ours(pixels, ids)
    assert got.shape == logits.shape
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    return got


CLIP_CONFIGS = [  # (text dim, depth, heads, context, eos_token_id (2 = legacy argmax), act, image, patch)
    (32, 1, 2, 16, 2, "quick_gelu", 32, 16),
    (48, 2, 4, 77, None, "gelu", 32, 8),
    (64, 1, 4, 24, None, "quick_gelu", 16, 8),
]


@pytest.mark.parametrize("dim,depth,heads,ctx,eos,act,image,patch", CLIP_CONFIGS)
def test_hf_clip_model(tmp_path, dim, depth, heads, ctx, eos, act, image, patch):
    vocab = save_clip_tokenizer(tmp_path)
    eos_id = vocab - 1 if eos is None else eos
    tc = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=depth,
              num_attention_heads=heads, max_position_embeddings=ctx, hidden_act=act, eos_token_id=eos_id,
              bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image,
              patch_size=patch, hidden_act=act)
    cfg = transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24)
    torch.manual_seed(0)
    ref = randomize(transformers.CLIPModel(cfg)).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(2.3)
    ref.save_pretrained(str(tmp_path))
    ours = vitkit.load_image_text(tmp_path)
    ids = _ids(vocab, 3, ctx, vocab - 1)
    pixels = torch.randn(2, 3, image, image)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
    _check(ours, out.logits_per_image, ids, pixels)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids), ref.get_text_features(input_ids=ids).pooler_output
                                   if hasattr(ref.get_text_features(input_ids=ids), "pooler_output")
                                   else ref.get_text_features(input_ids=ids), atol=1e-5, rtol=0)
    assert ours.text.config.pooling == ("eot_argmax" if eos == 2 else "eos_id")
    assert ours.load_report.ok and ours.vision.load_report.ok
    # texts go through the checkpoint's own tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    want = tok(["a photo of a cat", ""], padding="max_length", max_length=ctx, truncation=True,
               return_tensors="pt").input_ids
    assert torch.equal(ours.tokenize(["a photo of a cat", ""]), want)


SIGLIP_CONFIGS = [(32, 1, 2, 16, 32, 16), (48, 2, 4, 64, 32, 8), (64, 1, 4, 20, 16, 8)]


@pytest.mark.parametrize("dim,depth,heads,ctx,image,patch", SIGLIP_CONFIGS)
def test_hf_siglip_model(tmp_path, dim, depth, heads, ctx, image, patch):
    pytest.importorskip("sentencepiece")
    vocab = save_siglip_tokenizer(tmp_path)
    tc = dict(vocab_size=64, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=depth,
              num_attention_heads=heads, max_position_embeddings=ctx, projection_size=dim // 2 + 8)
    vc = dict(hidden_size=dim // 2 + 8, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=image, patch_size=patch)
    torch.manual_seed(0)
    ref = randomize(transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc))).eval()
    ref.save_pretrained(str(tmp_path))
    ours = vitkit.load_image_text(tmp_path)
    assert ours.loss == "sigmoid" and ours.logit_bias is not None and ours.text.config.proj_bias
    ids = _ids(vocab, 3, ctx, 1)
    pixels = torch.randn(2, 3, image, image)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
    got = _check(ours, out.logits_per_image, ids, pixels)
    torch.testing.assert_close(ours.probabilities(got), torch.sigmoid(out.logits_per_image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim,depth,heads,ctx,grid,patch", [(32, 1, 2, 16, 2, 16), (48, 2, 4, 64, 4, 8),
                                                            (64, 1, 4, 20, 3, 8)])
def test_hf_siglip2_model_at_its_native_grid(tmp_path, dim, depth, heads, ctx, grid, patch):
    save_siglip2_tokenizer(tmp_path)
    tc = dict(vocab_size=400, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=depth,
              num_attention_heads=heads, max_position_embeddings=ctx, projection_size=40)
    vc = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_patches=grid * grid, patch_size=patch)
    torch.manual_seed(0)
    ref = randomize(transformers.Siglip2Model(transformers.Siglip2Config(text_config=tc, vision_config=vc))).eval()
    ref.save_pretrained(str(tmp_path))
    ours = vitkit.load_image_text(tmp_path)
    ids = _ids(400, 3, ctx, 1)
    size = grid * patch
    pixels = torch.randn(2, 3, size, size)
    # Siglip2's processor input: (B, N, ph * pw * C) patches in raster order, a mask and the grid
    patches = pixels.reshape(2, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(2, grid * grid, -1)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=patches, pixel_attention_mask=torch.ones(2, grid * grid, dtype=torch.long),
                  spatial_shapes=torch.tensor([[grid, grid]] * 2))
    _check(ours, out.logits_per_image, ids, pixels)


OPEN_CLIP_CONFIGS = [  # (text_cfg extras, quick_gelu)
    ({"width": 32, "heads": 2, "layers": 1, "context_length": 16}, True),
    ({"width": 48, "heads": 4, "layers": 2, "context_length": 77, "proj_bias": True}, False),
    ({"width": 64, "heads": 4, "layers": 1, "context_length": 20, "pool_type": "eos", "eos_id": 49407}, False),
]


@pytest.mark.parametrize("text_cfg,quick", OPEN_CLIP_CONFIGS)
def test_open_clip_model(tmp_path, text_cfg, quick):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe

    ref, vision_cfg, text_cfg = open_clip_model(text_cfg, quick_gelu=quick)
    save_open_clip_dir(ref, tmp_path, vision_cfg, text_cfg, quick_gelu=quick)
    with pytest.raises(CheckpointError, match="tokenizer"):
        vitkit.load_image_text(tmp_path)
    ours = vitkit.load_image_text(tmp_path, tokenizer=default_bpe())
    texts = ["a photo of a cat", "Tom &amp; Jerry", "a dog " * 40]
    ids = open_clip.tokenize(texts, context_length=text_cfg["context_length"])
    assert torch.equal(ours.tokenize(texts), ids)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img, txt, scale = ref(pixels, ids)[:3] if not isinstance(ref(pixels, ids), dict) else (
            lambda d: (d["image_features"], d["text_features"], d["logit_scale"]))(ref(pixels, ids))
    _check(ours, scale * img @ txt.T, ids, pixels)


def test_round_trip_bit_exact(tmp_path):
    save_clip_tokenizer(tmp_path / "src")
    tc = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=16, eos_token_id=513)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    torch.manual_seed(0)
    ref = randomize(transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc,
                                                                   projection_dim=16)))
    ref.save_pretrained(str(tmp_path / "src"))
    a = vitkit.load_image_text(tmp_path / "src")
    a.save_pretrained(tmp_path / "vk")
    b = vitkit.load_image_text(tmp_path / "vk")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids, pixels = _ids(514, 2, 16, 513), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(pixels, ids), b(pixels, ids))
    assert torch.equal(a.tokenize(["a cat"]), b.tokenize(["a cat"]))
    assert isinstance(vitkit.load_model(tmp_path / "vk"), vitkit.ViT)  # the image tower, as before


def test_missing_tokenizer_is_refused_before_loading(tmp_path):
    tc = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=8)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc)).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # proves no weights were read first
    with pytest.raises(CheckpointError, match=r"no tokenizer files.*tokenizer\.json.*vocab\.json \+ merges\.txt"):
        vitkit.load_image_text(tmp_path)


def test_export_to_transformers_clip_from_open_clip(tmp_path):
    """OpenCLIP weights -> vitkit -> transformers CLIPModel dir: transformers' logits equal open_clip's."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe
    from safetensors.torch import save_file

    ref, _, _ = open_clip_model({"width": 32, "heads": 2, "layers": 2, "context_length": 16})
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    # a bare state dict: what it cannot tell (heads, activation) is given
    ours = vitkit.load_image_text(tmp_path / "oc.safetensors", tokenizer=default_bpe(), act="quick_gelu",
                                  num_heads=2, text_heads=2)
    from vitkit.text.io import export_hf

    export_hf(ours, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    texts = ["a photo of a cat", "a dog"]
    ids = open_clip.tokenize(texts, context_length=16)
    hf_ids = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(
        texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(hf_ids[ids != 0], ids[ids != 0])  # the same tokens; transformers pads with the end token
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d = ref(pixels, ids)
        img, txt, scale = (d["image_features"], d["text_features"], d["logit_scale"]) if isinstance(d, dict) else d[:3]
        torch.testing.assert_close(hf(input_ids=hf_ids, pixel_values=pixels).logits_per_image, scale * img @ txt.T,
                                   atol=1e-5, rtol=0)


def test_export_to_transformers_siglip_round_trip(tmp_path):
    pytest.importorskip("sentencepiece")
    save_siglip_tokenizer(tmp_path / "src")
    tc = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=16, projection_size=24)
    vc = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    torch.manual_seed(0)
    ref = randomize(transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc))).eval()
    ref.save_pretrained(str(tmp_path / "src"))
    from vitkit.text.io import export_hf

    export_hf(vitkit.load_image_text(tmp_path / "src"), tmp_path / "out")
    back = transformers.SiglipModel.from_pretrained(str(tmp_path / "out")).eval()
    sa, sb = ref.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok(["a cat"], padding="max_length", max_length=16).input_ids == transformers.AutoTokenizer.from_pretrained(
        str(tmp_path / "src"))(["a cat"], padding="max_length", max_length=16).input_ids


@pytest.mark.parametrize("stacked", [False, True])
def test_big_vision_npz(tmp_path, stacked):
    """A big_vision SigLIP .npz: the text arrays written from a transformers SiglipModel by inverting
    transformers' convert_siglip_to_hf.py (kernels (in, out), attention kernels (D, heads, hd), with
    scan: one encoderblock with a leading depth axis); the image tower by vitkit's own tested npz export."""
    import numpy as np

    from vitkit.interop.jax import export_npz

    pytest.importorskip("sentencepiece")
    save_siglip_tokenizer(tmp_path / "src")
    D, H, depth, ctx = 32, 4, 2, 16
    tc = dict(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=H,
              max_position_embeddings=ctx, projection_size=24)
    vc = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
    torch.manual_seed(0)
    ref = randomize(transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc))).eval()
    ref.save_pretrained(str(tmp_path / "src"))
    vision = vitkit.from_pretrained(tmp_path / "src")
    export_npz(vision, tmp_path / "img.npz", layout="big_vision_img")
    arrays = dict(np.load(tmp_path / "img.npz"))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    t = "text_model."
    arrays["params/txt/Embed_0/embedding"] = sd[t + "embeddings.token_embedding.weight"]
    arrays["params/txt/pos_embedding"] = sd[t + "embeddings.position_embedding.weight"][None]
    blocks = []
    for i in range(depth):
        L = f"{t}encoder.layers.{i}."
        e = {"LayerNorm_0/scale": sd[L + "layer_norm1.weight"], "LayerNorm_0/bias": sd[L + "layer_norm1.bias"],
             "LayerNorm_1/scale": sd[L + "layer_norm2.weight"], "LayerNorm_1/bias": sd[L + "layer_norm2.bias"],
             "MlpBlock_0/Dense_0/kernel": sd[L + "mlp.fc1.weight"].T, "MlpBlock_0/Dense_0/bias": sd[L + "mlp.fc1.bias"],
             "MlpBlock_0/Dense_1/kernel": sd[L + "mlp.fc2.weight"].T, "MlpBlock_0/Dense_1/bias": sd[L + "mlp.fc2.bias"],
             "MultiHeadDotProductAttention_0/out/kernel": sd[L + "self_attn.out_proj.weight"].T.reshape(H, D // H, D),
             "MultiHeadDotProductAttention_0/out/bias": sd[L + "self_attn.out_proj.bias"]}
        for n, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            e[f"MultiHeadDotProductAttention_0/{n}/kernel"] = sd[f"{L}self_attn.{hf}.weight"].T.reshape(D, H, D // H)
            e[f"MultiHeadDotProductAttention_0/{n}/bias"] = sd[f"{L}self_attn.{hf}.bias"].reshape(H, D // H)
        blocks.append(e)
    for name in blocks[0]:
        if stacked:
            arrays[f"params/txt/Encoder_0/encoderblock/{name}"] = np.stack([e[name] for e in blocks])
        else:
            for i, e in enumerate(blocks):
                arrays[f"params/txt/Encoder_0/encoderblock_{i}/{name}"] = e[name]
    arrays["params/txt/Encoder_0/encoder_norm/scale"] = sd[t + "final_layer_norm.weight"]
    arrays["params/txt/Encoder_0/encoder_norm/bias"] = sd[t + "final_layer_norm.bias"]
    arrays["params/txt/head/kernel"] = sd[t + "head.weight"].T
    arrays["params/txt/head/bias"] = sd[t + "head.bias"]
    arrays["params/t"], arrays["params/b"] = sd["logit_scale"], sd["logit_bias"]
    np.savez(tmp_path / "siglip.npz", **arrays)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        vitkit.load_image_text(tmp_path / "siglip.npz")
    ours = vitkit.load_image_text(tmp_path / "siglip.npz", tokenizer=tmp_path / "src")
    assert vitkit.from_pretrained(tmp_path / "siglip.npz").load_report.ok  # the image loader passes the text by
    ids, pixels = _ids(48, 3, ctx, 1), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
    _check(ours, out.logits_per_image, ids, pixels)
