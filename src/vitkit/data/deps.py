"""Optional dependencies of the data path, imported only when a format needs them."""

from __future__ import annotations

import importlib

from ..errors import ConfigError


def require(module: str, what: str):
    """Import ``module`` or raise a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} needs the {module.split('.')[0]!r} package: pip install 'vitkit[data]' "
                          f"({e})") from e
