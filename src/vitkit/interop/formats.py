"""The one registry of weight formats: what each reads and writes, and which families ship in it.

Every list of format names in vitkit (``from_pretrained(format=)``, ``export_to``, the CLI's
``--format`` choices, ``vitkit models --families``) comes from :data:`FORMATS` here. A format is a
module of :mod:`vitkit.interop` with ``convert(path, arch, hints) -> Converted`` (when it reads)
and an export function (when it writes); adding a format is one row below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Format:
    name: str
    module: str | None  # vitkit.interop.<module>; None: handled by vitkit itself (io / export)
    reads: bool
    writes: bool
    what: str  # one line for --help and docs
    aliases: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("vitkit", None, True, True, "vitkit's own dir (config.json + model.safetensors), or a run dir"),
    Format("timm", "timm", True, True, "timm VisionTransformer state dict or hub dir (ViT, DeiT, DINOv2, CLIP, "
           "SigLIP)"),
    Format("hf", "hf", True, True, "Hugging Face transformers dir: ViT, DeiT, Dinov2[WithRegisters], DINOv3ViT, CLIP, "
           "SigLIP/SigLIP2", aliases=("huggingface", "transformers")),
    Format("torchvision", "torchvision", True, True, "torchvision vit_* state dict"),
    Format("jax", "jax", True, True, "Google .npz: vision_transformer, big_vision (ViT, SigLIP)",
           aliases=("npz", "big_vision")),
    Format("dinov2", "dinov2", True, True, "facebookresearch/dinov2 hub state dict (register_tokens, w12/w3)"),
    Format("dinov3", "dinov3", True, False, "facebookresearch/dinov3 state dict (storage_tokens, rope_embed.periods, "
           "w1/w2/w3)"),
    Format("openai_clip", "clip", True, True, "OpenAI CLIP / OpenCLIP state dict (visual.conv1, "
           "visual.transformer.resblocks...)", aliases=("open_clip", "openclip", "clip")),
    Format("onnx", None, False, True, "ONNX graph (pixel_values -> output)"),
    Format("torchscript", None, False, True, "torch.jit.trace of the eval model", aliases=("jit",)),
)}

READ_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.reads)
WRITE_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.writes)


def canonical(name: str, writing: bool = False) -> str:
    """The registered name for ``name`` or one of its aliases; ConfigError listing the choices."""
    key = str(name).lower()
    for f in FORMATS.values():
        if key == f.name or key in f.aliases:
            if (f.writes if writing else f.reads):
                return f.name
    choices = WRITE_FORMATS if writing else READ_FORMATS
    raise ConfigError(f"{'export' if writing else 'source'} format must be one of {list(choices)}, got {name!r}")


def reader(name: str) -> Callable[..., Any]:
    """``convert(path, arch, hints) -> Converted`` of a readable format (not "vitkit")."""
    f = FORMATS[canonical(name)]
    if f.module is None:
        raise ConfigError(f"format {f.name!r} is read by vitkit.io, not by a converter")
    return import_module(f"vitkit.interop.{f.module}").convert


def help_text(writing: bool = False) -> str:
    names = WRITE_FORMATS if writing else READ_FORMATS
    return "; ".join(f"{n}: {FORMATS[n].what}" for n in names)
