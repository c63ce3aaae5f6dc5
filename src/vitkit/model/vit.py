"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

One module on purpose (~460 lines): the model class with every public stage, read top to bottom
as timm's ``vision_transformer.py`` and nanoGPT's ``model.py`` are; its parts are their own modules
(attention, block, patch_embed, pos_embed, rope).

Data flow (names are the public stages)::

    image (B, C, H, W)
      -> patch_embed               (B, N, D)      N = (H/ph) * (W/pw)
      -> + prefix tokens           (B, R+N, D)    class token and/or register tokens
      -> + position embedding      (B, R+N, D)    learned | sincos1d | sincos2d[_mae] | none
      -> norm_pre (optional)       (B, R+N, D)    CLIP's ln_pre
      -> blocks x depth            (B, R+N, D)
      -> norm                      (B, R+N, D)    = forward_features(x)
      -> pool (+ fc_norm)          (B, D)         class token | mean of the patch tokens | attn_pool (map)
      -> pre_logits (optional)     (B, D')        paper's representation layer (tanh)
      -> head                      (B, K)         = forward(x)

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv``, ...), so the weights of the most common checkpoints map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from ..errors import ConfigError, InputError
from ..io import save_pretrained
from ..preprocess import preprocess_property
from .attention import AttentionPoolLatent
from .block import Block, BlockOutputs, Mlp, make_act, make_norm, run_blocks
from .naflex import NaFlexBatch, naflex_positions
from .patch_embed import PatchEmbed, conv_to_linear_weight
from .pos_embed import get_pos_resampler, sincos_1d, sincos_2d
from .rope import INTERLEAVED, RotaryEmbedding

# The embeddings in front of block 0 that are tokens or tables, not matrices: never weight-decayed
# and, with layer-wise lr decay, in the embedding layer (vitkit.train.optim).
EMBEDDING_TOKENS = ("cls_token", "dist_token", "reg_token", "pos_embed")


class ViT(nn.Module):
    """A Vision Transformer built from a :class:`~vitkit.ViTConfig`.

    ``model(x)`` gives logits (B, num_classes) (or pooled features when num_classes == 0);
    ``model(x, return_attention=True)`` gives ``(logits, [attention (B, heads, T, T) per layer])``.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, ViTConfig):
            raise ConfigError(f"ViT expects a ViTConfig, got {type(config).__name__}")
        self.config = c = config
        self.num_prefix_tokens = c.num_prefix_tokens
        self.pretrained_info: dict[str, Any] | None = None  # filled by the weight loaders
        self.preprocess_cfg: dict[str, Any] | None = None  # mean/std/size/crop..., see vitkit.interop
        self.labels: list[str] | None = None
        # in this order: it is the parameters' order (state dict, init draws)
        self._build_embedding(c)
        self._build_blocks(c)
        self._build_head(c)
        # DeiT training with a teacher: True makes train-mode forward return (head(cls),
        # head_dist(dist)) for a distillation loss. False (default; eval always): their average.
        self.distilled_training = False
        self.grad_checkpointing = False
        self._pos_cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}
        self.init_weights()

    def _build_embedding(self, c: ViTConfig) -> None:
        """Patch embedding, prefix tokens, position table, norm_pre and RoPE."""
        D = c.dim
        self.patch_embed = PatchEmbed(c.image_hw, c.patch_hw, c.in_channels, D, mode=c.patch_embed,
                                      bias=c.patch_bias, dynamic_size=c.dynamic_img_size,
                                      norm=make_norm(c.norm_layer, D, c.norm_eps) if c.patch_norm else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if c.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.num_registers, D)) if c.num_registers else None
        if c.pos_embed == "learned":
            rows = c.num_patches + (c.num_prefix_tokens if c.pos_embed_prefix else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, rows, D))
        else:
            self.register_buffer("pos_embed", self._fixed_pos_embed(), persistent=False)
        self.pos_drop = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.norm_pre = make_norm(c.norm_layer, D, c.norm_eps) if c.norm_pre else None
        self.rope = (RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_shift, c.rope_jitter, c.rope_rescale,
                                     variant=c.rope, grid_offset=c.rope_grid_offset, ref_grid=c.rope_ref_grid,
                                     indexing=c.rope_indexing, depth=c.depth, num_heads=c.num_heads)
                     if c.rope != "none" else None)

    def _build_blocks(self, c: ViTConfig) -> None:
        """The blocks and the final norm."""
        # stochastic depth rises linearly from 0 (first block) to drop_path (last block), as timm's
        # linspace(0, drop_path, depth): a single block is the first one and gets 0. Plain Python:
        # works on the meta device.
        rates = [c.drop_path * i / (c.depth - 1) for i in range(c.depth)] if c.depth > 1 else [0.0]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, c.hidden_dim, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale,
                  attn_drop=c.attn_dropout, proj_drop=c.dropout, act=c.act, norm_eps=c.norm_eps,
                  drop_path=rates[i], layer_scale=c.layer_scale, norm_first=c.norm_first,
                  norm_layer=c.norm_layer, mlp_layer=c.mlp_layer, proj_bias=c.proj_bias, mlp_norm=c.mlp_norm,
                  attn_norm=c.attn_norm, rope_interleaved=c.rope != "none" and INTERLEAVED[c.rope])
            for i in range(c.depth)
        )
        # Post-norm blocks end in a norm already; timm's mean-pool layout moves it after pooling.
        self.norm = (make_norm(c.norm_layer, c.dim, c.norm_eps) if c.norm_first and not c.fc_norm and c.final_norm
                     else nn.Identity())

    def _build_head(self, c: ViTConfig) -> None:
        """Pooling (MAP, fc_norm), pre-logits and the classifier (and DeiT's distillation head)."""
        D = c.dim
        # MAP head (timm's global_pool="map"): model's heads, norm and activation; a plain MLP as
        # wide as the blocks' fc1 (2 * hidden_dim with swiglu, as timm's mlp_ratio). It reads the
        # patch tokens (prefix tokens excluded, as timm).
        # map_head "aimv2": the probe is the query itself, k/v with the blocks' qkv_bias, no norm / MLP after.
        # PE: its own heads and MLP ratio (map_num_heads, map_mlp_ratio).
        map_hidden = (int(D * c.map_mlp_ratio) if c.map_mlp_ratio is not None
                      else c.hidden_dim * (2 if c.mlp_layer == "swiglu" else 1))
        latent = c.map_head == "latent"
        self.attn_pool = (AttentionPoolLatent(D, c.map_num_heads or c.num_heads, Mlp(D, map_hidden, act=c.act) if latent else None,
                                              make_norm(c.norm_layer, D, c.norm_eps) if latent else None,
                                              qk_scale=c.qk_scale, q_proj=latent, kv_bias=latent or c.qkv_bias)
                          if c.pooling == "map" else None)
        self.fc_norm = make_norm(c.norm_layer, D, c.norm_eps) if c.fc_norm else nn.Identity()
        if c.head_hidden_dim:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(D, c.head_hidden_dim))
            self.pre_logits.add_module("act", make_act(c.head_act))
            head_in = c.head_hidden_dim
        else:
            self.pre_logits = nn.Identity()
            head_in = D
        self.head_drop = nn.Dropout(c.head_dropout) if c.head_dropout > 0 else nn.Identity()
        self.head = nn.Linear(head_in, c.num_classes, bias=c.head_bias) if c.num_classes > 0 else nn.Identity()
        # DeiT: a second head reads the distillation token (timm's VisionTransformerDistilled).
        self.head_dist = (nn.Linear(head_in, c.num_classes, bias=c.head_bias)
                          if c.dist_token and c.num_classes > 0 else None)

    # ------------------------------------------------------------------ construction helpers
    def _fixed_pos_embed(self) -> torch.Tensor | None:
        c = self.config
        if c.pos_embed == "sincos1d":  # over token index, prefix tokens included (tutorial 2)
            return sincos_1d(c.num_tokens, c.dim)[None]
        if c.pos_embed in ("sincos2d", "sincos2d_mae"):  # over the patch grid; prefix tokens get none
            return sincos_2d(c.grid_size, c.dim, mae=c.pos_embed == "sincos2d_mae")[None]
        return None

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViT/DeiT init: trunc-normal(0.02) linear weights and learned embeddings, zero biases,
        LayerNorm ones and zeros, LayerScale at its init value; the patch projection
        xavier-uniform over the flattened patch (MAE's init; scaled by its fan-in C*p*p).

        Why not trunc-normal(0.02) for the patch projection too: its fan-in is tiny for small
        patches (4 for a 2x2 grey patch), and 0.02 then makes the tokens ~50x smaller than a
        sin-cos position table, so training on 8x8 digits stalls at chance for epochs
        (benchmarks/train_digits.md). timm leaves its patch conv at PyTorch's fan-in-scaled
        default for the same reason.

        Trap: ``nn.init.trunc_normal_``'s bounds ``a``/``b`` are absolute values (default +-2), so
        ``trunc_normal_(w, std=0.02)`` alone truncates nothing (timm's call has this quirk); the
        truncation is at +-2 std = +-0.04 here, as "truncated normal 0.02" means."""

        def trunc_normal_02(t: torch.Tensor, std: float = 0.02) -> None:
            # Inverse-CDF sampling, a fixed 4 passes (nn.init.trunc_normal_ in this torch redraws
            # the whole tensor until no value is out of range: several times slower at +-2 std).
            if t.is_meta:
                return
            edge = math.erf(2.0 / math.sqrt(2.0))  # 2 * Phi(2) - 1
            t.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_02(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        extra = [self.dist_token, self.attn_pool.latent if self.attn_pool is not None else None]
        for p in (self.cls_token, self.reg_token, *extra):
            if p is not None:
                trunc_normal_02(p)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_02(self.pos_embed)
        # Drawn last: every other parameter gets the same draws as under a plain trunc-normal init.
        proj = getattr(getattr(self, "patch_embed", None), "proj", None)  # None: a head-only holder
        if proj is not None and not proj.weight.is_meta:
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not be weight-decayed (besides all norms and biases)."""
        names = {*EMBEDDING_TOKENS, "attn_pool.latent", "rope.freqs"}
        return {n for n, _ in self.named_parameters() if n in names}

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    # ------------------------------------------------------------------ forward stages
    def _pos_table(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position table for a patch grid: ``pos_embed`` itself at the configured grid;
        with ``dynamic_img_size`` at another grid, the learned table resampled as the weights'
        source does it (``config.pos_resample``, as :meth:`set_image_size`) or the sin/cos table
        computed for that grid.

        Resampled tables are cached per grid while no gradient flows into the table (eval,
        ``no_grad``, frozen table); the cache key holds the table's identity, version (bumped by
        every in-place update: optimizer steps, ``load_state_dict``), dtype and device, so a
        changed table is never served stale. Training recomputes (autograd needs the graph).
        The cache is a plain attribute: not in ``state_dict``, not seen by ``torch.compile``."""
        pos = self.pos_embed
        if pos is None or grid == self.grid_size:
            return pos
        cacheable = not (pos.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
        if cacheable:
            key = (id(pos), pos._version, pos.data_ptr(), pos.dtype, pos.device, self.grid_size,
                   self.config.pos_resample)
            hit = self._pos_cache.get(grid)
            if hit is not None and hit[0] == key:
                return hit[1]
        c = self.config
        if c.pos_embed == "learned":
            prefix = c.num_prefix_tokens if pos.shape[1] != c.num_patches else 0
            table = get_pos_resampler(c.pos_resample)(pos, grid, self.grid_size, prefix)
        elif c.pos_embed == "sincos1d":
            table = sincos_1d(c.num_prefix_tokens + grid[0] * grid[1], c.dim)[None].to(pos)
        else:
            table = sincos_2d(grid, c.dim, mae=c.pos_embed == "sincos2d_mae")[None].to(pos)
        if cacheable:
            if len(self._pos_cache) >= 16:  # many sizes in a row: keep memory bounded
                self._pos_cache.clear()
            self._pos_cache[grid] = (key, table)
        return table

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                   pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, R+N, D) with prefix tokens and position embedding.
        ``grid``: the (gh, gw) the tokens came from (default: the configured grid); ``pos``: the
        (B, N, D) rows to add instead of the grid's table (NaFlex: one grid per image)."""
        B = x.shape[0]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if pos is None:
            pos = self._pos_table(self.grid_size if grid is None else tuple(grid))
        covers_prefix = pos is not None and pos.shape[1] == x.shape[1] + self.num_prefix_tokens
        if pos is not None and not covers_prefix:
            x = x + pos  # table over the patches only (sincos2d, timm no_embed_class)
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if covers_prefix:
            x = x + pos
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor | NaFlexBatch) -> torch.Tensor:
        """Image (B, C, H, W) -> tokens entering the first block (B, R+N, D). A
        :class:`~vitkit.model.naflex.NaFlexBatch` (B, N, ph*pw*C) -> (B, R+N, D): the same conv
        kernel as a matrix over (ph, pw, C)-flattened patches, each image's table resampled to its
        own grid (padding rows: see :meth:`attn_mask_for`)."""
        if isinstance(x, NaFlexBatch):
            w = self.patch_embed.proj.weight  # (D, C, ph, pw)
            tokens = F.linear(x.patches.to(w.dtype), conv_to_linear_weight(w, "ppc"), self.patch_embed.proj.bias)
            x = self._pos_embed(tokens, pos=naflex_positions(self._pos_table, x.grids, tokens.shape[1]))
        else:
            self.patch_embed.check_input(x)
            x = self._pos_embed(self.patch_embed(x), self.patch_embed.grid_for(x))
        return self.norm_pre(x) if self.norm_pre is not None else x

    def attn_mask_for(self, x: torch.Tensor | NaFlexBatch) -> torch.Tensor | None:
        """The blocks' key-padding mask for a NaFlexBatch, (B, 1, 1, R+N) bool (True = a real token;
        prefix tokens always are); None for an image tensor (no padding)."""
        if not isinstance(x, NaFlexBatch):
            return None
        m = x.mask
        if self.num_prefix_tokens:
            m = torch.cat([m.new_ones(m.shape[0], self.num_prefix_tokens), m], dim=1)
        return m[:, None, None, :]

    def rope_for(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The blocks' rotary (cos, sin) for image ``x``'s patch grid (None without ``config.rope``)."""
        if self.rope is None:
            return None
        return self.rope(self.patch_embed.grid_for(x), tokens.device, tokens.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (``torch.utils.checkpoint``, non-reentrant):
        block activations are recomputed in the backward pass instead of kept. Same gradients
        (dropout / drop_path masks replayed from the saved RNG state); applies only while
        gradients are enabled."""
        self.grad_checkpointing = bool(enable)

    # Class-token heads: forward() runs the last block for the prefix tokens the head reads only
    # (see head_queries). Set False (on a model or the class) to run every token everywhere.
    last_block_prefix_only: bool = True

    def head_queries(self) -> int | None:
        """How many leading tokens the head reads, when that is all it reads: 1 (class token),
        2 (class + distillation token), else None (mean / map pooling read every patch)."""
        c = self.config
        if not self.last_block_prefix_only or c.pooling != "cls" or not len(self.blocks):
            return None
        return 2 if c.dist_token else 1

    def run_blocks(self, tokens: torch.Tensor, rope=None, *, attn_mask: torch.Tensor | None = None,
                   last_queries: int | None = None,
                   keep: Collection[int] = (), stop: int | None = None, attention: bool = False,
                   block: Callable[[int, torch.Tensor, int | None], torch.Tensor] | None = None) -> BlockOutputs:
        """Tokens entering block 0 (B, R+N, D) through the blocks, before the final norm: the one
        loop behind ``forward``, ``forward_features``, ``forward_intermediates``, the attention
        maps, the walk-through and the Predictor's engine, each collecting what it needs.
        ``rope``: :meth:`rope_for`; ``attn_mask``: :meth:`attn_mask_for`; the rest:
        :func:`vitkit.model.block.run_blocks`."""
        return run_blocks(self.blocks, tokens, rope=rope, attn_mask=attn_mask, last_queries=last_queries, keep=keep, stop=stop,
                          attention=attention, checkpointing=self.grad_checkpointing, block=block)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Image -> all tokens after the final norm (B, R+N, D) [, list of attention maps]. A
        NaFlexBatch: padded tokens too (pool with ``valid=x.mask``)."""
        tokens = self.embed(x)
        out = self.run_blocks(tokens, self.rope_for(x, tokens), attn_mask=self.attn_mask_for(x),
                              attention=return_attention)
        return (self.norm(out.tokens), out.attentions) if return_attention else self.norm(out.tokens)

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R+N, D) -> (B, D): ``config.pooling`` (:meth:`pool_tokens`), then fc_norm.
        (Distilled models: see forward_head.)"""
        return self.fc_norm(self.pool_tokens(tokens, self.config.pooling, valid))

    def pool_tokens(self, tokens: torch.Tensor, how: str, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R+N, D) -> (B, D) by ``how``: "cls" the class token, "mean" the mean of the patch
        tokens (prefix tokens excluded), "map" attention pooling over the patch tokens.
        ``valid``: (B, N) bool, the real patches of a NaFlexBatch (``x.mask``): only they are pooled."""
        if how == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        if how == "mean":
            if valid is None:
                return patches.mean(dim=1)
            w = valid.to(patches.dtype)[..., None]  # (B, N, 1)
            return (patches * w).sum(dim=1) / w.sum(dim=1)
        if how == "map":
            if self.config.map_prefix:  # timm's Eva (PE) pools every token, the prefix included
                patches = tokens
                if valid is not None:
                    valid = torch.cat([valid.new_ones(valid.shape[0], self.num_prefix_tokens), valid], dim=1)
            return self.attn_pool(patches, attn_mask=None if valid is None else valid[:, None, None, :])
        raise ConfigError(f"pooling must be one of cls, mean, map, got {how!r}")

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False, valid: torch.Tensor | None = None):
        """Tokens (B, R+N, D) (or just the leading prefix tokens) -> logits (B, K), or the
        pooled pre-logits features if asked. ``valid``: a NaFlexBatch's ``mask`` (:meth:`pool_tokens`).

        Distilled (``dist_token``): class token -> ``head``, distillation token -> ``head_dist``;
        the result is their average (pre-logits: the average of the two features), as timm's
        ``VisionTransformerDistilled``. In train mode with ``model.distilled_training = True``
        it is the pair ``(logits_cls, logits_dist)`` for a distillation loss."""
        if tokens.ndim != 3:
            raise InputError(f"forward_head expects tokens (B, T, D), got shape {tuple(tokens.shape)}")
        if self.dist_token is None:
            x = self.head_drop(self.pre_logits(self.pool(tokens, valid)))
            return x if pre_logits else self.head(x)
        x = self.head_drop(self.pre_logits(self.fc_norm(tokens[:, 0])))
        xd = self.head_drop(self.pre_logits(self.fc_norm(tokens[:, 1])))
        if pre_logits:
            return (x + xd) / 2
        x = self.head(x)
        xd = self.head_dist(xd) if self.head_dist is not None else xd
        if self.distilled_training and self.training:
            return x, xd
        return (x + xd) / 2

    def forward(self, x: torch.Tensor | NaFlexBatch, return_attention: bool = False):
        """Image (B, C, H, W) or a :class:`~vitkit.model.naflex.NaFlexBatch` -> logits (B, K)
        [, attention maps per layer].

        With class-token pooling the last block runs for the tokens the head reads only (the
        class token, and the distillation token if any): the same logits, ~7% less compute for
        a 12-block model, forward and backward. Consequence for forward hooks: in ``forward``
        the last block and ``norm`` output (B, k, D), k = 1 or 2; every other module sees all
        tokens. ``forward_features``, ``forward_intermediates`` and ``return_attention=True``
        always compute every token; ``model.last_block_prefix_only = False`` turns it off."""
        valid = x.mask if isinstance(x, NaFlexBatch) else None
        if return_attention:
            tokens, attns = self.forward_features(x, return_attention=True)
            return self.forward_head(tokens, valid=valid), attns
        tokens = self.embed(x)
        out = self.run_blocks(tokens, self.rope_for(x, tokens), attn_mask=self.attn_mask_for(x),
                              last_queries=self.head_queries())
        return self.forward_head(self.norm(out.tokens), valid=valid)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        *,
        norm: bool = False,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        intermediates_only: bool = False,
    ):
        """Outputs of chosen blocks, as timm's ``forward_intermediates``.

        Args:
            indices: an int n = the last n blocks; a list = those block indices (negative
                counts from the end); None = all blocks.
            norm: apply the final norm to each intermediate.
            reshape: return patch tokens as a feature map (B, D, gh, gw) instead of (B, R+N, D).
            return_prefix_tokens: with ``reshape``, also return the prefix tokens (B, R, D).
            intermediates_only: return only the list, skipping the rest of the network.

        Returns ``(final_tokens, intermediates)`` or just ``intermediates``.
        """
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise InputError(f"indices={indices}: expected 1..{depth} (the last n blocks)")
            take = list(range(depth - indices, depth))
        else:
            take = []
            for i in indices:
                j = i + depth if i < 0 else i
                if not 0 <= j < depth:
                    raise InputError(f"block index {i} out of range for depth {depth}")
                take.append(j)
        if not take:
            raise InputError("indices is empty: give block indices, an int n (the last n blocks) or None (all)")
        if reshape and isinstance(x, NaFlexBatch):
            raise InputError("reshape=True needs one grid for the batch; a NaFlexBatch has one per image")
        tokens = self.embed(x)  # checks the input
        gh, gw = (0, 0) if isinstance(x, NaFlexBatch) else self.patch_embed.grid_for(x)
        out = self.run_blocks(tokens, self.rope_for(x, tokens), attn_mask=self.attn_mask_for(x), keep=set(take),
                              stop=max(take) if intermediates_only else None)
        inter = [self.norm(out.hidden[i]) if norm else out.hidden[i] for i in take]
        if reshape:
            R = self.num_prefix_tokens
            maps = [t[:, R:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw) for t in inter]
            inter = list(zip(maps, [t[:, :R] for t in inter])) if return_prefix_tokens else maps
        if intermediates_only:
            return inter
        return self.norm(out.tokens), inter

    # ------------------------------------------------------------------ resolution change
    def set_image_size(self, image_size) -> None:
        """Change the input resolution in place: learned tables are resampled as the weights'
        source does it (``config.pos_resample``), sin/cos tables recomputed. The patch size stays."""
        old = self.config
        new = old.replace(image_size=image_size)  # validates divisibility
        self.patch_embed.set_image_size(new.image_hw)
        self.config = new
        if isinstance(self.pos_embed, nn.Parameter):
            prefix = old.num_prefix_tokens if self.pos_embed.shape[1] != old.num_patches else 0
            with torch.no_grad():
                table = get_pos_resampler(old.pos_resample)(self.pos_embed.data, new.grid_size, old.grid_size,
                                                            prefix)
            self.pos_embed = nn.Parameter(table)
        elif self.pos_embed is not None:
            self.pos_embed = self._fixed_pos_embed().to(self.pos_embed.device)
        self._pos_cache.clear()

    @property
    def preprocess(self):
        """The torchvision v2 eval transform these weights expect (PIL image -> input tensor)."""
        from ..data.transforms import default_preprocess, eval_transform

        return eval_transform(self.preprocess_cfg or default_preprocess(self.config))

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={c.name}, image={c.image_hw}, patch={c.patch_hw}, dim={c.dim}, depth={c.depth}, "
                f"heads={c.num_heads}, tokens={c.num_tokens}")

    # ------------------------------------------------------------------ persistence
    # ``preprocess_cfg`` accepts a dict (or None, or a Preprocess) and stores a validated Preprocess.
    preprocess_cfg = preprocess_property()

    def save_pretrained(self, directory, **extra: Any):
        """Write ``config.json`` + ``model.safetensors`` (no pickle) to ``directory``: vitkit's own
        format, which :func:`vitkit.load_model` and :func:`vitkit.from_pretrained` read back bit-exact."""
        return save_pretrained(self, directory, **extra)

    def export_to(self, format: str, path, **options: Any):
        """Export to any format of the registry that writes ("timm" | "hf" | "torchvision" | "jax" |
        "dinov2" | "openai_clip" | "onnx" | "torchscript" | "vitkit"); see :mod:`vitkit.interop.export`."""
        # The one import of interop in the model package, at call time: export and the format
        # modules never import the model (only vitkit.interop.load builds one), so it is no cycle
        # (tests/test_architecture.py checks).
        from ..interop.export import export_to

        return export_to(self, format, path, **options)
