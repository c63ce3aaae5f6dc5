"""Hand a model back: ``export_to(model, format, path)`` writes it in any format of the registry
(:mod:`vitkit.interop.formats`) that writes: vitkit's own directory, a timm hub-style directory, a
transformers directory for the model's family, a torchvision / DINOv2-hub / OpenAI-CLIP state dict,
a JAX ``.npz``, an ONNX graph or a TorchScript file. Each format's writer lives in its module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .formats import WRITE_FORMATS as EXPORT_FORMATS  # the one registry
from .formats import get

log = logging.getLogger("vitkit.interop")
__all__ = ["export_to", "EXPORT_FORMATS"]


def export_to(model, format: str, path: str | Path, **options: Any) -> Path:
    """Write ``model`` in ``format`` to ``path`` (a directory for vitkit/timm/hf, a file else).
    ``options`` the format takes (jax: ``layout``; onnx: ``opset``, ``dynamic_batch``) are passed
    on; others are ignored."""
    fmt = get(format, writing=True)
    if getattr(getattr(model, "config", None), "rope", "none") != "none" and not fmt.writes_rope:
        *rest, last = [n for n in EXPORT_FORMATS if get(n, writing=True).writes_rope]
        raise ConfigError(f"this model uses rotary position embedding (rope={model.config.rope!r}, DINOv3), which the "
                          f"{fmt.name} layout vitkit writes has no place for; export to {', '.join(rest)} or {last}")
    was_training = model.training
    model.eval()
    try:
        out = fmt.write(model, path, **{k: v for k, v in options.items() if k in fmt.options})
    finally:
        model.train(was_training)
    log.info("exported %s model to %s", fmt.name, out)
    return Path(out)
