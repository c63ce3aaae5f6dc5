"""Optional dependencies of vitkit.features (the ``vitkit[features]`` extra)."""

from __future__ import annotations

import importlib

from ..errors import ConfigError


def require(module: str, what: str):
    """Import ``module`` or raise a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip_name = {"pyarrow": "pyarrow", "faiss": "faiss-cpu"}.get(module.split(".")[0], module)
        raise ConfigError(f"{what} needs {pip_name}, which is not installed: pip install 'vitkit[features]' "
                          f"({e})") from e
