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
  Predictor computes ``model(x)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

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
    """Callable: preprocessed batch (B, C, H, W) -> features (B, F) float32, on the model's device."""

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
        model, never a copy of its tricks here). The Predictor computes ``model(x)``, which is the
        pooled pre-logits for a model without a classifier, so it is given a headless twin of the
        model (same config with num_classes=0, sharing every weight but the head, no copy).

        fp32: the twin computes every token in the last block too (``last_block_prefix_only =
        False``), so its output is bit-identical to ``forward_head(forward_features(x),
        pre_logits=True)`` (tested), through the Predictor's exact (buffer-reusing) walk; if the engine
        cannot run this model, the plain stage calls below run instead. bf16 / int8: the
        Predictor's approximations; other poolings and --layers need stage calls the Predictor
        does not offer: an error."""
        spec = self.spec
        default = spec.pool in ("model", "head") and spec.layers == 1
        if spec.dtype != "fp32" and not default:
            raise ConfigError(f"dtype={spec.dtype!r} runs through vitkit.infer.Predictor, which computes the "
                              f"model's own output only (pool='model' or 'head', layers=1); pool={spec.pool!r}, "
                              f"layers={spec.layers} need dtype 'fp32'")
        if not default:
            return None
        try:
            from ..infer import Predictor
        except ImportError:  # pragma: no cover - a build without vitkit.infer
            if spec.dtype != "fp32":
                raise ConfigError(f"dtype={spec.dtype!r} needs vitkit.infer, which this build lacks") from None
            return None
        if spec.pool == "head":  # model(x) itself: the Predictor's own contract (exact in fp32)
            return Predictor(self.model, dtype=spec.dtype, exact=spec.dtype == "fp32")
        twin = self._headless(exact=spec.dtype == "fp32")
        if twin is None:
            if spec.dtype != "fp32":
                raise ConfigError(f"dtype={spec.dtype!r}: cannot build the headless view of this model")
            return None
        pred = Predictor(twin, dtype=spec.dtype, exact=spec.dtype == "fp32")
        if spec.dtype == "fp32" and pred.path != "engine":
            return None  # nothing to gain: the model's own stage calls (exact) run instead
        return pred

    def _headless(self, exact: bool):
        """The model without its classifier, sharing its parameters (built on the meta device and
        given the model's own tensors), or None when that cannot be done faithfully."""
        import itertools

        m = self.model
        cfg = m.config.replace(num_classes=0) if m.config.num_classes else m.config
        try:
            with torch.device("meta"):
                twin = type(m)(cfg)
            state = {k: v for k, v in m.state_dict(keep_vars=True).items()
                     if not k.startswith(("head.", "head_dist."))}
            missing, unexpected = twin.load_state_dict(state, strict=False, assign=True)
        except (TypeError, RuntimeError, ConfigError):
            return None
        left = [n for n, t in itertools.chain(twin.named_parameters(), twin.named_buffers()) if t.is_meta]
        if missing or unexpected or left:
            return None
        twin.eval()
        if exact:
            twin.last_block_prefix_only = False  # every token through the last block, as forward_features
        return twin

    def _pool(self, m, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens after the final norm -> (B, D') by the chosen pooling."""
        pool = self.spec.pool
        if pool in ("model", "head"):
            return m.forward_head(tokens, pre_logits=pool == "model")
        R = m.num_prefix_tokens
        parts = []
        if pool in ("cls", "cls+mean"):
            parts.append(tokens[:, 0])
        if pool in ("mean", "cls+mean"):
            parts.append(tokens[:, R:].mean(dim=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        spec = self.spec
        if self._predictor is not None:
            feats = self._predictor(x)  # model(x), or the pooled pre-logits of the headless twin
        else:
            m = self.model
            if spec.layers == 1:
                feats = self._pool(m, m.forward_features(x))
            else:
                inter = m.forward_intermediates(x, spec.layers, norm=True, intermediates_only=True)
                feats = torch.cat([self._pool(m, t) for t in inter], dim=-1)
        feats = feats.float()
        if spec.normalize:
            feats = F.normalize(feats, dim=-1)
        return feats
