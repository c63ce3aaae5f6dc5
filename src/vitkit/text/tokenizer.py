"""Tokenizers of the image-text families, read from the files a checkpoint ships and run by
Hugging Face ``tokenizers`` (``sentencepiece`` for SigLIP's ``spiece.model``), never by a
hand-written BPE. ``Tokenizer(texts)`` is the (B, context_length) LongTensor the text tower reads.
One module (over 400 lines) because the three kinds share reading, truncation and saving.

Kinds (:attr:`Tokenizer.kind`):

* ``"tokenizers"``: a ``tokenizers`` pipeline: ``tokenizer.json`` as saved (CLIP, SigLIP2's
  Gemma), or CLIP's byte-level BPE built from ``vocab.json`` + ``merges.txt`` (or from open_clip's
  ``bpe_simple_vocab_16e6.txt.gz``) exactly as transformers' ``CLIPTokenizer`` builds it (NFC,
  whitespace runs -> one space, lower-case; CLIP's split pattern; byte-level BPE with ``</w>``;
  ``<|startoftext|> ... <|endoftext|>``). Truncation keeps the special tokens (CLIP: the first
  ``context_length - 2`` pieces between start and end, as transformers and open_clip both do);
  padding to ``context_length`` with the pad id on the side ``tokenizer_config.json`` names.
* ``"sentencepiece"``: SigLIP's ``spiece.model`` as transformers' ``SiglipTokenizer`` runs it:
  lower-case, punctuation removed, whitespace collapsed (big_vision's ``canonicalize_text``),
  pieces + ``</s>``, truncated keeping ``</s>``, padded with the pad id (``</s>`` too).

``clean`` is the text clean-up *before* the pipeline, as the checkpoint's own library does it:

* ``"none"``: transformers' tokenizers (everything is in the pipeline above).
* ``"open_clip"``: open_clip's ``SimpleTokenizer`` (CLIP's BPE, ``clean='lower'``): ``ftfy.fix_text``, HTML
  entities unescaped twice, whitespace runs -> one space, stripped, lower-cased. So ``&amp;`` is
  ``&`` for open_clip / OpenAI checkpoints and stays ``&amp;`` for transformers ones, as in the
  two libraries (needs ``ftfy``).
* ``"open_clip_canonicalize"``: open_clip's SigLIP clean-up (``HFTokenizer(clean='canonicalize')``):
  the ``ftfy`` / HTML step, ``_`` -> space, punctuation removed, lower-cased, whitespace collapsed;
  then the checkpoint's whole pipeline, as open_clip runs it.

Known limits: literal special-token strings inside a text (``"<|endoftext|>"``, ``"</s>"``) are
tokenized as the pipeline does (transformers' added-token matching for ``tokenizer.json``), not
as open_clip's regex does.
"""

from __future__ import annotations

import gzip
import html
import json
import shutil
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, InputError

# The files a checkpoint may ship its tokenizer as (any one set is enough).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt", "spiece.model", "bpe_simple_vocab_16e6.txt.gz")
SPEC_NAME = "vitkit_tokenizer.json"
CLEANS = ("none", "open_clip", "open_clip_canonicalize")
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers' tokenizer classes whose padding side is "left" unless tokenizer_config.json says
_LEFT_PADDING_CLASSES = ("Siglip2Tokenizer",)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _need(module: str, extra: str = "text"):
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as e:
        raise ConfigError(f"the tokenizer needs the '{module}' package: pip install 'vitkit[{extra}]'") from e


def find_tokenizer_files(directory: str | Path) -> dict[str, Path] | None:
    """The tokenizer files in ``directory`` (one complete set, by preference), or None."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return {"tokenizer.json": d / "tokenizer.json"}
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return {"vocab.json": d / "vocab.json", "merges.txt": d / "merges.txt"}
    if (d / "spiece.model").is_file():
        return {"spiece.model": d / "spiece.model"}
    if (d / "bpe_simple_vocab_16e6.txt.gz").is_file():
        return {"bpe_simple_vocab_16e6.txt.gz": d / "bpe_simple_vocab_16e6.txt.gz"}
    return None


def require_tokenizer_files(directory: str | Path, what: str = "") -> dict[str, Path]:
    """:func:`find_tokenizer_files` or a CheckpointError naming the files needed."""
    files = find_tokenizer_files(directory)
    if files is None:
        raise CheckpointError(
            f"{directory}{f' ({what})' if what else ''}: no tokenizer files; an image-text model needs one of "
            f"{', '.join(TOKENIZER_FILES)} (transformers' save_pretrained of the tokenizer writes them; open_clip "
            "ships CLIP's bpe_simple_vocab_16e6.txt.gz in its package). Pass tokenizer=<a directory or file with them>")
    return files


# --------------------------------------------------------------------------- CLIP's BPE, built
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (tokenizers' ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_from_bpe_gz(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from open_clip's ``bpe_simple_vocab_16e6.txt.gz``, laid out as open_clip's
    ``SimpleTokenizer`` lays them out (bytes, bytes + ``</w>``, the first 48,894 merges, start and
    end tokens: 49,408 ids), with transformers' names for the two special tokens."""
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_pipeline(vocab: dict[str, int], merges: list[str], bos: str = "<|startoftext|>",
                   eos: str = "<|endoftext|>", unk: str = "<|endoftext|>"):
    """The ``tokenizers`` pipeline transformers' CLIPTokenizer builds from vocab + merges."""
    tk = _need("tokenizers")
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    pairs = [tuple(m.split()) for m in merges if m and not m.startswith("#version")]
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                      add_prefix_space=False)
    return tok


# --------------------------------------------------------------------------- clean-up
def _basic_clean(text: str) -> str:
    ftfy = _need("ftfy")
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_text(text: str, clean: str) -> str:
    """``text`` cleaned as ``clean`` names (see the module doc)."""
    if clean == "none":
        return text
    if clean == "open_clip":  # open_clip.tokenizer._clean_lower
        return " ".join(_basic_clean(text).split()).strip().lower()
    if clean == "open_clip_canonicalize":  # open_clip.tokenizer._clean_canonicalize
        text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
        return " ".join(text.split()).strip()
    raise ConfigError(f"tokenizer clean must be one of {list(CLEANS)}, got {clean!r}")


def _siglip_canonicalize(text: str, lower: bool) -> str:
    """transformers' SiglipTokenizer.canonicalize_text (big_vision's prompt clean-up)."""
    import re

    if lower:
        text = text.lower()
    text = re.sub(r"\s+", " ", text.translate(_PUNCTUATION))
    return text.strip()


# --------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    """A checkpoint's tokenizer: ``tok(["a photo of a cat"]) -> LongTensor (1, context_length)``.

    Build it with :meth:`from_pretrained` (a directory or file holding the checkpoint's tokenizer
    files); :meth:`save` copies those files into a vitkit model directory with a small spec.

    Attributes: ``kind`` ("tokenizers" | "sentencepiece"), ``context_length``, ``clean``,
    ``pad_id``, ``eos_id``, ``bos_id`` (None when the pipeline adds none), ``padding_side``.
    ``pad_id`` given overrides the files' pad token (open_clip pads CLIP's ids with 0, transformers
    with ``<|endoftext|>``).
    """

    def __init__(self, files: dict[str, Path], context_length: int, clean: str = "none",
                 tokenizer_config: dict[str, Any] | None = None, pad_id: int | None = None) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"tokenizer context_length must be an int >= 2, got {context_length!r}")
        if clean not in CLEANS:
            raise ConfigError(f"tokenizer clean must be one of {list(CLEANS)}, got {clean!r}")
        self.files = dict(files)
        self.context_length = context_length
        self.clean = clean
        self.tokenizer_config = dict(tokenizer_config or {})
        cfg = self.tokenizer_config
        side = cfg.get("padding_side") or ("left" if cfg.get("tokenizer_class") in _LEFT_PADDING_CLASSES else "right")
        if side not in ("left", "right"):
            raise CheckpointError(f"tokenizer_config.json: padding_side must be 'left' or 'right', got {side!r}")
        self.padding_side = side
        self._pad_override = pad_id
        if "spiece.model" in files:
            self._init_sentencepiece(files["spiece.model"])
        else:
            self._init_tokenizers()
        if pad_id is not None:
            self.pad_id = pad_id
            if self.kind == "tokenizers":
                self._tok.enable_padding(direction=side, pad_id=pad_id, pad_token=self._tok.id_to_token(pad_id),
                                         length=context_length)

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _token(cfg: dict[str, Any], key: str, default: str | None) -> str | None:
        t = cfg.get(key, default)
        return t.get("content") if isinstance(t, dict) else t

    def _init_tokenizers(self) -> None:
        tk = _need("tokenizers")
        cfg, f = self.tokenizer_config, self.files
        self.kind = "tokenizers"
        if "tokenizer.json" in f:
            try:
                tok = tk.Tokenizer.from_file(str(f["tokenizer.json"]))
            except Exception as e:  # tokenizers raises a bare Exception on a malformed file
                raise CheckpointError(f"cannot read {f['tokenizer.json']}: {e}") from e
        else:
            if "bpe_simple_vocab_16e6.txt.gz" in f:
                vocab, merges = clip_vocab_from_bpe_gz(f["bpe_simple_vocab_16e6.txt.gz"])
            else:
                try:
                    vocab = json.loads(Path(f["vocab.json"]).read_text(encoding="utf-8"))
                    merges = Path(f["merges.txt"]).read_text(encoding="utf-8").split("\n")
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"cannot read the tokenizer's vocab.json / merges.txt: {e}") from e
            tok = _clip_pipeline(vocab, merges, self._token(cfg, "bos_token", "<|startoftext|>"),
                                 self._token(cfg, "eos_token", "<|endoftext|>"),
                                 self._token(cfg, "unk_token", "<|endoftext|>"))
        if self.clean == "open_clip":
            # open_clip's SimpleTokenizer cleans (and lower-cases) in Python and runs no normaliser after;
            # its HFTokenizer (clean="open_clip_canonicalize") runs the whole pipeline after cleaning
            tok.normalizer = None
        pad = self._token(cfg, "pad_token", None)
        eos = self._token(cfg, "eos_token", None)
        bos = self._token(cfg, "bos_token", None)
        if pad is None:  # CLIPTokenizer's default pad token is its eos token
            pad = eos if eos is not None else "<|endoftext|>"
        self.pad_id = tok.token_to_id(pad)
        if self.pad_id is None:
            raise CheckpointError(f"tokenizer: the pad token {pad!r} is not in the vocabulary")
        self.eos_id = tok.token_to_id(eos) if eos is not None else None
        probe = tok.encode("", add_special_tokens=True).ids
        self.bos_id = tok.token_to_id(bos) if bos is not None and tok.token_to_id(bos) in probe else None
        tok.no_padding()
        tok.enable_truncation(max_length=self.context_length)
        tok.enable_padding(direction=self.padding_side, pad_id=self.pad_id, pad_token=pad, length=self.context_length)
        self._tok = tok

    def _init_sentencepiece(self, model: Path) -> None:
        spm = _need("sentencepiece")
        cfg = self.tokenizer_config
        self.kind = "sentencepiece"
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(model))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {model}: {e}") from e
        if cfg.get("legacy") is False:  # transformers then switches the dummy prefix off
            from sentencepiece import sentencepiece_model_pb2 as pb2

            proto = pb2.ModelProto.FromString(sp.serialized_model_proto())
            if proto.normalizer_spec.add_dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                sp.LoadFromSerializedProto(proto.SerializeToString())
        self._sp = sp
        self.unk = self._token(cfg, "unk_token", "<unk>")
        eos = self._token(cfg, "eos_token", "</s>")
        pad = self._token(cfg, "pad_token", "</s>")
        self.eos_id, self.pad_id, self.bos_id = sp.piece_to_id(eos), sp.piece_to_id(pad), None
        self._specials = {eos, pad, self.unk}
        self._lower = bool(cfg.get("do_lower_case", True))
        self._unk_len = len(sp.encode(self.unk, out_type=str))

    @classmethod
    def from_pretrained(cls, source: str | Path, context_length: int, clean: str = "none",
                        pad_id: int | None = None) -> Tokenizer:
        """The tokenizer of a checkpoint directory (its tokenizer files and
        ``tokenizer_config.json``; a vitkit directory's ``tokenizer/``), or of one file
        (``tokenizer.json``, ``spiece.model``, ``bpe_simple_vocab_16e6.txt.gz``). A directory
        without tokenizer files is a CheckpointError naming the files needed."""
        p = Path(source)
        if not p.exists():
            raise CheckpointError(f"{p}: no such tokenizer file or directory")
        if p.is_dir() and (p / "tokenizer" / SPEC_NAME).is_file():
            p = p / "tokenizer"
        if p.is_dir() and (p / SPEC_NAME).is_file():
            spec = json.loads((p / SPEC_NAME).read_text())
            return cls(require_tokenizer_files(p), int(spec["context_length"]), spec.get("clean", "none"),
                       spec.get("tokenizer_config"), spec.get("pad_id"))
        if p.is_file():
            if p.name.endswith(".txt.gz"):
                files = {"bpe_simple_vocab_16e6.txt.gz": p}
            elif p.name in ("tokenizer.json", "spiece.model"):
                files = {p.name: p}
            else:
                raise CheckpointError(f"{p}: not a tokenizer file; expected one of {', '.join(TOKENIZER_FILES)}")
            d = p.parent
        else:
            files, d = require_tokenizer_files(p), p
        cfg_file = d / "tokenizer_config.json"
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
        keep = ("tokenizer_class", "padding_side", "bos_token", "eos_token", "pad_token", "unk_token",
                "do_lower_case", "legacy")
        return cls(files, context_length, clean, {k: cfg[k] for k in keep if k in cfg}, pad_id)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self.kind == "sentencepiece" else self._tok.get_vocab_size()

    def _sp_ids(self, text: str) -> list[int]:
        """transformers' SiglipTokenizer.tokenize + convert_tokens_to_ids (no added-token split)."""
        text = "▁" + text.replace("▁", " ")
        text = _siglip_canonicalize(text, self._lower)
        pieces = self._sp.encode(self.unk + text, out_type=str)
        pieces = pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces
        if len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in self._specials:
            pieces = pieces[1:]
        return [self._sp.piece_to_id(t) for t in pieces]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,) texts -> (B, context_length) int64 ids, truncated and padded as the source does."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts must be strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
        texts = [clean_text(t, self.clean) for t in texts]
        L = self.context_length
        if self.kind == "tokenizers":
            return torch.tensor([e.ids for e in self._tok.encode_batch(texts)], dtype=torch.long).reshape(-1, L)
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self._sp_ids(t)[: L - 1] + [self.eos_id]
            if self.padding_side == "right":
                out[i, : len(ids)] = torch.tensor(ids)
            else:
                out[i, L - len(ids):] = torch.tensor(ids)
        return out

    __call__ = encode

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes before truncation (special tokens included): a caller can say
        which texts ``encode`` truncates (those longer than ``context_length``)."""
        texts = [clean_text(t, self.clean) for t in ([texts] if isinstance(texts, str) else texts)]
        if self.kind == "sentencepiece":
            return [len(self._sp_ids(t)) + 1 for t in texts]
        tok = self._tok
        tok.no_truncation()
        tok.no_padding()
        try:
            return [len(e.ids) for e in tok.encode_batch(texts)]
        finally:
            tok.enable_truncation(max_length=self.context_length)
            tok.enable_padding(direction=self.padding_side, pad_id=self.pad_id,
                               pad_token=tok.id_to_token(self.pad_id), length=self.context_length)

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer files into ``directory`` with ``vitkit_tokenizer.json`` (context
        length, clean-up, the tokenizer_config entries used); :meth:`from_pretrained` reads it back."""
        from ..io import atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, path in self.files.items():
            if Path(path).resolve() != (d / name).resolve():
                shutil.copyfile(path, d / name)
        spec = {"format": "vitkit-tokenizer", "kind": self.kind, "files": sorted(self.files),
                "context_length": self.context_length, "clean": self.clean, "pad_id": self._pad_override,
                "tokenizer_config": self.tokenizer_config}
        atomic_write_text(d / SPEC_NAME, json.dumps(spec, indent=2) + "\n")
        return d

    def save_hf(self, directory: str | Path) -> Path:
        """Write the tokenizer as transformers reads it: the source files (CLIP's vocabulary as
        ``vocab.json`` + ``merges.txt`` when it came as open_clip's ``.txt.gz``) and a
        ``tokenizer_config.json`` with the tokenizer class and ``model_max_length``."""
        from ..io import atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.tokenizer_config)
        if "bpe_simple_vocab_16e6.txt.gz" in self.files:
            vocab, merges = clip_vocab_from_bpe_gz(self.files["bpe_simple_vocab_16e6.txt.gz"])
            atomic_write_text(d / "vocab.json", json.dumps(vocab))
            atomic_write_text(d / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        else:
            for name, path in self.files.items():
                if Path(path).resolve() != (d / name).resolve():
                    shutil.copyfile(path, d / name)
        if "tokenizer_class" not in cfg and "tokenizer.json" not in self.files:
            cfg["tokenizer_class"] = "SiglipTokenizer" if self.kind == "sentencepiece" else "CLIPTokenizer"
        cfg["model_max_length"] = self.context_length
        atomic_write_text(d / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
        return d

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, files={sorted(self.files)}, context_length={self.context_length}, "
                f"clean={self.clean!r}, pad_id={self.pad_id}, eos_id={self.eos_id}, padding={self.padding_side})")
