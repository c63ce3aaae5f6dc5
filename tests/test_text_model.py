"""The text tower and the pair: causal mask (CLIP) vs bidirectional (SigLIP), pooling, the
explicit attention path equal to SDPA with a mask, TextConfig validation and round trip."""

from __future__ import annotations

import pytest
import torch

from vitkit.config import TextConfig, ViTConfig
from vitkit.errors import ConfigError, InputError
from vitkit.model.attention import Attention
from vitkit.model.image_text import ImageTextModel
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT


def _tower(**kw):
    torch.manual_seed(0)
    cfg = TextConfig(**{"vocab_size": 100, "context_length": 12, "dim": 32, "depth": 2, "num_heads": 4,
                        "embed_dim": 16, "eos_token_id": 99, **kw})
    return TextTransformer(cfg).eval()


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask_respected(causal):
    m = _tower(causal=causal)
    ids = torch.randint(1, 90, (2, 12))
    changed = ids.clone()
    changed[:, 8] = 5 if ids[0, 8] != 5 else 6
    with torch.no_grad():
        a, b = m.forward_features(ids), m.forward_features(changed)
    same_before = torch.allclose(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert same_before is causal  # CLIP: earlier tokens cannot see position 8; SigLIP: they do
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_pooling_reads_the_source_token():
    ids = torch.tensor([[5, 7, 99, 3, 99, 99], [5, 99, 8, 8, 8, 8]])
    tokens = torch.arange(2 * 6 * 32, dtype=torch.float).reshape(2, 6, 32)
    argmax = _tower(pooling="eot_argmax").pool(tokens, ids)
    first = _tower(pooling="eos_id").pool(tokens, ids)
    last = _tower(pooling="last").pool(tokens, ids)
    assert torch.equal(argmax, tokens[[0, 1], [2, 1]]) and torch.equal(first, tokens[[0, 1], [2, 1]])
    assert torch.equal(last, tokens[:, -1])
    # where they differ: an id larger than the end token before it (transformers' new configs)
    ids2 = torch.tensor([[5, 99, 98, 3]])
    assert torch.equal(_tower(pooling="eos_id", eos_token_id=98).pool(tokens[:1, :4], ids2), tokens[:1, 2])
    assert torch.equal(_tower(pooling="eot_argmax", eos_token_id=98).pool(tokens[:1, :4], ids2), tokens[:1, 1])


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attention_mask_both_paths_equal(mask_kind):
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    if mask_kind == "float":
        mask = torch.zeros(7, 7).masked_fill(~mask, float("-inf"))
    fast = attn(x, attn_mask=mask)
    slow, w = attn(x, attn_mask=mask, return_attention=True)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert torch.all(w.triu(1) == 0)  # no weight on later keys
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))


def test_padding_mask_hides_keys():
    m = _tower(causal=False, pooling="last")
    ids = torch.randint(1, 90, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 6:] = 3
    with torch.no_grad():
        a = m.forward_features(ids, mask)[:, :6]
        b = m.forward_features(other, mask)[:, :6]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_text_config_validation_and_round_trip():
    c = TextConfig(vocab_size=100, dim=32, num_heads=4, context_length=8, eos_token_id=99)
    assert TextConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="pooling.*'lats'"):
        c.replace(pooling="lats")
    with pytest.raises(ConfigError, match="act must be one of .*'relu'"):
        c.replace(act="relu")
    with pytest.raises(ConfigError, match="eos_token_id.*vocab_size=100.*got 100"):
        c.replace(eos_token_id=100)
    with pytest.raises(ConfigError, match="dim=30 must be divisible by num_heads=4"):
        c.replace(dim=30)
    with pytest.raises(ConfigError, match="unknown TextConfig key.*'depht'.*'depth'"):
        TextConfig.from_dict({"depht": 2})


def test_bad_ids_are_input_errors():
    m = _tower()
    with pytest.raises(InputError, match="context_length=12"):
        m(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[0, 100\).*got \[0, 100\]"):
        m(torch.tensor([[0, 100]]))
    with pytest.raises(InputError, match="integer tensor"):
        m(torch.zeros(1, 4))


def test_pair_logits_and_probabilities():
    torch.manual_seed(0)
    vision = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, num_heads=4, num_classes=16))
    pair = ImageTextModel(vision, _tower(), loss="softmax", logit_scale=2.0).eval()
    pixels, ids = torch.randn(3, 3, 16, 16), torch.randint(1, 99, (2, 12))
    with torch.no_grad():
        logits = pair(pixels, ids)
        img = torch.nn.functional.normalize(pair.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(pair.encode_text(ids), dim=-1)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, torch.exp(torch.tensor(2.0)) * img @ txt.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.probabilities(logits).sum(-1), torch.ones(3))
    with pytest.raises(ConfigError, match="no tokenizer"):
        pair.tokenize(["a cat"])
    with pytest.raises(ConfigError, match="width 16 but the text tower to 8"):
        ImageTextModel(vision, _tower(embed_dim=8))
