"""The one registry of weight formats: :data:`REGISTRY`, an ordered tuple of the
:class:`~vitkit.interop.source.Format` objects the format modules export.

Detection, reading (:func:`vitkit.from_pretrained`), export (:func:`vitkit.export_to`) and every
list of format names (``from_pretrained(format=)``, the CLI's ``--format`` choices and help,
``vitkit models --families``) iterate it. Adding a format is one module that exports ``FORMAT``
plus one line below (docs/architecture.md shows the steps).

The order is the detection order: the first format that recognises a source wins, so a more
specific layout comes before a more general one (DINOv3's original state dict has a mask token as
DINOv2's does; both have timm's key names).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..io import CONFIG_NAME, WEIGHTS_NAME
from . import aimv2, clip, dinov2, dinov3, graph, hf, jax, originals, timm, torchvision, vitkit_format
from .source import Format, Source

REGISTRY: tuple[Format, ...] = (
    vitkit_format.FORMAT,
    torchvision.FORMAT,
    originals.PE_FORMAT,  # perception_models: OpenAI CLIP's names + PE's pool / layer scale, before openai_clip
    clip.FORMAT,  # openai_clip
    originals.EVA02_FORMAT,  # baai_eva: mlp.w3 with q_bias, before DINOv2's w12 / w3
    dinov3.FORMAT,
    dinov2.FORMAT,
    aimv2.FORMAT,  # ml_aim
    timm.FORMAT,
    hf.FORMAT,
    jax.FORMAT,
    graph.ONNX,
    graph.TORCHSCRIPT,
)
READ_FORMATS: tuple[str, ...] = tuple(f.name for f in REGISTRY if f.reads)
WRITE_FORMATS: tuple[str, ...] = tuple(f.name for f in REGISTRY if f.writes)


def get(name: str, writing: bool = False) -> Format:
    """The format called ``name`` (or one of its aliases) that reads (writes); ConfigError listing
    the choices."""
    key = str(name).lower()
    for f in REGISTRY:
        if (key == f.name or key in f.aliases) and (f.writes if writing else f.reads):
            return f
    choices = WRITE_FORMATS if writing else READ_FORMATS
    raise ConfigError(f"{'export' if writing else 'source'} format must be one of {list(choices)}, got {name!r}")


def canonical(name: str, writing: bool = False) -> str:
    """The registered name for ``name`` or one of its aliases; ConfigError listing the choices."""
    return get(name, writing).name


def help_text(writing: bool = False) -> str:
    return "; ".join(f"{f.name}: {f.what}" for f in REGISTRY if (f.writes if writing else f.reads))


def detect(source: Source | str | Path) -> Format:
    """The format of a local file or directory, from its files and keys (never guessed). The
    :class:`Source` keeps what detection read (a file's tensors, a directory's config.json) for
    the reader."""
    src = Source.of(source)
    p = src.path
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        for f in REGISTRY:
            if f.detect_dir is not None and f.detect_dir(src):
                return f
        problem = config_json_problem(p)  # a malformed config.json, not an unknown format
        if problem:
            raise CheckpointError(problem)
        raise CheckpointError(
            f"{p}: cannot tell the checkpoint format: expected a directory of one of these: " + "; ".join(
                f"{f.name}: {f.what}" for f in REGISTRY if f.detect_dir is not None))
    if p.name in ("config.json", "model.safetensors", "pytorch_model.bin") and p.parent != p:
        try:
            return detect(p.parent)
        except CheckpointError:
            pass
    for f in REGISTRY:  # by content (a .npz); a contradicting extension is an error
        if f.detect_file is not None and f.detect_file(src):
            return f
    keys = src.keys()
    for f in REGISTRY:
        if f.detect_keys is not None and f.detect_keys(keys):
            return f
    raise CheckpointError(f"{p}: cannot tell the checkpoint format from its {len(keys)} tensor names "
                          f"(first: {keys[:4]}); pass format= one of {READ_FORMATS}")


def detect_format(path: str | Path) -> str:
    """The name of the format of a local file or directory (:func:`detect`)."""
    return detect(path).name


def config_json_problem(directory: str | Path) -> str | None:
    """Why ``directory/config.json`` (or that of its best/ or last/) cannot be parsed, naming the
    file and the JSON error; None when each present one parses (or there is none)."""
    import json

    for d in (Path(directory), Path(directory) / "best", Path(directory) / "last"):
        cfg = d / CONFIG_NAME
        if cfg.is_file():
            try:
                json.loads(cfg.read_text())
            except UnicodeDecodeError as e:
                return f"{cfg} is not a text file ({e.reason} at byte {e.start})"
            except ValueError as e:
                return f"{cfg} is not valid JSON: {e}"
            except OSError as e:
                return f"cannot read {cfg}: {e.strerror or e}"
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """A vitkit model directory from: the directory itself, its model.safetensors, or a training
    run directory (its ``best/``, else ``last/``). Raises CheckpointError saying what was found."""
    found = vitkit_format.model_dir(path)
    if found is not None:
        return found
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    problem = config_json_problem(p)
    if problem:
        raise CheckpointError(problem)
    if (p / CONFIG_NAME).is_file():  # someone else's checkpoint dir: say whose, and what reads it
        try:
            what = f"a {detect(p).what}"
        except CheckpointError:
            what = "no checkpoint format vitkit knows"
        raise CheckpointError(f"{p} is not a vitkit model directory: its {CONFIG_NAME} has no \"format\": \"vitkit\" "
                              f"key ({what}); vitkit.from_pretrained reads it, as every vitkit command does")
    raise CheckpointError(f"{p} is neither a vitkit model directory (config.json + model.safetensors) "
                          "nor a training run (with best/ or last/)")
