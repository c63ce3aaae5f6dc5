"""Feature vectors from a model's public stages: the one place that decides what an "embedding" is.

``FeatureExtractor(model, FeatureSpec(pool, layers, normalize, dtype))(x)`` maps a preprocessed
batch (B, C, H, W) to (B, F) float32:

* ``pool="model"`` (default): the model's own pooled output,
  ``model.forward_head(model.forward_features(x), pre_logits=True)`` (class token or mean,
  fc_norm, pre-logits layer: whatever the weights define).
* ``"head"``: what the model returns, ``model(x)``, its head included: for CLIP the image embedding
  in the joint image-text space (after ``visual.proj``), for a classifier its logits, for a
  headless model the same as ``"model"``. One layer only.
* ``"cls"``: the class token after the final norm (DINOv2's ``x_norm_clstoken``).
* ``"mean"``: the mean of the patch tokens after the final norm (prefix tokens excluded).
* ``"cls+mean"``: both, concatenated (2D), as DINOv2's linear evaluation uses.
* ``layers=n``: the same pooling applied to each of the last n blocks' outputs (each after the
  final norm, via ``forward_intermediates``), concatenated in block order (n x the width).
* ``normalize``: L2-normalise the final (concatenated) vector.
* ``dtype``: ``fp32`` is exact (the default pooling runs through ``vitkit.infer.Predictor``'s
  buffer-reusing engine, bit-identical to the stage calls; the others call the stages);
  ``bf16`` / ``int8`` are the Predictor's approximations (default pooling, one layer only: the
  Predictor computes ``model(x)`` or the pooled pre-logits, not the other poolings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..infer import Predictor
from ..model.naflex import NaFlexBatch

POOLS = ("model", "head", "cls", "mean", "cls+mean")
DTYPES = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class FeatureSpec:
    pool: str = "model"  # model | head | cls | mean | cls+mean (see the module docstring)
    layers: int = 1  # last n blocks, concatenated
    normalize: bool = False  # L2 over the final vector
    dtype: str = "fp32"  # fp32 (exact) | bf16 | int8 (vitkit.infer.Predictor)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"layers must be an integer >= 1 (the last n blocks), got {self.layers!r}")
        if self.pool == "head" and self.layers != 1:
            raise ConfigError(f"pool='head' is the model's output (its head applies to the last block only); "
                              f"layers={self.layers} needs another pooling (model, cls, mean, cls+mean)")

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureExtractor:
    """Callable: preprocessed batch (B, C, H, W) (or a NaFlexBatch) -> features (B, F) float32, on
    the model's device."""

    def __init__(self, model, spec: FeatureSpec | None = None) -> None:
        self.model = model.eval()
        self.spec = spec or FeatureSpec()
        depth = len(model.blocks)
        if self.spec.layers > depth:
            raise ConfigError(f"layers={self.spec.layers}: the model has only {depth} blocks")
        if self.spec.pool in ("cls", "cls+mean") and not model.config.class_token:
            raise ConfigError(f"pool={self.spec.pool!r} needs a class token; this model has none (use mean)")
        self._predictor = self._make_predictor()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _make_predictor(self):
        """The default pooling runs through ``vitkit.infer.Predictor`` (the fast path beside the
        model, never a copy of its tricks here): ``output="pooled"`` for "model", ``model(x)``
        for "head"; fp32 takes its exact walk, bit-identical to the stage calls (tested).
        bf16 / int8: the Predictor's approximations; other poolings and --layers need stage
        calls the Predictor does not offer: an error."""
        spec = self.spec
        default = spec.pool in ("model", "head") and spec.layers == 1
        if spec.dtype != "fp32" and not default:
            raise ConfigError(f"dtype={spec.dtype!r} runs through vitkit.infer.Predictor, which computes the "
                              f"model's own output only (pool='model' or 'head', layers=1); pool={spec.pool!r}, "
                              f"layers={spec.layers} need dtype 'fp32'")
        if not default:
            return None
        return Predictor(self.model, dtype=spec.dtype, exact=spec.dtype == "fp32",
                         output="logits" if spec.pool == "head" else "pooled")

    def _pool(self, m, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) tokens after the final norm -> (B, D') by the chosen pooling (``valid``: a
        NaFlexBatch's real patches)."""
        if self.spec.pool == "model":
            return m.forward_head(tokens, pre_logits=True, valid=valid)
        # "cls", "mean" or both: the model's own token pooling (no fc_norm: DINOv2's x_norm_clstoken)
        parts = [m.pool_tokens(tokens, how, valid) for how in self.spec.pool.split("+")]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        spec = self.spec
        if self._predictor is not None:
            feats = self._predictor(x)  # model(x), or the pooled pre-logits
        else:
            m = self.model
            valid = x.mask if isinstance(x, NaFlexBatch) else None
            if spec.layers == 1:
                feats = self._pool(m, m.forward_features(x), valid)
            else:
                inter = m.forward_intermediates(x, spec.layers, norm=True, intermediates_only=True)
                feats = torch.cat([self._pool(m, t, valid) for t in inter], dim=-1)
        feats = feats.float()
        if spec.normalize:
            feats = F.normalize(feats, dim=-1)
        return feats
