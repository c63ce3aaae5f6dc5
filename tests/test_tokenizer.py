"""vitkit.text.Tokenizer against the tokenizers of transformers and open_clip, id for id, on a
deterministic corpus of >= 1,000 strings (unicode, accents, emoji, HTML entities, very long texts,
empty strings). Vocabularies: CLIP's real one (open_clip's shipped bpe_simple_vocab_16e6.txt.gz)
and tiny SentencePiece / Gemma-style BPE models trained in the test."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("sentencepiece")

from text_helpers import (  # noqa: E402
    corpus,
    save_clip_tokenizer,
    save_siglip2_tokenizer,
    save_siglip_tokenizer,
    write_clip_vocab,
)
from vitkit.errors import CheckpointError  # noqa: E402
from vitkit.text import Tokenizer  # noqa: E402

CORPUS = corpus()


def _hf(directory, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    return tok(CORPUS, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    bad = [i for i in range(len(CORPUS)) if not torch.equal(ours[i], theirs[i])]
    assert not bad, f"{len(bad)} texts differ, first {CORPUS[bad[0]]!r}: {ours[bad[0]].tolist()} vs {theirs[bad[0]].tolist()}"


def test_corpus_covers_the_cases():
    assert len(CORPUS) >= 1000 and "" in CORPUS and any(len(t) > 500 for t in CORPUS)
    assert any("&amp;" in t for t in CORPUS) and any("\U0001f431" in t for t in CORPUS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_tok")
    save_clip_tokenizer(d, real=True)
    return d


def test_clip_bpe_equals_transformers(clip_dir):
    hf = _hf(clip_dir, 77)
    _assert_same(Tokenizer.from_pretrained(clip_dir, 77)(CORPUS), hf)
    full = hf[:, -2] != 49407  # texts truncated to the context: the end token is still last
    assert full.any() and (hf[full, -1] == 49407).all()
    # CLIP's BPE built from vocab.json + merges.txt (no tokenizer.json) is the same tokenizer
    _assert_same(Tokenizer.from_pretrained(clip_dir / "_vocab", 77)(CORPUS), hf)


def test_clip_bpe_equals_open_clip(tmp_path):
    from open_clip.tokenizer import default_bpe

    ref = open_clip.tokenize(CORPUS)
    ours = Tokenizer.from_pretrained(default_bpe(), 77, clean="open_clip", pad_id=0)
    _assert_same(ours(CORPUS), ref)
    # the two libraries differ by design (open_clip unescapes HTML and runs ftfy): not vacuous
    hf = Tokenizer.from_pretrained(write_clip_vocab(tmp_path / "v"), 77)(CORPUS)
    hf[hf == 49407] = 0
    ref[ref == 49407] = 0
    assert not torch.equal(hf, ref)


def test_siglip_sentencepiece_equals_transformers(tmp_path):
    save_siglip_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path, 64)
    assert tok.kind == "sentencepiece" and tok.pad_id == tok.eos_id == 1
    _assert_same(tok(CORPUS), _hf(tmp_path, 64))


@pytest.mark.parametrize("save", [save_siglip_tokenizer, save_siglip2_tokenizer])
def test_siglip_equals_open_clip_hf_tokenizer(tmp_path, save):
    """open_clip's SigLIP / SigLIP2 tokenization: its clean-up, then the checkpoint's tokenizer."""
    from open_clip.tokenizer import HFTokenizer

    save(tmp_path)
    ref = HFTokenizer(str(tmp_path), context_length=64, clean="canonicalize")(CORPUS)
    _assert_same(Tokenizer.from_pretrained(tmp_path, 64, clean="open_clip_canonicalize")(CORPUS), ref)


def test_siglip2_gemma_tokenizer_json_equals_transformers(tmp_path):
    save_siglip2_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path, 64)
    assert tok.kind == "tokenizers" and tok.padding_side == "left"  # Siglip2Tokenizer's own default
    _assert_same(tok(CORPUS), _hf(tmp_path, 64))


def test_save_round_trip(tmp_path, clip_dir):
    tok = Tokenizer.from_pretrained(clip_dir, 77)
    again = Tokenizer.from_pretrained(tok.save(tmp_path / "t"), 5)  # the saved context length wins
    assert again.context_length == 77
    assert torch.equal(again(CORPUS[:50]), tok(CORPUS[:50]))


def test_missing_files_name_what_is_needed(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*vocab\.json \+ merges\.txt.*spiece\.model"):
        Tokenizer.from_pretrained(tmp_path, 77)


def test_lengths_report_truncation(clip_dir):
    tok = Tokenizer.from_pretrained(clip_dir, 77)
    n = tok.lengths(["a photo", " a" * 100])
    assert n[0] == 4 and n[1] == 102
    assert tok(["a photo"]).shape == (1, 77)  # padding and truncation restored after lengths()
