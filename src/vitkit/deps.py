"""Optional dependencies, imported only where a feature needs them (webdataset, datasets,
pyarrow, faiss): the one helper that imports one or says which vitkit extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

_PIP_NAMES = {"faiss": "faiss-cpu"}  # where the pip distribution is named otherwise than the module


def require(module: str, what: str, extra: str) -> ModuleType:
    """Import ``module`` for ``what`` (a feature, as the user asked for it), or raise a ConfigError
    naming the package and the vitkit ``extra`` (pyproject's optional-dependencies) that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ConfigError(f"{what} needs {_PIP_NAMES.get(top, top)}, which is not installed: "
                          f"pip install 'vitkit[{extra}]' ({e})") from e
