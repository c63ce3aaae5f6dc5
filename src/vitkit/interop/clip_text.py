"""CLIP / OpenCLIP text towers (and the logit scale), read into
:class:`vitkit.model.text.TextTransformer`'s names, from

* transformers ``CLIPModel`` / ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` directories
  (``text_model.*``, ``text_projection``, ``logit_scale``; :data:`HF_TABLE`). Pooling follows the
  config as ``CLIPTextTransformer`` does: ``eos_token_id == 2`` (configs before transformers PR
  #24773) takes the argmax of the ids, any other the first position of ``eos_token_id``.
* OpenAI / OpenCLIP state dicts (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.*``, ``ln_final``, ``text_projection``, ``logit_scale``; :data:`OPENAI_TABLE`),
  with ``open_clip_config.json``'s ``text_cfg`` where present (heads, activation, pooling, causal
  mask, tokenizer clean-up). ``text_projection`` is a (D, E) matrix (``x @ P``), or an
  ``nn.Linear`` (``text_projection.weight`` / ``.bias``) in OpenCLIP's ``proj_bias`` models.

Both tables map both ways (the vitkit names are the text tower's; ``logit_scale`` / ``logit_bias``
are the pair's). The image towers are read by :mod:`vitkit.interop.clip`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TextConfig
from ..errors import CheckpointError
from .clip import HF_ENCODER_ROWS, OPENAI_TABLE
from .table import RenameTable


@dataclass
class TextConverted:
    """A checkpoint's text tower in vitkit's names, plus the pair's logit scale / bias."""

    config: TextConfig
    state: dict[str, torch.Tensor]
    loss: str  # "softmax" (CLIP) | "sigmoid" (SigLIP)
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # Tokenizer.from_pretrained kwargs (clean, pad_id)


_PAIR = ("logit_scale", "logit_bias")

# transformers' text tower (names after "text_model."; the projection and scale are top-level)
HF_TEXT_ROWS = [
    ("token_embed.weight", "embeddings.token_embedding.weight"),
    ("pos_embed", "embeddings.position_embedding.weight"),  # (L, D) <-> (1, L, D)
    *HF_ENCODER_ROWS,
    ("norm.{p}", "final_layer_norm.{p}"),
]
HF_TABLE = RenameTable([
    *HF_TEXT_ROWS,
    ("proj.weight", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
], dropped={"embeddings.position_ids": "a buffer of 0..L-1 (older transformers saves)"})

# OpenAI / OpenCLIP: the image table's block rows apply to the text blocks unchanged
OPENAI_TABLE_TEXT = RenameTable([
    ("token_embed.weight", "token_embedding.weight"),
    ("pos_embed", "positional_embedding"),  # (L, D) <-> (1, L, D)
    *[(v, s) for v, s in OPENAI_TABLE.pairs if v.startswith("blocks.")],
    ("norm.{p}", "ln_final.{p}"),
    ("proj.weight", "text_projection"),  # (D, E) <-> (E, D): transposed
    ("proj.{p}", "text_projection.{p}"),  # OpenCLIP proj_bias: an nn.Linear, already (E, D)
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
], dropped={"attn_mask": "the causal mask, rebuilt from the config",
            "input_resolution": "OpenAI JIT metadata", "context_length": "OpenAI JIT metadata",
            "vocab_size": "OpenAI JIT metadata"})


def split_pair(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pop the pair's logit scale / bias out of a renamed state, as () tensors."""
    scale, bias = (state.pop(k, None) for k in _PAIR)
    return (None if scale is None else scale.reshape(()), None if bias is None else bias.reshape(()))


def text_depth(state: dict[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not idx:
        raise CheckpointError("the text tower has no blocks")
    return 1 + max(idx)


def _hf_text_config(meta: dict[str, Any]) -> dict[str, Any]:
    tc = meta.get("text_config")
    if not isinstance(tc, dict):
        tc = meta.get("text_config_dict")
    return dict(tc) if isinstance(tc, dict) else dict(meta)


def read_hf_text(directory: Path, meta: dict[str, Any], raw: dict[str, torch.Tensor], table: RenameTable,
                 source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str], list[str]]:
    """(text config dict, renamed text state with the pair's tensors, unexpected, notes) of a
    transformers two-tower or text-only state; q/k/v fused."""
    from .hf_common import fuse_qkv

    tc = _hf_text_config(meta)
    text = {}
    for k, v in raw.items():
        if k.startswith("text_model."):
            text[k[len("text_model."):]] = v
        elif not k.startswith(("vision_model.", "visual_projection.")):
            text[k] = v  # text_projection, head (SigLIP's is under text_model.), logit_scale / bias
    notes: list[str] = []
    state, unmatched = table.to_vitkit(text, notes)
    if "token_embed.weight" not in state:
        raise CheckpointError(f"{source}: no text_model.embeddings.token_embedding.weight; no text tower in it")
    state = fuse_qkv(state, source)
    state["pos_embed"] = state["pos_embed"].reshape(1, *state["pos_embed"].shape[-2:])
    return tc, state, unmatched, notes


def convert_hf(path: str | Path, hints: dict[str, Any] | None = None) -> TextConverted:
    """The text tower of a transformers CLIPModel / CLIPTextModel[WithProjection] directory."""
    from .hf_common import hf_act, read_dir

    directory, meta, wfile, raw = read_dir(path)
    tc, state, unexpected, notes = read_hf_text(directory, meta, raw, HF_TABLE, str(wfile))
    scale, bias = split_pair(state)
    V, D = state["token_embed.weight"].shape
    eos = int(tc.get("eos_token_id", 2))
    act = (hints or {}).get("text_act") or hf_act(tc.get("hidden_act", "quick_gelu"), str(directory))
    config = TextConfig(
        vocab_size=V, context_length=state["pos_embed"].shape[1], dim=D, depth=text_depth(state),
        num_heads=int(tc.get("num_attention_heads", 8)), mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        act=act, norm_eps=float(tc.get("layer_norm_eps", 1e-5)), causal=True,
        pooling="eot_argmax" if eos == 2 else "eos_id",
        embed_dim=state["proj.weight"].shape[0] if "proj.weight" in state else None, proj_bias=False,
        pad_token_id=min(int(tc.get("pad_token_id", 1) or 0), V - 1), eos_token_id=eos if eos < V else V - 1,
    )
    notes.append(f"text pooling {config.pooling} (eos_token_id={eos} in the config, as CLIPTextTransformer reads it)")
    return TextConverted(config=config, state=state, loss="softmax", logit_scale=scale, logit_bias=bias,
                         unexpected=unexpected, notes=notes)


def export_hf_state(text, table: RenameTable = HF_TABLE, **pair: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text tower in transformers' names through ``table`` (this module's or SigLIP's), q/k/v
    split and the position table (L, D); ``pair``: ``logit_scale`` / ``logit_bias`` tensors in the
    source's shape. The projection (CLIP's ``text_projection``) and the pair stay top-level, the
    rest goes under ``text_model.``: the inverse of :func:`read_hf_text`."""
    from .hf_common import split_qkv

    D = text.config.dim
    sd = dict(text.state_dict())
    sd["pos_embed"] = sd["pos_embed"].reshape(-1, D)
    sd.update(pair)
    out, left = table.from_vitkit(split_qkv(sd, D, ("q", "k", "v")))
    if left:
        raise CheckpointError(f"the transformers text layout has no names for {left}")
    top = ("text_projection.weight", "logit_scale", "logit_bias")
    return {(k if k in top else f"text_model.{k}"): v for k, v in out.items()}


# --------------------------------------------------------------------------- OpenAI / OpenCLIP
def open_clip_model_cfg(weights: Path) -> dict[str, Any] | None:
    cfg = weights.parent / "open_clip_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_cfg") or None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg}: {e}") from e


def convert_openai(path: str | Path, hints: dict[str, Any] | None = None) -> TextConverted:
    """The text tower of an OpenAI CLIP / OpenCLIP state dict (file, or an OpenCLIP hub dir)."""
    from .clip import read_open_clip_weights

    p, raw = read_open_clip_weights(path)
    hints = dict(hints or {})
    text = {k: v for k, v in raw.items() if not k.startswith("visual.")}
    if "text.token_embedding.weight" in text:  # open_clip's CustomTextCLIP (its SigLIP models): the tower under text.
        text = {k.removeprefix("text."): v for k, v in text.items()}
    notes: list[str] = []
    state, unexpected = OPENAI_TABLE_TEXT.to_vitkit(text, notes)
    if "token_embed.weight" not in state:
        raise CheckpointError(f"{p}: no token_embedding.weight; this state dict has no text tower")
    if "proj.weight" in state and "proj.bias" not in state and "text_projection" in text:
        state["proj.weight"] = state["proj.weight"].t().contiguous()  # x @ P: (D, E) -> Linear (E, D)
    scale, bias = split_pair(state)
    state["pos_embed"] = state["pos_embed"].reshape(1, *state["pos_embed"].shape[-2:])
    oc = open_clip_model_cfg(p) or {}
    tcfg = oc.get("text_cfg") or {}
    V, D = state["token_embed.weight"].shape
    heads = hints.get("text_heads") or tcfg.get("heads") or max(1, D // 64)
    act = hints.get("text_act") or hints.get("act")
    if act is None:
        act_kwargs = tcfg.get("act_kwargs") or {}
        act = ("quick_gelu" if oc.get("quick_gelu") else "gelu_tanh" if act_kwargs.get("approximate") == "tanh"
               else "gelu") if oc else "quick_gelu"
        notes.append(f"text activation {act} " + ("from open_clip_config.json" if oc else
                                                  "assumed (no config; OpenAI's weights use QuickGELU)"))
    pool = tcfg.get("pool_type", "argmax")
    pooling = {"argmax": "eot_argmax", "eos": "eos_id", "last": "last"}.get(pool)
    if pooling is None:
        raise CheckpointError(f"{p}: open_clip text pool_type {pool!r} is not one vitkit reads (argmax, eos, last)")
    if tcfg.get("embed_cls") or tcfg.get("use_pad_mask"):
        raise CheckpointError(f"{p}: an open_clip text tower with a class token or padding mask (CoCa-style) is not "
                              "supported")
    eps = float((tcfg.get("norm_kwargs") or {}).get("eps", 1e-5))
    config = TextConfig(
        vocab_size=V, context_length=state["pos_embed"].shape[1], dim=D, depth=text_depth(state),
        num_heads=int(heads), mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], act=act, norm_eps=eps,
        qkv_bias="blocks.0.attn.qkv.bias" in state, causal=not tcfg.get("no_causal_mask", False), pooling=pooling,
        embed_dim=state["proj.weight"].shape[0] if "proj.weight" in state else None, proj_bias="proj.bias" in state,
        pad_token_id=int(tcfg.get("pad_id", 0)), eos_token_id=int(tcfg.get("eos_id", V - 1)),
    )
    clean = (tcfg.get("tokenizer_kwargs") or {}).get("clean", "lower" if not tcfg.get("hf_tokenizer_name") else
                                                      "whitespace")
    tok = {"clean": {"lower": "open_clip", "canonicalize": "open_clip_canonicalize"}.get(clean, "none")}
    if not tcfg.get("hf_tokenizer_name"):
        tok["pad_id"] = 0  # open_clip's SimpleTokenizer pads with 0
    return TextConverted(config=config, state=state, loss="sigmoid" if bias is not None else "softmax",
                         logit_scale=scale, logit_bias=bias, unexpected=unexpected, notes=notes, tokenizer=tok)
