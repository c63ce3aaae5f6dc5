"""The text tower of CLIP / OpenCLIP / SigLIP / SigLIP2 (Radford et al. 2021; Zhai et al. 2023).

    ids (B, L) -> token_embed + pos_embed[:L] -> blocks (causal for CLIP) -> norm   (B, L, D)
               -> pool (one token per text)                                    (B, D)
               -> proj (D -> E; CLIP's text_projection, SigLIP's head)          (B, E)

The blocks are vitkit's own :class:`~vitkit.model.block.Block` (pre-norm, fused qkv), the same
parts as the image tower; the causal mask goes through Attention's ``attn_mask``. Pooling
(:data:`vitkit.config.TEXT_POOLINGS`) reads the token each source reads:

* ``eot_argmax``: the position of the largest id (OpenAI's CLIP and open_clip ``argmax``: the
  end-of-text token has the largest id of CLIP's vocabulary; transformers' CLIP with the legacy
  ``eos_token_id == 2``),
* ``eos_id``: the first position of ``eos_token_id`` (transformers' CLIP configs since PR #24773,
  open_clip ``eos``),
* ``last``: the last position (SigLIP, SigLIP2: text padded to the context length).

Parameter names (the contract the weight readers map onto): ``token_embed.weight`` (V, D),
``pos_embed`` (1, L, D), ``blocks.{i}.*`` as the ViT's, ``norm.{weight,bias}``,
``proj.weight`` (E, D) and ``proj.bias`` (E,) when ``proj_bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..errors import InputError
from .block import Block, run_blocks


class TextTransformer(nn.Module):
    """Text encoder built from a :class:`~vitkit.config.TextConfig`.

    ``model(ids)`` is the text embedding (B, E) as the source's ``get_text_features`` /
    ``encode_text(normalize=False)`` computes it (not L2-normalised)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.dim))
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, c.hidden_dim, qkv_bias=c.qkv_bias, act=c.act, norm_eps=c.norm_eps)
            for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.proj = nn.Linear(c.dim, c.embed_dim, bias=c.proj_bias) if c.embed_dim is not None else None
        # (L, L) bool, True where query i may see key j (j <= i); sliced to the input's length
        causal = torch.ones(c.context_length, c.context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal if c.causal else None, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # open_clip's TextTransformer.init_parameters (embeddings; projection ~ width ** -0.5)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.config.dim**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def _check_ids(self, ids: torch.Tensor) -> None:
        c = self.config
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputError(f"text ids must be an integer tensor (B, L), got {got}; tokenize texts first")
        # The value check reads the ids (a data-dependent branch): not while a graph is being
        # exported or traced (ONNX), whose runtime's Gather refuses an id outside the table itself.
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if ids.numel() and not exporting and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise InputError(f"text ids must lie in [0, {c.vocab_size}) (the vocabulary), got "
                             f"[{int(ids.min())}, {int(ids.max())}]; tokenized with another model's tokenizer?")
        if ids.shape[1] > c.context_length:
            raise InputError(f"text ids have {ids.shape[1]} positions; this text tower has context_length="
                             f"{c.context_length}")

    def attention_mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The bool mask (B or 1, 1, L, L) the blocks use: causal (CLIP) and/or the keys of
        ``attention_mask`` (B, L) (1 = real token, 0 = padding, as transformers' tokenizers
        return it); None when every token sees every token (SigLIP without a padding mask)."""
        L = ids.shape[1]
        mask = None if self.causal_mask is None else self.causal_mask[:L, :L][None, None]  # (1, 1, L, L)
        if attention_mask is not None:
            keys = attention_mask.to(device=ids.device).bool()[:, None, None, :]  # (B, 1, 1, L)
            mask = keys if mask is None else mask & keys
        return mask

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> tokens entering the first block (B, L, D). L may be shorter than
        ``context_length`` (positions 0..L-1 are used)."""
        self._check_ids(ids)
        return self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]

    def forward_features(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) tokens after the final norm (transformers' last_hidden_state)."""
        x = self.embed(ids)  # (B, L, D)
        return self.norm(run_blocks(self.blocks, x, attn_mask=self.attention_mask(ids, attention_mask)).tokens)

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of the pooled token of each text (eot_argmax / eos_id poolings)."""
        if self.config.pooling == "eot_argmax":
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == self.config.eos_token_id).to(torch.int).argmax(dim=-1)  # eos_id: the first occurrence

    def pool(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens -> (B, D): the token ``config.pooling`` names (see the module doc)."""
        if self.config.pooling == "last":
            return tokens[:, -1]
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), self._pool_index(ids)]

    def trim(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ids`` (and the mask) cut after the last pooled position of the batch, for a causal tower
        that pools one token (CLIP): no kept token attends to a dropped one, so the embedding is the
        same (to float rounding) while a prompt of ~10 tokens no longer runs 77 positions (CLIP pads
        to its context; transformers' tokenizer pads to the batch's longest text, which is why it ran
        ~5x more texts/s before this). SigLIP (bidirectional, last token) is returned as it is, and
        so is everything while a graph is exported or traced (the length would be baked in)."""
        c = self.config
        self._check_ids(ids)  # the ids as given (a too-long or foreign batch is named before any cut)
        if not c.causal or c.pooling == "last" or torch.compiler.is_exporting() or torch.jit.is_tracing():
            return ids, attention_mask
        n = int(self._pool_index(ids).max()) + 1 if ids.numel() else ids.shape[1]
        if n >= ids.shape[1]:
            return ids, attention_mask
        return ids[:, :n], None if attention_mask is None else attention_mask[:, :n]

    def forward_head(self, tokens: torch.Tensor, ids: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, D) tokens after the final norm, their (B, L) ids -> (B, E) projected embedding,
        or with ``pre_logits`` the pooled (B, D) token before the projection."""
        x = self.pool(tokens, ids)
        return self.proj(x) if self.proj is not None and not pre_logits else x

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, E) text embedding (projected, not normalised)."""
        ids, attention_mask = self.trim(ids, attention_mask)
        return self.forward_head(self.forward_features(ids, attention_mask), ids)
