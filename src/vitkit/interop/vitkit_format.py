"""vitkit's own format, read like every other: a directory with ``config.json`` (``"format":
"vitkit"``, the ViTConfig, preprocessing, labels, pretrained_info) and ``model.safetensors``, or a
training run directory (its ``best/``, else ``last/``). Written by :func:`vitkit.io.save_pretrained`
(``model.save_pretrained``); read here into a :class:`~vitkit.interop.common.Converted` bundle, which
the one strict loader (:func:`vitkit.interop.load.model_from_converted`) builds, as for any format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from ..io import CONFIG_NAME, WEIGHTS_NAME, is_vitkit_dir, save_pretrained
from .common import Converted
from .source import Format, Source


def model_dir(path: str | Path) -> Path | None:
    """The vitkit model directory ``path`` names: the directory itself, the directory of its
    config.json / model.safetensors, or a training run's ``best/`` (else ``last/``); None if none."""
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    for d in (p, p / "best", p / "last"):
        if is_vitkit_dir(d):
            return d
    return None


def read_meta(directory: str | Path, src: Source | None = None) -> dict[str, Any]:
    """The checked ``config.json`` of a vitkit directory (read through ``src`` when given)."""
    cfg = Path(directory) / CONFIG_NAME
    try:
        meta = src.json(cfg) if src is not None else json.loads(cfg.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}") from e
    except ValueError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e
    if meta.get("format") != "vitkit" or "config" not in meta:
        raise CheckpointError(f"{cfg} is not a vitkit config (expected 'format': 'vitkit' and a 'config' entry)")
    labels, n = meta.get("labels"), (meta["config"] or {}).get("num_classes") if isinstance(meta["config"], dict) else None
    if labels is not None and (not isinstance(labels, list) or (isinstance(n, int) and n > 0 and len(labels) != n)):
        got = f"{len(labels)} names" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise CheckpointError(f"{cfg}: field 'labels' has {got} but config.num_classes is {n}; "
                              "fix or remove the list (one name per output)")
    return meta


def read(path: Source | str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A vitkit model directory (or run directory) as a bundle: config, tensors, preprocessing,
    labels and the saved ``pretrained_info``, no model built. ``arch`` / ``hints`` are unused: the
    directory says everything (``vitkit.load_model``'s overrides change the config after)."""
    from ..preprocess import Preprocess

    src = Source.of(path)
    directory = model_dir(src.path)
    if directory is None:
        raise CheckpointError(f"{src.path} is neither a vitkit model directory (config.json + model.safetensors) "
                              "nor a training run (with best/ or last/)")
    meta = read_meta(directory, src)
    where = directory / CONFIG_NAME
    try:
        config = ViTConfig.from_dict(meta["config"])
        pre = Preprocess.coerce(meta.get("preprocess"), where=str(where))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}" if str(where) not in str(e) else str(e)) from e
    state = src.tensors(directory / WEIGHTS_NAME)
    info = meta.get("pretrained_info") or {}
    if info.get("pos_resample") and "pos_resample" not in meta["config"]:
        # saved before ViTConfig.pos_resample: the source's resampling was kept in pretrained_info
        config = config.replace(pos_resample=str(info["pos_resample"]))
    return Converted(config=config, state=state, format="vitkit", source=str(directory), preprocess=pre,
                     labels=meta.get("labels"),
                     info={k: v for k, v in info.items() if k not in ("report", "pos_resample")})


def write(model, path: str | Path) -> Path:
    return save_pretrained(model, path)


FORMAT = Format(
    "vitkit", "vitkit's own dir (config.json + model.safetensors), or a run dir", read=read, write=write,
    writes_dir=True, writes_rope=True, detect_dir=lambda src: model_dir(src.path) is not None,
    tiny=dict(image_size=(32, 48), patch_size=16, num_classes=5, rope="none", layer_scale=1e-5, num_registers=2),
)
