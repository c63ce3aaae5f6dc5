"""Builders shared by the family tests: timm state dicts written back in the original repositories'
layouts (the inverses of timm's ``_convert_pe`` and ``checkpoint_filter_fn``, written here from the
original code, independently of vitkit's readers), and EVA-02's RoPE buffers computed as
baaivision/EVA's ``VisionRotaryEmbeddingFast`` does."""

from __future__ import annotations

import re

import torch

# timm Eva name -> perception_models name (core/vision_encoder/pe.py), whole-name patterns
_PE_NAMES = [
    (r"patch_embed\.proj\.weight", "conv1.weight"), (r"norm_pre\.", "ln_pre."), (r"norm\.", "ln_post."),
    (r"blocks\.(\d+)\.norm(\d)\.", r"transformer.resblocks.\1.ln_\2."),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"blocks\.(\d+)\.gamma_(\d)", r"transformer.resblocks.\1.ls_\2.gamma"),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"attn_pool\.latent", "attn_pool.probe"), (r"attn_pool\.proj\.", "attn_pool.attn.out_proj."),
    (r"attn_pool\.norm\.", "attn_pool.layernorm."), (r"attn_pool\.mlp\.fc1\.", "attn_pool.mlp.c_fc."),
    (r"attn_pool\.mlp\.fc2\.", "attn_pool.mlp.c_proj."),
]


def _rename(k: str, table) -> str:
    for pat, to in table:
        if re.match(pat, k):
            return re.sub(pat, to, k, count=1)
    raise KeyError(k)


def timm_to_pe(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A timm ``vit_pe_*`` state dict in perception_models' layout (``prefix="visual."``: as in a
    whole PE CLIP checkpoint). The projection has no bias there: timm's must be zeros."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["positional_embedding"] = v[0]
        elif k == "head.weight":
            out["proj"] = v.t().contiguous()
        elif k == "head.bias":
            assert not v.any(), "PE's proj has no bias"
        elif k.startswith(("attn_pool.q.", "attn_pool.kv.")):
            kind = k.rsplit(".", 1)[1]
            if k.startswith("attn_pool.q."):
                out[f"attn_pool.attn.in_proj_{kind}"] = torch.cat([v, sd[f"attn_pool.kv.{kind}"]])
        else:
            out[_rename(k, _PE_NAMES)] = v
    return {prefix + k: v for k, v in out.items()}


_EVA_NAMES = [(r"(blocks\.\d+)\.mlp\.norm\.", r"\1.mlp.ffn_ln."), (r"(blocks\.\d+)\.attn\.norm\.", r"\1.attn.inner_attn_ln."),
              (r"(blocks\.\d+)\.mlp\.fc1_g\.", r"\1.mlp.w1."), (r"(blocks\.\d+)\.mlp\.fc1_x\.", r"\1.mlp.w2."),
              (r"(blocks\.\d+)\.mlp\.fc1\.", r"\1.mlp.w12."), (r"(blocks\.\d+)\.mlp\.fc2\.", r"\1.mlp.w3."),
              (r"(blocks\.\d+)\.attn\.q_proj\.bias", r"\1.attn.q_bias"),
              (r"(blocks\.\d+)\.attn\.v_proj\.bias", r"\1.attn.v_bias"), (r".*", r"\g<0>")]


def eva02_rope(head_dim: int, pt: int, ft: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02's ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=pt, ft_seq_len=ft)`` buffers
    (EVA-02/asuka/rope.py): (ft * ft, head_dim) cos and sin."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft) / ft * pt
    f = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)  # (ft, dim), pairs (n r)
    f = torch.cat([f[:, None, :].expand(ft, ft, dim), f[None, :, :].expand(ft, ft, dim)], dim=-1)
    return f.cos().reshape(-1, 2 * dim), f.sin().reshape(-1, 2 * dim)


def timm_to_eva02(sd: dict[str, torch.Tensor], head_dim: int, ref: int, grid: int,
                  prefix: str = "") -> dict[str, torch.Tensor]:
    """A timm ``eva02_*`` state dict in baaivision/EVA's layout (modeling_finetune.py; EVA-CLIP's
    towers under ``visual.``), with the RoPE buffers the original keeps."""
    out = {_rename(k, _EVA_NAMES): v for k, v in sd.items() if not k.endswith("attn.k_proj.bias")}
    out["rope.freqs_cos"], out["rope.freqs_sin"] = eva02_rope(head_dim, ref, grid)
    return {prefix + k: v for k, v in out.items()}


def same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (set(got) ^ set(want))
    for k in want:
        assert torch.equal(got[k], want[k]), k
