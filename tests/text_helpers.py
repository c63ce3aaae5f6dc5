"""Shared builders for the text-tower tests: tokenizer files made from real or tiny vocabularies,
and a deterministic corpus. No network: everything is built here or shipped by installed packages."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode as b2u

    return b2u()


def write_clip_vocab(directory: Path, bpe_gz: str | None = None) -> Path:
    """vocab.json + merges.txt as open_clip's SimpleTokenizer lays out its vocabulary: from open_clip's
    shipped bpe_simple_vocab_16e6.txt.gz (the real CLIP vocabulary, 49,408 ids) or, with
    ``bpe_gz=""``, bytes only (514 ids: a tiny vocabulary for model tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    if bpe_gz is None:
        from open_clip.tokenizer import default_bpe

        bpe_gz = default_bpe()
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1] if bpe_gz else []
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    return directory


def save_clip_tokenizer(directory: Path, real: bool = False) -> int:
    """transformers' CLIPTokenizer saved into ``directory``; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    src = write_clip_vocab(directory / "_vocab", None if real else "")
    tok = CLIPTokenizer.from_pretrained(str(src))
    tok.save_pretrained(str(directory))
    return len(tok)


SP_CORPUS = ["a photo of a cat", "a photo of a dog", "the quick brown fox jumps over the lazy dog",
             "hello world", "zero shot classification of images", "caf\u00e9 na\u00efve r\u00e9sum\u00e9"] * 20


def save_siglip_tokenizer(directory: Path) -> int:
    """A tiny SentencePiece model (trained here, deterministic) saved by transformers' SiglipTokenizer."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "_sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SP_CORPUS), model_prefix=str(prefix), vocab_size=48,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    tok = SiglipTokenizer(str(prefix) + ".model")
    tok.save_pretrained(str(directory))
    return len(tok)


def save_siglip2_tokenizer(directory: Path) -> int:
    """A tiny Gemma-style byte-fallback BPE (trained here) saved by transformers' Siglip2Tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Siglip2Tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tk.train_from_iterator(SP_CORPUS, trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                                         show_progress=False))
    m = json.loads(tk.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split()) for x in m["merges"]]
    tok = Siglip2Tokenizer(vocab=m["vocab"], merges=merges)
    tok.save_pretrained(str(directory))
    return len(tok)


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    """>= n strings: ASCII prose, contractions, accents, CJK / Greek / Cyrillic / Arabic, emoji (with
    skin tones and ZWJ sequences), HTML entities, odd whitespace, digits, punctuation runs, mojibake,
    very long texts and empty / blank strings. Deterministic for a seed."""
    rng = random.Random(seed)
    words = ["a", "photo", "of", "the", "cat", "dog", "car", "red", "Big", "SMALL", "it's", "we'll", "DON'T",
             "they're", "I'm", "you've", "he'd", "caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "\u00fcber",
             "Stra\u00dfe", "\u00c5ngstr\u00f6m", "\u0130stanbul", "\u732b\u306e\u5199\u771f", "\u4e2d\u6587",
             "\u0395\u03bb\u03bb\u03ac\u03b4\u03b1", "\u041c\u043e\u0441\u043a\u0432\u0430", "\u0645\u0631\u062d\u0628\u0627",
             "\U0001f431", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u2764\ufe0f",
             "&amp;", "&lt;b&gt;", "&#39;", "&quot;quoted&quot;", "&nbsp;", "&amp;amp;", "Tom&amp;Jerry",
             "123", "3.14", "1,000,000", "2nd", "!!!", "...", "?!", "--", "(x)", "[y]", "{z}", "#tag", "@user",
             "e-mail", "snake_case", "C++", "$5", "50%", "a/b", "caf\u00c3\u00a9", "\u00e2\u20ac\u201c",
             "e\u0301", "\ufb01ne", "\u00bd", "\u2163", "x\u00b2", "\u212b", "\u1e9b\u0323"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", " \r\n "]
    out = ["", " ", "   ", "\n\t", "a", "A", "&amp;", "\U0001f600", "it's"]
    while len(out) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 21]) if rng.random() < 0.9 else rng.randint(60, 160)
        parts = []
        for _ in range(k):
            parts.append(rng.choice(words))
            parts.append(rng.choice(spaces))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = spaces[rng.randrange(len(spaces))] + text
        out.append(text if rng.random() < 0.9 else text.strip())
    return out


def randomize(model, seed: int = 0):
    """Every parameter drawn anew (N(0, 0.2^2), seeded): a random model whose outputs are not near zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


OPEN_CLIP_VISION = {"width": 32, "layers": 1, "head_width": 16, "image_size": 32, "patch_size": 16}


def open_clip_model(text_cfg: dict, quick_gelu: bool = True):
    """A tiny random open_clip ``CLIP`` (eval mode) with CLIP's real vocabulary size, its vision and
    text configs: ``(model, vision_cfg, text_cfg)``."""
    import open_clip
    import torch

    vision_cfg, text_cfg = dict(OPEN_CLIP_VISION), {"vocab_size": 49408, **text_cfg}
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    return randomize(model).eval(), vision_cfg, text_cfg


def save_open_clip_dir(model, directory: Path, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = True) -> Path:
    """``model`` as an OpenCLIP hub dir: open_clip_model.safetensors + open_clip_config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}}))
    return directory
