"""Weights in, a model out: read a source into a :class:`~vitkit.interop.common.Converted` bundle
(:func:`read_pretrained`: hub id resolved, format detected, the format's reader run on one
:class:`~vitkit.interop.source.Source`), then build the model from it (:func:`model_from_converted`, the
one place a model is built and loaded, for every format, vitkit's own included).

This module is the only part of interop that imports the model; the formats and their writers
(:mod:`vitkit.interop.formats`, :mod:`vitkit.interop.export`) do not, so ``ViT.export_to`` can
reach them without an import cycle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import ViTConfig, get_config
from ..model.vit import ViT
from ..preprocess import Preprocess
from .common import Converted, LoadReport, adapt_state, load_into
from .formats import detect, get, resolve_model_dir
from .hub import download, looks_like_hub_id
from .labels import default_labels
from .source import Source

log = logging.getLogger("vitkit.interop")


def _arch_config(arch: Any) -> ViTConfig | None:
    if arch is None or isinstance(arch, ViTConfig):
        return arch
    return get_config(arch)


def from_pretrained(source, arch: Any = None, format: str | None = None, strict: bool = True,
                    image_size=None, num_classes: int | None = None, in_channels: int | None = None,
                    device: str = "cpu", **overrides: Any) -> ViT:
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
    src_name = str(source)
    hub_id = None
    if looks_like_hub_id(src_name):
        hub_id = src_name
        source = download(src_name)
        log.info("hub id %s resolved to %s", src_name, source)
    src = Source.of(source)  # a Source handed on keeps what was read of it already
    fmt = get(format) if format else detect(src)
    if fmt.name == "vitkit":
        src = Source(resolve_model_dir(src.path))  # a directory that is not vitkit's: say whose it is
    conv = fmt.read(src, _arch_config(arch), hints)
    conv.source = src_name  # what the user named (a hub id stays a hub id in the report)
    if hub_id is not None:
        conv.info = {**conv.info, "hub_id": hub_id}
    return conv


def model_from_converted(conv: Converted, adapt: dict[str, Any] | None = None, strict: bool = True,
                         device: str | Any = "cpu", **overrides: Any) -> ViT:
    """The one place a model is built from a bundle of :func:`read_pretrained` and loaded, for every
    format (vitkit's own included): ``overrides`` (ViTConfig fields) applied to its config, the
    tensors adapted to ``adapt`` (image_size / num_classes / in_channels), the ViT built once, every
    tensor copied through the strict name-and-shape check (:func:`load_into`), preprocessing, labels
    and ``pretrained_info`` (with the load report) attached. Weights come in by two verbs:
    :func:`read_pretrained` (a source -> a bundle) and this (a bundle -> a model)."""
    if overrides:
        conv.config = conv.config.replace(**overrides)
    adapt = adapt or {}
    src = conv.source
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
        elif target.dynamic_img_size:  # facebook/dinov2-*: table for 518, processor crop 224
            report.notes.append(f"input size {pre.input_size[1]}x{pre.input_size[2]} from the checkpoint's "
                                f"preprocessing (position table for {target.image_hw[0]}x{target.image_hw[1]}, "
                                f"resampled to each input's grid as {target.pos_resample} does)")
    model.preprocess_cfg = pre
    labels = conv.labels if conv.labels and len(conv.labels) == target.num_classes else None
    if labels is None and target.num_classes == conv.config.num_classes:
        labels = default_labels(target.num_classes) if fmt != "vitkit" else None
    model.labels = labels
    saved, found = (conv.info, {}) if fmt == "vitkit" else ({}, conv.info)  # vitkit: the saved info, updated
    model.pretrained_info = {**saved, "format": fmt, "source": src, **found,
                             "report": report.to_dict()}
    model.load_report = report
    return model.to(device).eval()


def load_model(directory: str | Path, device: str | Any = "cpu", strict: bool = True, **overrides: Any) -> ViT:
    """Rebuild a :class:`vitkit.ViT` from a directory written by ``model.save_pretrained`` (bit-exact).

    ``directory``: the model directory, its model.safetensors, or a training run (its ``best/``,
    else ``last/``). ``overrides`` change config fields (a changed ``num_classes`` then mis-shapes
    the head: a CheckpointError, or with ``strict=False`` a fresh head and everything else loaded);
    ``image_size=`` loads at the saved size and resamples the learned position table (sin/cos
    recomputed), as ``model.set_image_size``. Loads through the same strict name-and-shape
    check as every other format (:func:`model_from_converted`)."""
    conv = get("vitkit").read(Source(resolve_model_dir(directory)), None, None)
    new_size = overrides.pop("image_size", None)
    adapt = {"image_size": new_size} if new_size is not None else {}
    return model_from_converted(conv, adapt=adapt, strict=strict, device=device, **overrides)
