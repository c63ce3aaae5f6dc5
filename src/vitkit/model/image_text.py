"""The image-text pair (CLIP, OpenCLIP, SigLIP, SigLIP2): an image ViT, a text tower, the
contrastive logit scale (and SigLIP's logit bias), and the checkpoint's tokenizer.

    img = normalize(vision(pixels))          (B_img, E)
    txt = normalize(text(ids))               (B_txt, E)
    logits_per_image = exp(logit_scale) * img @ txt.T  [+ logit_bias]      (B_img, B_txt)
    probabilities: softmax over the texts (CLIP, loss="softmax"); sigmoid of each pair (SigLIP, "sigmoid")

The logits are computed in the order transformers computes them (``txt @ img.T`` scaled, then
transposed), so they agree with ``CLIPModel`` / ``SiglipModel``'s ``logits_per_image``.
Load one with :func:`vitkit.load_image_text`; save with ``model.save_pretrained(dir)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..io import save_image_text
from .text import TextTransformer
from .vit import ViT

LOSSES = ("softmax", "sigmoid")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class ImageTextModel(nn.Module):
    """Args:
        vision: the image tower, a :class:`vitkit.ViT` whose ``model(x)`` is the image embedding
            (CLIP: projection head, ``num_classes`` = embedding width; SigLIP: the MAP-pooled tokens).
        text: the text tower (:class:`~vitkit.model.text.TextTransformer`) of the same width.
        loss: "softmax" (CLIP) or "sigmoid" (SigLIP): how logits become probabilities.
        logit_scale: initial log of the logit scale (CLIP: log(1 / 0.07); SigLIP: log(10)).
        logit_bias: initial logit bias (SigLIP: -10), None = no bias (CLIP).
        tokenizer: the checkpoint's :class:`vitkit.text.Tokenizer` (``tokenize`` needs it).

    Attributes ``pretrained_info`` and ``load_report`` are set by the loaders.
    """

    def __init__(self, vision: ViT, text: TextTransformer, loss: str = "softmax",
                 logit_scale: float = math.log(1 / 0.07), logit_bias: float | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        v_out = vision.config.num_classes or vision.config.dim
        if v_out != text.config.out_dim:
            raise ConfigError(f"the image tower embeds to width {v_out} but the text tower to {text.config.out_dim}; "
                              "they must match")
        self.vision = vision
        self.text = text
        self.loss = loss
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))  # () as OpenAI/open_clip
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias))) if logit_bias is not None else None
        self.tokenizer = tokenizer
        self.pretrained_info: dict[str, Any] | None = None

    @property
    def embed_dim(self) -> int:
        return self.text.config.out_dim

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,) texts -> (B, context_length) int64 ids with the checkpoint's tokenizer."""
        if self.tokenizer is None:
            raise ConfigError("this image-text model has no tokenizer; pass token ids, or load it with one "
                              "(vitkit.load_image_text(..., tokenizer=DIR))")
        return self.tokenizer(texts)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) preprocessed pixels -> (B, E) image embeddings (``get_image_features``)."""
        x = self.vision(pixels)
        return _normalize(x) if normalize else x

    def encode_text(self, ids: torch.Tensor | Sequence[str], attention_mask: torch.Tensor | None = None,
                    normalize: bool = False, text_forward: Any = None) -> torch.Tensor:
        """(B, L) token ids, or a list of texts (tokenized here) -> (B, E) text embeddings
        (``get_text_features``). ``attention_mask`` (B, L): 1 = token, 0 = padding, as
        transformers' tokenizers return it; the sources' own zero-shot code passes none.
        ``text_forward``: another forward of the text tower, ``(ids, attention_mask) -> (B, E)``
        (``vitkit.infer.Predictor(model.text, "bf16")``: the image engine's walk with the text's
        masks); default the tower itself."""
        if not isinstance(ids, torch.Tensor):
            if isinstance(ids, str):
                raise InputError("encode_text takes a list of texts, got one string; wrap it in a list")
            ids = self.tokenize(ids)
        ids = ids.to(self.logit_scale.device)
        x = (self.text if text_forward is None else text_forward)(ids, attention_mask)
        return _normalize(x) if normalize else x

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E) embeddings (normalised here) -> logits_per_image (B_img, B_txt)."""
        img, txt = _normalize(image_embeds), _normalize(text_embeds)
        logits_per_text = (txt @ img.t()) * self.logit_scale.exp()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return logits_per_text.t()

    def probabilities(self, logits_per_image: torch.Tensor) -> torch.Tensor:
        """logits (B_img, B_txt) -> probabilities: softmax over the texts (CLIP) or the sigmoid of
        each image-text pair (SigLIP), as each family's zero-shot pipeline does."""
        if self.loss == "softmax":
            return logits_per_image.softmax(dim=-1)
        return torch.sigmoid(logits_per_image)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor | Sequence[str],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B_img, C, H, W) pixels, (B_txt, L) ids (or texts) -> logits_per_image (B_img, B_txt)."""
        return self.logits(self.encode_image(pixels), self.encode_text(ids, attention_mask))

    def save_pretrained(self, directory) -> Path:
        """Write vitkit's image-text directory: the image tower as ``ViT.save_pretrained`` writes it
        (so ``vitkit.load_model`` reads the image model alone), plus the text tower, the logit scale
        and bias, and the tokenizer (:func:`vitkit.io.save_image_text`); ``vitkit.load_image_text``
        reads it back."""
        return save_image_text(self, directory)
