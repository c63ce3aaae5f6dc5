"""Loading the image-text pair (:class:`vitkit.model.image_text.ImageTextModel`); it is written by
``model.save_pretrained`` (:func:`vitkit.io.save_image_text`).

vitkit's image-text directory is an ordinary vitkit model directory (``config.json`` +
``model.safetensors``: the image tower, so ``vitkit.load_model(dir)`` keeps returning the image
ViT) plus::

    text_config.json        {"format": "vitkit-text", "format_version": 1, "config": {TextConfig},
                             "loss": "softmax" | "sigmoid", "pretrained_info": {...}}
    text_model.safetensors  the text tower (TextTransformer names) + logit_scale [+ logit_bias]
    tokenizer/              the checkpoint's tokenizer files + vitkit_tokenizer.json

:func:`load_image_text` reads that and every source format the families ship in: transformers
``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` directories, OpenAI / OpenCLIP state dicts and
OpenCLIP hub dirs, big_vision SigLIP ``.npz`` files, and hub ids of those. The tokenizer is found (or refused, naming the files
needed) before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import TextConfig
from ..errors import CheckpointError, ConfigError
from ..io import TEXT_CONFIG_NAME, TEXT_WEIGHTS_NAME, TOKENIZER_DIR, load_safetensors
from .tokenizer import Tokenizer

_HF_TYPES = {"clip": "clip", "siglip": "siglip", "siglip2": "siglip2"}


def is_image_text_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / TEXT_CONFIG_NAME).is_file() and (p / TEXT_WEIGHTS_NAME).is_file()


def _build(vision, conv, tokenizer, strict: bool, device, source: str, fmt: str):
    """The pair from an image model and a TextConverted, through the strict loader's check."""
    from ..interop.common import LoadReport, load_into
    from ..model.image_text import ImageTextModel
    from ..model.text import TextTransformer

    text = TextTransformer(conv.config)
    report = LoadReport(source=source, format=fmt, notes=list(conv.notes))
    report.unexpected.extend(conv.unexpected)
    load_into(text, conv.state, report, strict=strict)
    if conv.logit_scale is None:
        report.notes.append("no logit_scale in the checkpoint: CLIP's init log(1/0.07) used")
    model = ImageTextModel(vision, text, loss=conv.loss, logit_bias=None if conv.logit_bias is None else 0.0,
                           tokenizer=tokenizer)
    with torch.no_grad():  # the stored tensors, bit-exact
        if conv.logit_scale is not None:
            model.logit_scale.copy_(conv.logit_scale.reshape(()))
        if conv.logit_bias is not None:
            model.logit_bias.copy_(conv.logit_bias.reshape(()))
    model.pretrained_info = {**(vision.pretrained_info or {}), "text_report": report.to_dict()}
    model.load_report = report
    return model.to(device).eval()


def _read_vitkit(d: Path, tokenizer, strict: bool, device):
    from ..interop.clip_text import TextConverted, split_pair
    from ..interop.load import load_model

    try:
        meta = json.loads((d / TEXT_CONFIG_NAME).read_text())
        config = TextConfig.from_dict(meta["config"])
    except (ValueError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{d / TEXT_CONFIG_NAME}: not a vitkit text config ({e})") from e
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(
        tokenizer or (d / TOKENIZER_DIR if (d / TOKENIZER_DIR).is_dir() else d), config.context_length)
    vision = load_model(d, device="cpu", strict=strict)
    state = load_safetensors(d / TEXT_WEIGHTS_NAME)
    scale, bias = split_pair(state)
    conv = TextConverted(config=config, state=state, loss=meta.get("loss", "softmax"), logit_scale=scale,
                         logit_bias=bias)
    model = _build(vision, conv, tok, strict, device, str(d), "vitkit")
    if meta.get("pretrained_info"):
        model.pretrained_info = {**meta["pretrained_info"], **model.pretrained_info}
    return model


_HUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "spiece.model")


def _download_tokenizer(hub_id: str) -> None:
    """Fetch the tokenizer files of a hub repo next to its weights (the cache first; a repo may have
    any subset of them; the tokenizer reader names what is missing)."""
    from huggingface_hub import hf_hub_download

    from ..interop.hub import _offline, _unreachable, parse_hub_id

    repo_id, revision = parse_hub_id(hub_id)
    tries = (True,) if _offline() or _unreachable(3.0) is not None else (True, False)
    for name in _HUB_TOKENIZER_FILES:
        for local_only in tries:
            try:
                hf_hub_download(repo_id, name, revision=revision, local_files_only=local_only)
                break
            except Exception:  # noqa: BLE001 - absent file / offline: the reader reports what is missing
                continue


_TRUNK = "visual.trunk."
# Heads of timm's SigLIP trunks whose head width is not 64 (timm's vit_so400m_*_siglip_* and
# vit_giantopt_*_siglip_* model_args): the weights cannot tell, open_clip's vision_cfg does not say.
_SIGLIP_TRUNK_HEADS = {1152: 16, 1536: 16}


def _has_timm_trunk(checkpoint) -> bool:
    from ..interop.clip import read_open_clip_weights

    return any(k.startswith(_TRUNK) for k in read_open_clip_weights(checkpoint)[1])


def _read_open_clip_trunk(checkpoint, hints: dict[str, Any]):
    """The image tower of an OpenCLIP model whose ``visual`` is a timm trunk (open_clip's ``TimmModel``:
    its SigLIP / SigLIP2 models, ``visual.trunk.*``): the trunk's tensors are a timm ViT's (timm's names
    are vitkit's), read by vitkit's timm reader with what ``open_clip_config.json``'s ``vision_cfg`` says
    (``timm_model_name``, ``timm_pool``, ``image_size``) and its ``preprocess_cfg``. Only trunks whose
    output is the embedding (``timm_proj`` "none": no ``visual.head.*``) are read."""
    from ..interop import timm
    from ..interop.clip import PREPROCESS, read_open_clip_weights
    from ..interop.common import Converted, size_hints

    p, raw = read_open_clip_weights(checkpoint)
    state = {k[len(_TRUNK):]: v for k, v in raw.items() if k.startswith(_TRUNK)}
    head = sorted(k for k in raw if k.startswith("visual.") and not k.startswith(_TRUNK))
    if head:
        raise CheckpointError(f"{p}: an OpenCLIP timm trunk with a projection after it ({head[0]}, ...); vitkit reads "
                              "trunks whose output is the image embedding (timm_proj 'none', as OpenCLIP's SigLIP models)")
    cfg_file = p.parent / "open_clip_config.json"
    oc = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    vision = (oc.get("model_cfg") or {}).get("vision_cfg") or {}
    arch = vision.get("timm_model_name")
    args: dict[str, Any] = {"global_pool": vision.get("timm_pool", "avg")}  # TimmModel's default pool
    dim = state["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in state else None
    if hints.get("num_heads"):
        args["num_heads"] = hints["num_heads"]
    elif dim in _SIGLIP_TRUNK_HEADS:  # else the timm reader's rule (published widths, then head_dim 64)
        args["num_heads"] = _SIGLIP_TRUNK_HEADS[dim]
    if hints.get("act"):
        args["act_layer"] = hints["act"]
    notes = [f"image tower: the timm trunk {arch or '(unnamed)'} under visual.trunk., read as timm"]
    config = timm.infer_config(state, args, str(p), hints=size_hints(hints, None, vision.get("image_size")),
                               notes=notes, architecture=arch)
    pre = oc.get("preprocess_cfg") or {}
    preprocess = {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS,
                  **{k: pre[k] for k in ("mean", "std", "interpolation") if k in pre},
                  "crop_mode": "squash" if pre.get("resize_mode") == "squash" else "center"}
    return Converted(config=config, state=state, format="timm", source=str(p), preprocess=preprocess, notes=notes,
                     info={"family": "siglip", "architecture": arch})


def load_image_text(source: str | Path, tokenizer: str | Path | Tokenizer | None = None, device: str = "cpu",
                    strict: bool = True, **hints: Any):
    """Both towers, the logit scale (and SigLIP's bias) and the tokenizer of a CLIP / OpenCLIP /
    SigLIP / SigLIP2 checkpoint, as an :class:`~vitkit.model.image_text.ImageTextModel`.

    Args:
        source: a vitkit image-text directory (``model.save_pretrained``); a transformers
            ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` directory; an OpenAI / OpenCLIP state
            dict (``.pt`` / ``.bin`` / ``.safetensors``) or OpenCLIP hub dir (``open_clip_config.json``
            read where present; OpenCLIP's SigLIP models, whose image tower is a timm trunk, included); a big_vision SigLIP ``.npz`` (``params/img/`` + ``params/txt/``); or a
            hub id of one of those.
        tokenizer: where the tokenizer files are when the source has none (OpenAI / OpenCLIP state
            dicts and big_vision .npz files ship none: a directory with ``vocab.json`` + ``merges.txt``,
            ``tokenizer.json`` or ``spiece.model``, or open_clip's ``bpe_simple_vocab_16e6.txt.gz``), or a
            ready :class:`vitkit.text.Tokenizer`.
        strict: every tensor of both towers must be used and fit (as ``from_pretrained``).
        **hints: what the weights cannot tell: ``act`` (both towers of a bare OpenAI / OpenCLIP state
            dict), ``num_heads`` (image), ``text_heads``, ``text_act``.

    ``model.load_report`` is the text tower's report; ``model.vision.load_report`` the image's.
    """
    from ..interop.formats import detect
    from ..interop.hub import download, looks_like_hub_id
    from ..interop.load import model_from_converted
    from ..interop.source import Source

    src = str(source)
    if looks_like_hub_id(src) and not Path(src).exists():
        source = download(src)
        _download_tokenizer(src)
    p = Path(source)
    if p.is_dir() and is_image_text_dir(p):
        return _read_vitkit(p, tokenizer, strict, device)
    open_clip_dir = p.is_dir() and any((p / f).is_file() for f in ("open_clip_model.safetensors",
                                                                    "open_clip_pytorch_model.bin"))
    checkpoint = Source(p)  # detection, the image reader and the text reader share what each reads of it
    fmt = "openai_clip" if open_clip_dir else detect(checkpoint).name
    if fmt == "vitkit":
        raise CheckpointError(f"{p}: a vitkit image model without a text tower ({TEXT_CONFIG_NAME}); "
                              "vitkit.load_model loads it")
    readers = {"hf": _read_hf_pair, "openai_clip": _read_open_clip_pair, "jax": _read_npz_pair}
    if fmt not in readers or (fmt == "jax" and not p.is_file()):
        raise CheckpointError(f"{p}: a {fmt} checkpoint holds no text tower; image-text sources are transformers "
                              "CLIP / SigLIP / SigLIP2 dirs, OpenAI / OpenCLIP state dicts, big_vision SigLIP .npz "
                              "and vitkit image-text dirs")
    text, tok, conv_img = readers[fmt](checkpoint, p, tokenizer, hints)
    conv_img.source = src
    vision = model_from_converted(conv_img, strict=strict)
    return _build(vision, text, tok, strict, device, src, fmt)


def _image_hints(hints: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hints.items() if not k.startswith("text_")}


def _read_hf_pair(checkpoint, p: Path, tokenizer, hints: dict[str, Any]):
    """(text bundle, tokenizer, image bundle) of a transformers CLIPModel / SiglipModel / Siglip2Model dir."""
    from ..interop import clip_text, siglip_text
    from ..interop.load import read_pretrained

    cfg = checkpoint.directory / "config.json"
    meta = checkpoint.json(cfg) if cfg.is_file() else {}
    family = _HF_TYPES.get(str(meta.get("model_type")))
    if family is None:
        raise CheckpointError(f"{p}: transformers model_type {meta.get('model_type')!r} has no text tower vitkit "
                              f"reads; image-text model types: {sorted(_HF_TYPES)}")
    reader = clip_text.convert_hf if family == "clip" else siglip_text.convert_hf
    tc = meta.get("text_config") or {}
    ctx = int(tc.get("max_position_embeddings", 77 if family == "clip" else 64))
    directory = p if p.is_dir() else p.parent
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer or directory, ctx)
    if family == "siglip2":
        conv_img = siglip_text.read_siglip2_vision(directory, hints)
    else:
        conv_img = read_pretrained(checkpoint, format="hf", **_image_hints(hints))
    return reader(checkpoint, hints), tok, conv_img


def _read_open_clip_pair(checkpoint, p: Path, tokenizer, hints: dict[str, Any]):
    """(text bundle, tokenizer, image bundle) of an OpenAI / OpenCLIP state dict or hub dir."""
    from ..interop import clip_text
    from ..interop.load import read_pretrained
    from .tokenizer import require_tokenizer_files

    tok_src = tokenizer
    if tok_src is None:  # checked before any weights are read
        tok_src = p if p.is_dir() else p.parent
        require_tokenizer_files(tok_src, "OpenAI / OpenCLIP state dicts ship none: pass tokenizer=")
    text = clip_text.convert_openai(checkpoint, hints)
    tok = tok_src if isinstance(tok_src, Tokenizer) else Tokenizer.from_pretrained(
        tok_src, text.config.context_length, **text.tokenizer)
    image_hints = _image_hints(hints)
    conv_img = (_read_open_clip_trunk(checkpoint, image_hints) if _has_timm_trunk(checkpoint)
                else read_pretrained(checkpoint, format="openai_clip", **image_hints))
    return text, tok, conv_img


def _read_npz_pair(checkpoint, p: Path, tokenizer, hints: dict[str, Any]):
    """(text bundle, tokenizer, image bundle) of a big_vision SigLIP .npz (params/img/ + params/txt/)."""
    from ..interop import siglip_text
    from ..interop.load import read_pretrained
    from .tokenizer import require_tokenizer_files

    if not siglip_text.has_npz_text(p):
        raise CheckpointError(f"{p}: a JAX .npz without a text tower (params/txt/); vitkit.from_pretrained "
                              "loads its image tower")
    tok_src = tokenizer
    if tok_src is None:  # big_vision keeps the SentencePiece model apart from the weights
        tok_src = p.parent
        require_tokenizer_files(tok_src, "big_vision .npz files ship none: pass tokenizer=")
    text = siglip_text.convert_npz(p, hints)
    tok = tok_src if isinstance(tok_src, Tokenizer) else Tokenizer.from_pretrained(tok_src, text.config.context_length)
    return text, tok, read_pretrained(p, format="jax", **_image_hints(hints))


def export_hf(model, directory: str | Path) -> Path:
    """The pair as a transformers ``CLIPModel`` (loss "softmax") or ``SiglipModel`` ("sigmoid")
    directory: both towers through the same rename tables the readers use (the image tower as
    :func:`vitkit.interop.clip.export_hf` / :func:`vitkit.interop.siglip.export_hf` write it), the
    logit scale (and bias), and the tokenizer's files with a ``tokenizer_config.json``.
    A text tower transformers' class cannot express (CLIP: causal, no projection bias, end-token
    pooling; SigLIP: bidirectional, last-token pooling, a head) is a ConfigError naming the part."""
    import tempfile

    from ..interop import clip, clip_text, siglip, siglip_text
    from ..interop.common import read_json
    from ..interop.hf_common import act_back, write_dir

    t = model.text.config
    clip_family = model.loss == "softmax"
    want = ((t.causal, t.pooling != "last", not t.proj_bias, t.embed_dim is not None) if clip_family
            else (not t.causal, t.pooling == "last", t.proj_bias, t.embed_dim is not None))
    if not all(want) or (clip_family and t.pooling == "eos_id" and t.eos_token_id == 2):
        raise ConfigError(
            f"no transformers {'CLIPModel' if clip_family else 'SiglipModel'} equivalent of this text tower (causal="
            f"{t.causal}, pooling={t.pooling!r}, proj_bias={t.proj_bias}, embed_dim={t.embed_dim})")
    with tempfile.TemporaryDirectory() as tmp:
        (clip.export_hf if clip_family else siglip.export_hf)(model.vision, tmp)
        vision_meta = read_json(Path(tmp) / "config.json")
        vision_state = load_safetensors(Path(tmp) / "model.safetensors")
        processor = read_json(Path(tmp) / "preprocessor_config.json")
    state = {(k if k.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{k}"): v
             for k, v in vision_state.items()}
    for k in ("architectures", "model_type"):
        vision_meta.pop(k, None)
    text_meta = {"vocab_size": t.vocab_size, "hidden_size": t.dim, "intermediate_size": t.hidden_dim,
                 "num_hidden_layers": t.depth, "num_attention_heads": t.num_heads,
                 "max_position_embeddings": t.context_length, "hidden_act": act_back(t.act),
                 "layer_norm_eps": t.norm_eps, "pad_token_id": t.pad_token_id, "attention_dropout": 0.0}
    if clip_family:
        # transformers takes the argmax of the ids when eos_token_id == 2, else the first eos
        text_meta["eos_token_id"] = 2 if t.pooling == "eot_argmax" else t.eos_token_id
        state.update(clip_text.export_hf_state(model.text, logit_scale=model.logit_scale.detach().reshape(())))
        meta = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": t.embed_dim,
                "logit_scale_init_value": model.logit_scale.item(), "text_config": text_meta,
                "vision_config": vision_meta}
    else:
        text_meta.update(eos_token_id=t.eos_token_id, projection_size=t.embed_dim)
        state.update(clip_text.export_hf_state(
            model.text, siglip_text.HF_TABLE, logit_scale=model.logit_scale.detach().reshape(1),
            logit_bias=model.logit_bias.detach().reshape(1)))
        meta = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text_meta,
                "vision_config": vision_meta}
    out = write_dir(directory, state, meta, processor)
    if model.tokenizer is not None:
        model.tokenizer.save_hf(out)
    return out


class _TextEmbeds(torch.nn.Module):
    """The text tower as a graph: ``input_ids`` (B, L) [, ``attention_mask`` (B, L)] -> ``text_embeds``
    (B, E), ``model.text(ids, attention_mask)`` (projected, not normalised)."""

    def __init__(self, text: torch.nn.Module, with_mask: bool) -> None:
        super().__init__()
        self.text, self.with_mask = text, with_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text(input_ids, attention_mask if self.with_mask else None)


def export_text_onnx(model, path: str | Path, opset: int = 18, attention_mask: bool = False) -> Path:
    """The text tower of ``model`` (an :class:`~vitkit.model.image_text.ImageTextModel` or its
    ``TextTransformer``) as an ONNX graph: ``input_ids`` (B, L) int64 [and, with
    ``attention_mask=True``, ``attention_mask`` (B, L), 1 = token, 0 = padding] -> ``text_embeds``
    (B, E) float32, what ``model.encode_text(ids)`` returns. The batch and the length (up to the
    context length) are dynamic axes; the causal mask and the pooling (end-of-text argmax, first
    eos, last token) are in the graph. The sources' own zero-shot code passes no mask (the
    default). Needs onnx (and onnxscript for torch.export's exporter; without it the
    TorchScript-based one)."""
    import warnings

    from ..interop.graph import check_onnx_export
    from ..io import atomic_write
    from ..model.text import TextTransformer

    text = getattr(model, "text", model)
    if not isinstance(text, TextTransformer):
        raise ConfigError(f"export_text_onnx takes an image-text model or its text tower, got {type(model).__name__}")
    opset = check_onnx_export(opset)
    c = text.config
    dev = next(text.parameters()).device
    ids = torch.full((2, c.context_length), c.pad_token_id, dtype=torch.long, device=dev)  # (2, L) example
    ids[:, 0] = c.eos_token_id
    names = ["input_ids", "attention_mask"] if attention_mask else ["input_ids"]
    args = (ids, torch.ones_like(ids)) if attention_mask else (ids,)
    was_training = text.training
    wrapped = _TextEmbeds(text, attention_mask).eval()

    def write(tmp: str) -> None:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            axes = {n: {0: "batch", 1: "length"} for n in names} | {"text_embeds": {0: "batch"}}
            torch.onnx.export(wrapped, args, tmp, input_names=names, output_names=["text_embeds"],
                              opset_version=opset, dynamic_axes=axes, dynamo=False)
            return
        B = torch.export.Dim("batch", min=1, max=4096)
        Lz = torch.export.Dim("length", min=1, max=c.context_length)
        with warnings.catch_warnings():  # ids and mask share both axes: the exporter says it keeps one name
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            prog = torch.onnx.export(wrapped, args, input_names=names, output_names=["text_embeds"],
                                     opset_version=opset, dynamic_shapes={n: {0: B, 1: Lz} for n in names},
                                     dynamo=True, verbose=False)
        prog.save(tmp)

    try:
        with torch.no_grad():
            return atomic_write(path, write)
    finally:
        text.train(was_training)
