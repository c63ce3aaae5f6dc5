"""Load and save ViT weights from and to the formats people have: vitkit's own, timm, Hugging
Face transformers, torchvision, Google's JAX ``.npz`` (vision_transformer and big_vision), the
original DINOv2 and OpenAI / OpenCLIP state dicts, and hub ids; for the ViT family (DeiT,
DINOv2, CLIP, SigLIP: see :mod:`vitkit.interop.families`). Format names: :mod:`.formats`. One entry point, :func:`from_pretrained`, which detects the format, says what it found,
builds the model from the checkpoint's own config (or from its tensor shapes), loads every tensor
through a strict name-and-shape check, and attaches preprocessing and labels.

    model = vitkit.from_pretrained("vit_base_patch16_224.pth")          # timm state dict
    model = vitkit.from_pretrained("google/vit-base-patch16-224")       # hub id (cached)
    model = vitkit.from_pretrained("ckpt.npz", image_size=384)          # JAX, pos table resampled
    model.export_to("onnx", "vit.onnx")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import ViTConfig, get_config
from ..errors import CheckpointError, ConfigError
from .common import Converted, LoadReport, adapt_state, check_extension, load_into, read_state_dict
from .formats import READ_FORMATS, canonical, reader

log = logging.getLogger("vitkit.interop")

FORMATS = READ_FORMATS  # the registry (vitkit.interop.formats) is the one list of format names
_ADAPT = ("image_size", "num_classes", "in_channels")


def detect_format(path: str | Path) -> str:
    """Name the format of a local file or directory from its files and keys (never guesses)."""
    from ..io import config_json_problem, is_vitkit_dir
    from . import clip, dinov2, dinov3, hf, jax, timm, torchvision

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        if is_vitkit_dir(p) or is_vitkit_dir(p / "best") or is_vitkit_dir(p / "last"):
            return "vitkit"
        if timm.is_timm_dir(p):
            return "timm"
        if hf.is_hf_dir(p):
            return "hf"
        problem = config_json_problem(p)  # a malformed config.json, not an unknown format
        if problem:
            raise CheckpointError(problem)
        raise CheckpointError(
            f"{p}: cannot tell the checkpoint format: expected a vitkit dir (config.json with format 'vitkit'), "
            "a run dir with best/ or last/, a timm hub dir (config.json with 'architecture' and "
            f"'pretrained_cfg') or a Hugging Face dir (config.json with model_type one of {list(hf.MODEL_TYPES)})"
        )
    if p.name in ("config.json", "model.safetensors", "pytorch_model.bin") and p.parent != p:
        try:
            return detect_format(p.parent)
        except CheckpointError:
            pass
    if check_extension(p) == "numpy" or p.suffix == ".npz":  # by content; a contradicting extension is an error
        return "jax"
    keys = list(read_state_dict(p))
    if torchvision.looks_like_torchvision(keys):
        return "torchvision"
    if clip.looks_like_openai_clip(keys):
        return "openai_clip"
    if dinov3.looks_like_dinov3(keys):  # before DINOv2's check: the original DINOv3 has a mask token too
        return "dinov3"
    if dinov2.looks_like_dinov2(keys):
        return "dinov2"
    if timm.looks_like_timm(keys):
        return "timm"
    if hf.looks_like_hf(keys):
        return "hf"
    if jax.looks_like_jax(keys):
        return "jax"
    raise CheckpointError(f"{p}: cannot tell the checkpoint format from its {len(keys)} tensor names "
                          f"(first: {keys[:4]}); pass format= one of {FORMATS}")


def _arch_config(arch: Any) -> ViTConfig | None:
    if arch is None or isinstance(arch, ViTConfig):
        return arch
    return get_config(arch)


def convert_source(source: str | Path, format: str | None = None, arch: Any = None,
                   hints: dict[str, Any] | None = None) -> Converted:
    """Read any non-vitkit source into a :class:`~vitkit.interop.common.Converted` bundle."""
    fmt = canonical(format) if format else detect_format(source)
    if fmt == "vitkit":
        raise ConfigError("a vitkit checkpoint needs no conversion; load it with vitkit.load_model")
    p = Path(source)
    if fmt == "hf" and p.is_file() and p.suffix != ".json":
        if not (p.parent / "config.json").is_file():
            raise CheckpointError(f"{p}: a Hugging Face weight file needs its config.json next to it")
    return reader(fmt)(source, _arch_config(arch), hints)


def from_pretrained(source, arch: Any = None, format: str | None = None, strict: bool = True,
                    image_size=None, num_classes: int | None = None, in_channels: int | None = None,
                    device: str = "cpu", **overrides: Any):
    """Load a :class:`vitkit.ViT` from any supported source.

    Args:
        source: a vitkit model dir / run dir / its model.safetensors; a timm state dict
            (.safetensors, .pth, .bin) or timm hub dir; a Hugging Face ViT dir; a torchvision
            state dict; a JAX ``.npz``; or a hub id (``google/vit-base-patch16-224``).
        arch: preset name or ViTConfig for what the weights cannot tell (number of heads,
            non-square grid). Shapes always win over ``arch`` for what they do tell.
        format: force one of :data:`vitkit.interop.formats.READ_FORMATS` (default: detect).
        strict: raise CheckpointError listing missing / unexpected / mis-shaped tensors.
        image_size: the checkpoint's size when its table is a non-square grid, else a resolution to
            load at (the position table is resampled as the source implementation does it).
        num_classes: another class count (the head is re-initialised; a warning says so).
        in_channels: 1 for grey input from an RGB checkpoint (patch kernels summed over RGB).
        **overrides: other ViTConfig fields (num_heads, act, norm_eps, drop_path, dropout...).

    The returned model (eval mode) carries ``pretrained_info`` (format, source, load report),
    ``preprocess_cfg`` and ``labels``.
    """
    adapt = {k: v for k, v in (("image_size", image_size), ("num_classes", num_classes),
                               ("in_channels", in_channels)) if v is not None}
    conv = read_pretrained(source, arch=arch, format=format, **overrides, **adapt)
    return model_from_converted(conv, adapt=adapt, strict=strict, device=device, **overrides)


def read_pretrained(source, arch: Any = None, format: str | None = None, **hints: Any) -> Converted:
    """Read a source (hub id, directory or file, any supported format) into a
    :class:`~vitkit.interop.common.Converted` bundle: the tensors in vitkit's names and the config
    they imply, no model built. ``hints``: what the reader may need (``num_heads``, ``act``, a size
    for a non-square grid). ``from_pretrained`` is this followed by :func:`model_from_converted`; a
    caller that needs the config before deciding how to load (the trainer reads the input size)
    reads once and loads from the bundle."""
    from ..io import read_converted
    from .hub import download, looks_like_hub_id

    src = str(source)
    hub_id = None
    if looks_like_hub_id(src):
        hub_id = src
        source = download(src)
        log.info("hub id %s resolved to %s", src, source)
    fmt = canonical(format) if format else detect_format(source)
    conv = read_converted(source) if fmt == "vitkit" else convert_source(source, fmt, arch, hints=hints)
    conv.source = src  # what the user named (a hub id stays a hub id in the report)
    if hub_id is not None:
        conv.info = {**conv.info, "hub_id": hub_id}
    return conv


def model_from_converted(conv: Converted, adapt: dict[str, Any] | None = None, strict: bool = True,
                    device: str | Any = "cpu", **overrides: Any):
    """A model from a bundle of :func:`read_pretrained`: ``overrides`` (ViTConfig fields) applied to
    its config, then :func:`load_converted` with ``adapt`` (image_size / num_classes / in_channels)."""
    if overrides:
        conv.config = conv.config.replace(**overrides)
    return load_converted(conv, adapt=adapt, strict=strict, device=device)


def load_converted(conv: Converted, adapt: dict[str, Any] | None = None, strict: bool = True,
                   device: str | Any = "cpu", source: str | None = None, info: dict[str, Any] | None = None):
    """The one place a model is built and loaded, for every format (vitkit's own included):
    adapt the tensors to ``adapt`` (image_size / num_classes / in_channels), build the ViT once,
    copy every tensor through the strict name-and-shape check (:func:`load_into`), attach
    preprocessing, labels and ``pretrained_info`` (with the load report)."""
    from ..model.vit import ViT
    from ..preprocess import Preprocess
    from .labels import default_labels

    adapt = adapt or {}
    src = source or conv.source
    fmt = conv.format
    report = LoadReport(source=src, format=fmt, notes=list(conv.notes))
    report.unexpected.extend(conv.unexpected)
    target = conv.config.replace(**adapt) if adapt else conv.config
    state, skip = adapt_state(conv.state, conv.config, target, report.notes)
    model = ViT(target)
    load_into(model, state, report, strict=strict, skip_missing=skip)
    log.info("loaded %s checkpoint %s: %d tensors%s", fmt, src, report.loaded,
             "" if report.ok else f" (NOT strict-clean: {report})")
    for note in report.notes:
        log.info("%s: %s", src, note)

    pre = Preprocess.coerce(conv.preprocess, where=src)
    if pre is not None and (target.in_channels, *target.image_hw) != pre.input_size:
        if (target.in_channels, target.image_hw) != (conv.config.in_channels, conv.config.image_hw):
            pre = pre.for_input(target.in_channels, target.image_hw)  # the model was resized here
    model.preprocess_cfg = pre
    labels = conv.labels if conv.labels and len(conv.labels) == target.num_classes else None
    if labels is None and target.num_classes == conv.config.num_classes:
        labels = default_labels(target.num_classes) if fmt != "vitkit" else None
    model.labels = labels
    saved, found = (conv.info, {}) if fmt == "vitkit" else ({}, conv.info)  # vitkit: the saved info, updated
    model.pretrained_info = {**saved, "format": fmt, "source": src, **(info or {}), **found,
                             "report": report.to_dict()}
    model.load_report = report
    return model.to(device).eval()


def export_to(model, format: str, path, **kw: Any):
    from .export import export_to as _export

    return _export(model, format, path, **kw)


__all__ = ["from_pretrained", "load_converted", "detect_format", "convert_source", "export_to", "LoadReport",
           "FORMATS"]
