"""Hub ids (``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``google/vit-base-patch16-224``)
resolved with huggingface_hub into its local cache; the cache directory is then loaded like any
local directory. huggingface_hub is imported lazily. Offline (or with ``HF_HUB_OFFLINE=1``) a
clear error says what to download and where to point ``source``."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

_ID = re.compile(r"^(?:hf[-_]hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "pytorch_model.bin")


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """``"org/name[@revision]"`` (optionally ``hf-hub:`` prefixed) -> (repo_id, revision); else None."""
    m = _ID.match(source.strip())
    return (m.group(1), m.group(2)) if m else None


def looks_like_hub_id(source) -> bool:
    if not isinstance(source, str) or Path(source).exists():
        return False
    if source.startswith(("hf-hub:", "hf_hub:")):
        return True
    return parse_hub_id(source) is not None and not source.startswith((".", "/", "~")) and source.count("/") == 1


def download(source: str, cache_dir: str | None = None) -> Path:
    """Fetch the config, weights and preprocessing files of a hub repo; returns the local dir."""
    parsed = parse_hub_id(source)
    if parsed is None:
        raise CheckpointError(f"{source!r} is neither a local path nor a hub id like 'google/vit-base-patch16-224'")
    repo_id, revision = parsed
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a core dependency of the extras
        raise CheckpointError("loading hub ids needs huggingface_hub: pip install 'vitkit[hub]'") from e
    got: dict[str, Path] = {}
    errors: list[str] = []
    for name in FILES:
        if name == "pytorch_model.bin" and "model.safetensors" in got:
            continue
        try:
            got[name] = Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir))
        except Exception as e:  # EntryNotFound / offline / HTTP errors: sorted out below
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if "config.json" not in got or not ({"model.safetensors", "pytorch_model.bin"} & got.keys()):
        raise CheckpointError(
            f"{source!r} is not a local path, and cannot be fetched from the Hugging Face hub as {repo_id!r} "
            "(offline, no such repo, or no access).\n"
            f"  On a connected machine run:  huggingface-cli download {repo_id} "
            f"config.json model.safetensors preprocessor_config.json --local-dir {repo_id.split('/')[-1]}\n"
            f"  then copy that directory here and pass its path as source "
            f"(vitkit.from_pretrained('{repo_id.split('/')[-1]}')).\n  details: " + "; ".join(errors)
        )
    return got["config.json"].parent
