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


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that fetches what vitkit needs, for the installed huggingface_hub: its CLI
    is ``hf`` since 0.34 (``huggingface-cli`` was removed in 1.0)."""
    try:
        from huggingface_hub import __version__ as v

        major, minor = (int(x) for x in re.findall(r"\d+", v)[:2])
        cli = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    except Exception:  # not installed / odd version string: the current name
        cli = "hf"
    rev = f" --revision {revision}" if revision else ""
    return (f"{cli} download {repo_id} config.json model.safetensors preprocessor_config.json{rev} "
            f"--local-dir {repo_id.split('/')[-1]}")


def _offline() -> bool:
    import os

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unreachable(timeout: float) -> str | None:
    """Why the hub cannot be reached (one TCP connect, ``timeout`` seconds), or None.

    huggingface_hub retries a failed lookup with back-off (about 24 s per file, 95 s for a model),
    so vitkit checks once before asking it. Behind a proxy the direct connect proves nothing: skip."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        url = urlparse("https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e.strerror or type(e).__name__})"
    return None


def download(source: str, cache_dir: str | None = None, *, connect_timeout: float = 3.0) -> Path:
    """Fetch the config, weights and preprocessing files of a hub repo; returns the local dir.

    The local cache is tried first (no network at all when the files are there). Offline
    (``HF_HUB_OFFLINE=1``) or when the hub does not answer within ``connect_timeout`` seconds this
    fails at once, naming the download command for the installed huggingface_hub."""
    parsed = parse_hub_id(source)
    if parsed is None:
        raise CheckpointError(f"{source!r} is neither a local path nor a hub id like 'google/vit-base-patch16-224'")
    repo_id, revision = parsed
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a core dependency of the extras
        raise CheckpointError("loading hub ids needs huggingface_hub: pip install 'vitkit[hub]'") from e

    def complete(got: dict[str, Path]) -> bool:
        return "config.json" in got and bool({"model.safetensors", "pytorch_model.bin"} & got.keys())

    def fetch(local_only: bool) -> tuple[dict[str, Path], list[str]]:
        got: dict[str, Path] = {}
        errors: list[str] = []
        for name in FILES:
            if name == "pytorch_model.bin" and "model.safetensors" in got:
                continue
            try:
                got[name] = Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                                 local_files_only=local_only))
            except Exception as e:  # EntryNotFound / offline / HTTP errors: sorted out below
                errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if not local_only and name == "config.json" and type(e).__name__ == "LocalEntryNotFoundError":
                    break  # the hub did not answer: the other files would each wait through the same retries
        return got, errors

    got, errors = fetch(local_only=True)
    if complete(got):
        return got["config.json"].parent
    why = "HF_HUB_OFFLINE is set" if _offline() else _unreachable(connect_timeout)
    if why is None:
        got, errors = fetch(local_only=False)
        if complete(got):
            return got["config.json"].parent
        why = "; ".join(errors)
    raise CheckpointError(
        f"{source!r} is not a local path, is not in the Hugging Face cache, and cannot be fetched from the hub "
        f"as {repo_id!r}: {why}.\n"
        f"  On a connected machine run:  {download_command(repo_id, revision)}\n"
        f"  then copy that directory here and pass its path as source "
        f"(vitkit predict --model {repo_id.split('/')[-1]} ..., vitkit.from_pretrained('{repo_id.split('/')[-1]}'))."
    )
