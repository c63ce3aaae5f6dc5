"""ViTConfig, the one description of a ViT, and the preset table.

One module on purpose (~500 lines): ViTConfig, the presets built from it and TextConfig (which
shares the activation table) are what every layer imports as ``vitkit.config``; the presets cannot
move out while config re-exports them (a cycle), so a split means changing every importer.

Everything that builds a model (``ViT(config)``, ``create_model``, the weight loaders, the
trainer) goes through :class:`ViTConfig`. It round-trips through JSON (``to_dict`` /
``from_dict``), and is saved next to every checkpoint so a model can be rebuilt from its files.

Presets are data, not functions: :data:`VARIANTS` maps a width name to (dim, depth, heads,
mlp_dim) as in the paper (Dosovitskiy et al. 2021, Table 1; Ti and S from DeiT, Touvron et al.
2021), the same table big_vision's ``decode_variant`` uses. :data:`PRESETS` crosses it with the
patch sizes and resolutions that exist in the wild, named like timm (``vit_base_patch16_224``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ActivationNames:
    """What the weight sources call one vitkit activation; the first name of each is the one
    export writes, an empty tuple means the source has none."""

    hf: tuple[str, ...]  # transformers' ``hidden_act``
    timm: tuple[str, ...]  # timm's ``act_layer``


# The one table of activations: vitkit's name -> the sources' names (the modules themselves are
# built by vitkit.model.block.make_act; the readers and writers of vitkit.interop look names up
# here). "gelu" is the exact (erf) GELU, "gelu_tanh" the tanh approximation (JAX's nn.gelu
# default; transformers' gelu_new / gelu_fast compute the same formula), "quick_gelu" CLIP's
# x * sigmoid(1.702 x).
ACTIVATION_NAMES: dict[str, ActivationNames] = {
    "gelu": ActivationNames(hf=("gelu",), timm=("gelu",)),
    "gelu_tanh": ActivationNames(hf=("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), timm=("gelu_tanh",)),
    "relu": ActivationNames(hf=("relu",), timm=("relu",)),
    "quick_gelu": ActivationNames(hf=("quick_gelu",), timm=("quick_gelu",)),
    "silu": ActivationNames(hf=("silu", "swish"), timm=("silu", "swish")),
    "tanh": ActivationNames(hf=("tanh",), timm=("tanh",)),
    "identity": ActivationNames(hf=(), timm=()),
}
ACTIVATIONS = tuple(ACTIVATION_NAMES)
# sincos2d: big_vision's table; sincos2d_mae: MAE's get_2d_sincos_pos_embed (AIMv2-native), frequencies over D/4
POS_EMBEDS = ("learned", "sincos1d", "sincos2d", "sincos2d_mae", "none")
POOLINGS = ("cls", "mean", "map")
NORM_LAYERS = ("layernorm", "rmsnorm")
MLP_LAYERS = ("mlp", "swiglu")
TASKS = ("classification", "regression")
PATCH_EMBEDS = ("conv", "unfold", "rearrange")
# how a learned position table is resampled to another grid, named after the implementation it
# reproduces (functions in vitkit.model.pos_embed.POS_RESAMPLERS)
POS_RESAMPLES = ("timm", "hf", "hf_dinov2_registers", "dinov2", "big_vision", "torchvision", "vit_jax")
# rotary position embeddings (vitkit.model.rope): dinov3 = patch centres in [-1, 1], rotate-half pairs;
# axial = timm RotaryEmbeddingCat (EVA-02, Perception Encoder, RoPE-ViT axial): integer patch indices
# (+ rope_grid_offset, rescaled to rope_ref_grid), interleaved pairs; mixed = RoPE-Mixed (Heo et al. 2024):
# learned per-block, per-head frequencies (the parameter rope.freqs), interleaved pairs
ROPES = ("none", "dinov3", "axial", "mixed")
ROPE_INDEXINGS = ("ij", "xy")
# the attention-pooling head of pooling="map": "latent" = timm AttentionPoolLatent / big_vision MAPHead (q
# projection of a learned probe, kv, proj, then x + mlp(norm(x))); "aimv2" = AIMv2's AttentionPoolingClassifier
# (the probe is the query itself, k/v with the blocks' qkv_bias, an output projection, no norm or MLP)
MAP_HEADS = ("latent", "aimv2")


def to_2tuple(value: Any, name: str) -> tuple[int, int]:
    """``16 -> (16, 16)``; ``(16, 20) -> (16, 20)``; anything else is a ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ConfigError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return pair


def _choice(value: str, options: tuple[str, ...], name: str) -> str:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {list(options)}, got {value!r}{hint}")
    return value


def _from_dict(cls, data: Any):
    """``cls(**data)`` for a config dataclass, refusing unknown keys with a "did you mean" each."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} must be built from a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(msgs)}")
    return cls(**data)


@dataclass
class ViTConfig:
    """Architecture of one Vision Transformer. Field names are a stable contract."""

    image_size: int | tuple[int, int] = 224  # int or (H, W); non-square is fine
    patch_size: int | tuple[int, int] = 16  # int or (ph, pw); must divide image_size
    in_channels: int = 3  # any channel count (1 for grey-scale / digits)
    num_classes: int = 1000  # 0 = no head: forward() returns the pooled features
    dim: int = 768  # token width D
    depth: int = 12  # number of encoder blocks
    num_heads: int = 12  # D must be divisible by this
    mlp_ratio: float = 4.0  # MLP hidden width = int(dim * mlp_ratio) ...
    mlp_dim: int | None = None  # ... unless given explicitly (tutorial 2 uses 1.5 x token length)
    qkv_bias: bool = True
    qk_scale: float | None = None  # None = head_dim ** -0.5, applied to scores *before* softmax
    dropout: float = 0.0  # after the position embedding, inside the MLP and after attn proj
    attn_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth, rate rises linearly from 0 (first block) to this (last)
    act: str = "gelu"  # MLP activation; JAX checkpoints use exact gelu too, "gelu_tanh" for approx
    norm_eps: float = 1e-6  # 1e-6 in timm/JAX/torchvision; Hugging Face defaults to 1e-12
    norm_first: bool = True  # pre-norm (paper). False = post-norm x = norm(x + f(x)), no final norm
    pos_embed: str = "learned"  # learned | sincos1d (over token index) | sincos2d (patch grid) | none
    pos_embed_prefix: bool = True  # learned table has rows for the prefix tokens (timm no_embed_class=False)
    pooling: str = "cls"  # cls = class token | mean = average of patch tokens | map = attention pooling (attn_pool)
    class_token: bool = True
    num_registers: int = 0  # register tokens (Darcet et al. 2024), after the class token
    fc_norm: bool = False  # timm's mean-pooling layout: final norm applied after pooling, not before
    head_hidden_dim: int | None = None  # paper's representation (pre-logits) layer width
    head_act: str = "tanh"  # activation of the pre-logits layer (tanh in paper, HF pooler, torchvision)
    head_dropout: float = 0.0  # dropout before the classifier
    layer_scale: float | None = None  # LayerScale init value (CaiT / DeiT-III), None = off
    task: str = "classification"  # classification | regression (num_classes float outputs)
    patch_embed: str = "conv"  # conv (fastest) | unfold | rearrange: same weights, same tokens
    norm_layer: str = "layernorm"  # layernorm | rmsnorm (no bias, no mean subtraction), every norm of the model
    mlp_layer: str = "mlp"  # mlp (fc1 -> act -> fc2) | swiglu (fc1 packs [gate; value], 2*hidden wide; act(gate)*value)
    norm_pre: bool = False  # a norm after prefix tokens + position embedding, before the blocks (CLIP's ln_pre)
    patch_bias: bool = True  # bias of the patch projection (CLIP: False)
    head_bias: bool = True  # bias of the classifier / projection head (CLIP's visual.proj: False)
    dist_token: bool = False  # DeiT distillation token after the class token, with its own head (head_dist)
    dynamic_img_size: bool = False  # forward takes any HxW divisible by the patch; position table resampled per grid
    pos_resample: str = "timm"  # interpolation of the table at another grid, as the weights' source does it (POS_RESAMPLES)
    naflex_max_patches: int | None = None  # NaFlex (SigLIP2): images resized at their aspect ratio to <= this many patches, batched with a mask (vitkit.model.naflex); None = fixed size
    rope: str = "none"  # rotary position embedding of the patch queries/keys: none | dinov3 (axial, patch centres in [-1, 1]; vitkit.model.rope)
    rope_theta: float = 100.0  # RoPE frequency base (DINOv3: 100)
    rope_shift: float | None = None  # train-mode RoPE coordinate augmentation (DINOv3): shift by U(-s, s) per axis
    rope_jitter: float | None = None  # ... scale each axis by exp(U(-log j, log j))
    rope_rescale: float | None = None  # ... scale both axes by exp(U(-log r, log r)) (DINOv3 releases: 2.0)
    rope_grid_offset: float = 0.0  # axial: added to each integer patch index (PE: 1, the class token sits at 0)
    rope_ref_grid: tuple[int, int] | None = None  # axial: indices rescaled so any grid spans this one (EVA-02 ref_feat_shape)
    rope_indexing: str = "ij"  # axial / mixed: frequency pairs over (row, col) = ij, or (col, row) = xy (PE, RoPE-ViT)
    mlp_norm: bool = False  # a norm on the MLP hidden activation before fc2 (EVA-02 scale_mlp, NormFormer)
    attn_norm: bool = False  # a norm on the attention output before proj (EVA-CLIP scale_attn_inner)
    final_norm: bool = True  # the norm after the blocks (Perception Encoder lang / spatial: none)
    map_num_heads: int | None = None  # heads of the attention pooling (pooling="map"); None = num_heads (PE: 8)
    map_mlp_ratio: float | None = None  # its MLP width / dim; None = as wide as the blocks' fc1
    map_prefix: bool = False  # attention pooling reads the prefix tokens too (timm Eva / PE), not only the patches
    patch_norm: bool = False  # a norm (norm_layer) right after the patch projection, before prefix tokens / positions (AIMv2; timm patch_embed.norm)
    proj_bias: bool = True  # bias of the attention output projection and of the MLP linears (timm proj_bias; AIMv2: False)
    map_head: str = "latent"  # pooling="map" head layout: latent | aimv2 (MAP_HEADS)
    name: str | None = None  # preset name this config came from, informational

    def __post_init__(self) -> None:
        self.image_size = _normalise_size(self.image_size, "image_size")
        self.patch_size = _normalise_size(self.patch_size, "patch_size")
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def image_hw(self) -> tuple[int, int]:
        return to_2tuple(self.image_size, "image_size")

    @property
    def patch_hw(self) -> tuple[int, int]:
        return to_2tuple(self.patch_size, "patch_size")

    @property
    def grid_size(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, P*P*C (the tutorials' "token length")."""
        ph, pw = self.patch_hw
        return ph * pw * self.in_channels

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Every field's type and range, then the combinations (each a named check, in this order:
        the first failing one is the error)."""
        self._check_types()
        self._check_sizes()
        self._check_choices()
        self._check_rope()
        self._check_layout()

    def _check_types(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")

        for name in ("in_channels", "dim", "depth", "num_heads"):
            positive(name)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ConfigError(f"num_registers must be an int >= 0, got {self.num_registers!r}")
        for name in ("qkv_bias", "norm_first", "pos_embed_prefix", "class_token", "fc_norm", "norm_pre",
                     "patch_bias", "head_bias", "dist_token", "dynamic_img_size", "patch_norm", "proj_bias",
                     "mlp_norm", "attn_norm", "final_norm", "map_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("mlp_dim", "head_hidden_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{name} must be a positive int or None, got {v!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.qk_scale is not None and not self.qk_scale > 0:
            raise ConfigError(f"qk_scale must be > 0 or None (= head_dim ** -0.5), got {self.qk_scale!r}")

    def _check_sizes(self) -> None:
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        if h % ph or w % pw:
            raise ConfigError(
                f"image_size {h}x{w} is not divisible by patch_size {ph}x{pw} "
                f"(remainder {h % ph}x{w % pw}); pick a size that is a multiple of the patch"
            )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"dim={self.dim} must be divisible by num_heads={self.num_heads} "
                f"(head_dim would be {self.dim / self.num_heads:.3g})"
            )
        if self.mlp_dim is not None and self.mlp_dim <= 0:
            raise ConfigError(f"mlp_dim must be positive or None, got {self.mlp_dim}")
        if self.mlp_dim is None and int(self.dim * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio={self.mlp_ratio} gives an MLP of width int({self.dim} * {self.mlp_ratio}) = "
                              f"{int(self.dim * self.mlp_ratio)}; it must be at least 1")
        for name in ("dropout", "attn_dropout", "drop_path", "head_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")

    def _check_choices(self) -> None:
        _choice(self.act, ACTIVATIONS, "act")
        _choice(self.head_act, ACTIVATIONS, "head_act")
        _choice(self.pos_embed, POS_EMBEDS, "pos_embed")
        _choice(self.pooling, POOLINGS, "pooling")
        _choice(self.task, TASKS, "task")
        _choice(self.patch_embed, PATCH_EMBEDS, "patch_embed")
        _choice(self.norm_layer, NORM_LAYERS, "norm_layer")
        _choice(self.mlp_layer, MLP_LAYERS, "mlp_layer")
        _choice(self.pos_resample, POS_RESAMPLES, "pos_resample")
        _choice(self.rope, ROPES, "rope")
        _choice(self.rope_indexing, ROPE_INDEXINGS, "rope_indexing")
        _choice(self.map_head, MAP_HEADS, "map_head")

    def _check_rope(self) -> None:
        if self.rope != "none" and self.head_dim % 4:
            raise ConfigError(f"rope={self.rope!r} needs head_dim divisible by 4, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        for name in ("rope_shift", "rope_jitter", "rope_rescale"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or (name != "rope_shift" and v < 1)):
                raise ConfigError(f"{name} must be None or {'> 0' if name == 'rope_shift' else '>= 1'}, got {v}")
        if self.rope_ref_grid is not None:
            self.rope_ref_grid = to_2tuple(self.rope_ref_grid, "rope_ref_grid")
        if self.map_num_heads is not None and (isinstance(self.map_num_heads, bool) or not isinstance(
                self.map_num_heads, int) or self.map_num_heads <= 0 or self.dim % self.map_num_heads):
            raise ConfigError(f"map_num_heads must be None or a positive int dividing dim={self.dim}, "
                              f"got {self.map_num_heads!r}")
        if self.map_mlp_ratio is not None and not self.map_mlp_ratio > 0:
            raise ConfigError(f"map_mlp_ratio must be None or > 0, got {self.map_mlp_ratio!r}")

    def _check_layout(self) -> None:
        """Parts that need each other: the class token for cls pooling and DeiT's distillation token,
        an even (sincos1d) or 4-divisible (sincos2d) width, pre-norm for fc_norm."""
        if self.dist_token and not (self.class_token and self.pooling == "cls"):
            raise ConfigError(f"dist_token=True (DeiT) reads the class and distillation tokens: it needs "
                              f"class_token=True and pooling='cls', got class_token={self.class_token}, "
                              f"pooling={self.pooling!r}")
        if self.pooling == "cls" and not self.class_token:
            raise ConfigError("pooling='cls' needs class_token=True; use pooling='mean' without a class token")
        if self.pos_embed in ("sincos2d", "sincos2d_mae") and self.dim % 4:
            raise ConfigError(f"pos_embed={self.pos_embed!r} needs dim divisible by 4, got dim={self.dim}")
        if self.pos_embed == "sincos1d" and self.dim % 2:
            raise ConfigError(f"pos_embed='sincos1d' needs an even dim, got dim={self.dim}")
        if self.fc_norm and not self.norm_first:
            raise ConfigError("fc_norm=True is a pre-norm layout; it cannot be combined with norm_first=False")
        if self.head_hidden_dim is not None and self.head_hidden_dim <= 0:
            raise ConfigError(f"head_hidden_dim must be positive or None, got {self.head_hidden_dim}")
        self._check_naflex()

    def _check_naflex(self) -> None:
        """NaFlex input: any grid per image, so a dynamic size, a table without prefix rows (prefix
        tokens get no position), no RoPE (one grid per batch)."""
        n = self.naflex_max_patches
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"naflex_max_patches must be a positive int or None, got {n!r}")
        if not self.dynamic_img_size or self.rope != "none" or (self.pos_embed == "learned" and self.pos_embed_prefix):
            raise ConfigError(f"naflex_max_patches={n} (NaFlex input) needs dynamic_img_size=True, rope='none' and a "
                              f"table without prefix rows; got dynamic_img_size={self.dynamic_img_size}, "
                              f"rope={self.rope!r}, pos_embed_prefix={self.pos_embed_prefix}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_hw) if self.image_hw[0] != self.image_hw[1] else self.image_hw[0]
        d["patch_size"] = list(self.patch_hw) if self.patch_hw[0] != self.patch_hw[1] else self.patch_hw[0]
        if self.rope_ref_grid is not None:
            d["rope_ref_grid"] = list(self.rope_ref_grid)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        return _from_dict(cls, data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ViTConfig:
        p = Path(text_or_path)
        text = p.read_text() if (isinstance(text_or_path, Path) or p.suffix == ".json") else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> ViTConfig:
        """A copy with some fields changed; unknown field names are a ConfigError."""
        d = self.to_dict()
        d.update(overrides)
        return ViTConfig.from_dict(d)


def _normalise_size(value: Any, name: str) -> int | tuple[int, int]:
    h, w = to_2tuple(value, name)
    return h if h == w else (h, w)


# --------------------------------------------------------------------------- presets
# (dim, depth, num_heads, mlp_dim). Ti/S: DeiT (Touvron et al. 2021); B/L/H: ViT paper Table 1.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
PAPER_ABBREV = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}

# (variant, patch, image size) combinations that exist as published checkpoints (timm names).
_PRESET_GRID: list[tuple[str, int, int]] = [
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 32, 224), ("small", 32, 384), ("small", 16, 224), ("small", 16, 384), ("small", 8, 224),
    ("base", 32, 224), ("base", 32, 384), ("base", 16, 224), ("base", 16, 384), ("base", 8, 224),
    ("base", 14, 224),
    ("large", 32, 224), ("large", 32, 384), ("large", 16, 224), ("large", 16, 384), ("large", 14, 224),
    ("huge", 14, 224), ("huge", 16, 224),
]


def _preset(variant: str, patch: int, size: int) -> ViTConfig:
    dim, depth, heads, mlp = VARIANTS[variant]
    name = f"vit_{variant}_patch{patch}_{size}"
    return ViTConfig(image_size=size, patch_size=patch, dim=dim, depth=depth, num_heads=heads,
                     mlp_dim=mlp, num_classes=1000, name=name)


PRESETS: dict[str, ViTConfig] = {}
for _v, _p, _s in _PRESET_GRID:
    _c = _preset(_v, _p, _s)
    PRESETS[_c.name] = _c  # type: ignore[index]

_PAPER_NAME = re.compile(r"^vit-(ti|s|b|l|h)/(\d+)(?:[@_-](\d+))?$", re.IGNORECASE)


def resolve_name(name: str) -> str:
    """Canonical preset name for a timm-style or paper-style name ("ViT-B/16", "ViT-L/16@384")."""
    if not isinstance(name, str):
        raise ConfigError(f"a model name must be a string, got {type(name).__name__}")
    key = name.strip()
    if key in PRESETS:
        return key
    m = _PAPER_NAME.match(key)
    if m:
        abbrev = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}[m.group(1).lower()]
        size = m.group(3) or "224"
        candidate = f"vit_{PAPER_ABBREV[abbrev]}_patch{m.group(2)}_{size}"
        if candidate in PRESETS:
            return candidate
    lowered = key.lower().split(".")[0]  # timm pretrained tags: vit_base_patch16_224.augreg_in21k
    if lowered in PRESETS:
        return lowered
    close = difflib.get_close_matches(lowered, list(PRESETS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown model name {name!r}{hint} (see `vitkit models` for the list)")


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The preset's config with overrides applied (e.g. ``num_classes=10, image_size=32``)."""
    base = PRESETS[resolve_name(name)]
    return base.replace(**overrides) if overrides else base.replace()


def list_models(pattern: str | None = None) -> list[str]:
    """Preset names matching ``pattern``: a shell-style pattern (``"vit_base*"``), a paper name
    (``"ViT-B/16"`` = every size of it, ``"ViT-L/16@384"``, ``"ViT-B"``) or a plain substring
    (``"small"``, ``"patch16"``); case-insensitive."""
    import fnmatch

    names = list(PRESETS)
    if not pattern:
        return names
    key = pattern.strip().lower()
    m = re.match(r"^vit-(ti|s|b|l|h)(?:/(\d+))?(?:[@_-](\d+))?$", key)
    if m:
        variant = PAPER_ABBREV[{"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}[m.group(1)]]
        key = f"vit_{variant}_patch{m.group(2) or '*'}_{m.group(3) or '*'}"
    elif not any(ch in key for ch in "*?["):
        key = f"*{key}*"
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), key)]


# --------------------------------------------------------------------------- text towers
TEXT_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
# where the text embedding is read, named after the source that reads it there
TEXT_POOLINGS = ("eot_argmax", "eos_id", "last")


@dataclass
class TextConfig:
    """Architecture of the text tower of an image-text model (CLIP, OpenCLIP, SigLIP, SigLIP2).

    Tokens -> token embedding + learned positions -> ``depth`` pre-norm blocks (causal for CLIP,
    bidirectional for SigLIP) -> final norm -> one token per text (``pooling``) -> projection.
    Field names are a stable contract (saved in ``text_config.json``)."""

    vocab_size: int = 49408
    context_length: int = 77  # rows of the position table = the tokenizer's padded length
    dim: int = 512  # token width
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None  # None = 4 * dim
    act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (most OpenCLIP) | gelu_tanh (SigLIP)
    norm_eps: float = 1e-5  # CLIP 1e-5, SigLIP 1e-6
    qkv_bias: bool = True
    causal: bool = True  # CLIP: a token attends to itself and earlier ones; SigLIP: to all
    # eot_argmax: the position of the largest id (OpenAI; transformers CLIP with eos_token_id == 2);
    # eos_id: the first position of eos_token_id (newer transformers CLIP configs, open_clip 'eos');
    # last: the last position (SigLIP)
    pooling: str = "eot_argmax"
    embed_dim: int | None = 512  # projection width (dim -> embed_dim); None = no projection
    proj_bias: bool = False  # CLIP's text_projection has none; SigLIP's head has one
    pad_token_id: int = 0
    eos_token_id: int = 49407
    name: str | None = None  # informational

    def __post_init__(self) -> None:
        self.validate()

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def out_dim(self) -> int:
        """Width of ``encode_text``'s output: embed_dim, or dim without a projection."""
        return self.embed_dim if self.embed_dim is not None else self.dim

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "dim", "depth", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"TextConfig.{name} must be a positive int, got {v!r}")
        for name in ("mlp_dim", "embed_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"TextConfig.{name} must be a positive int or None, got {v!r}")
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise ConfigError(f"TextConfig.{name} must be an id in [0, vocab_size={self.vocab_size}), got {v!r}")
        for name in ("qkv_bias", "causal", "proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TextConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"TextConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"TextConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.proj_bias and self.embed_dim is None:
            raise ConfigError("TextConfig.proj_bias=True needs a projection (embed_dim), got embed_dim=None")
        _choice(self.act, TEXT_ACTIVATIONS, "TextConfig.act")
        _choice(self.pooling, TEXT_POOLINGS, "TextConfig.pooling")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return _from_dict(cls, data)

    def replace(self, **overrides: Any) -> TextConfig:
        """A copy with some fields changed; unknown field names are a ConfigError."""
        return TextConfig.from_dict({**self.to_dict(), **overrides})


__all__ = ["ViTConfig", "TextConfig", "PRESETS", "VARIANTS", "get_config", "list_models", "resolve_name",
           "to_2tuple"]
