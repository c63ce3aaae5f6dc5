"""The ViT families vitkit loads exactly, as data: where each ships, hub ids to try on a connected
machine, what ``model(x)`` returns, and whether vitkit also loads its text tower (image-text
families: ``vitkit.load_image_text``, ``vitkit zeroshot``, text search). ``vitkit models --families``
prints this table; docs/weights.md explains it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    sources: tuple[str, ...]  # "format: what" (format names from vitkit.interop.formats)
    hub_ids: tuple[str, ...]
    returns: str  # what model(x) is
    preprocess: str
    text: tuple[str, ...] = ()  # "format: what" of checkpoints whose text tower vitkit loads too; () = image only

    @property
    def towers(self) -> str:
        return "image + text" if self.text else "image"


FAMILIES: tuple[Family, ...] = (
    Family("vit", ("timm: vit_*", "hf: ViTModel, ViTForImageClassification", "torchvision: vit_*",
                   "jax: vision_transformer / big_vision .npz"),
           ("google/vit-base-patch16-224", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
           "logits (or pooled features without a head)", "per checkpoint (0.5/0.5 for Google/HF ViT)"),
    Family("deit", ("timm: deit_*, deit3_*, deit_*_distilled_*",
                    "hf: DeiTForImageClassificationWithTeacher, DeiTModel"),
           ("facebook/deit-base-distilled-patch16-224", "timm/deit3_small_patch16_224.fb_in1k"),
           "logits; distilled: (head(cls) + head_dist(dist)) / 2",
           "ImageNet mean/std, bicubic resize 256, centre crop 224"),
    Family("dinov2", ("hf: Dinov2Model, Dinov2WithRegistersModel", "timm: vit_*_patch14_dinov2, *_reg4_dinov2",
                      "dinov2: facebookresearch/dinov2 hub state dicts"),
           ("facebook/dinov2-small", "facebook/dinov2-with-registers-small", "timm/vit_small_patch14_reg4_dinov2.lvd142m"),
           "class token after the final norm (HF pooler_output, x_norm_clstoken)",
           "ImageNet mean/std, bicubic, centre crop 0.875"),
    Family("dinov3", ("hf: DINOv3ViTModel (RoPE, registers, LayerScale; gated MLP for ViT-H+/7B)",
                      "dinov3: facebookresearch/dinov3 state dicts", "timm: vit_*_patch16_dinov3* (Eva)"),
           ("facebook/dinov3-vits16-pretrain-lvd1689m", "facebook/dinov3-vitb16-pretrain-lvd1689m",
            "timm/vit_small_patch16_dinov3.lvd1689m"),
           "class token after the final norm (HF pooler_output; timm: its global_pool, avg by default); "
           "any input size the patch divides",
           "ImageNet mean/std, bilinear resize to 224 x 224"),
    Family("clip", ("hf: CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (image tower)",
                    "openai_clip: OpenAI / OpenCLIP state dicts (visual.*)", "timm: vit_*_clip_*"),
           ("openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14", "timm/vit_base_patch16_clip_224.openai"),
           "projected image embedding (get_image_features; not L2-normalised); pooler_output without projection",
           "OpenAI CLIP mean/std, bicubic resize of the short side, centre crop",
           ("hf: CLIPModel (+ its tokenizer files)",
            "openai_clip: OpenAI / OpenCLIP state dicts and open_clip hub dirs (tokenizer: the checkpoint's, or "
            "open_clip's bpe_simple_vocab_16e6.txt.gz)", "vitkit: image-text dirs (save_pretrained)")),
    Family("siglip", ("hf: SiglipVisionModel, SiglipModel (image tower; SigLIP2 fixed-res too)",
                      "jax: big_vision .npz (params/img/..., MAPHead_0)", "timm: vit_*_siglip_*"),
           ("google/siglip-base-patch16-224", "google/siglip2-base-patch16-224", "timm/vit_base_patch16_siglip_224.webli"),
           "attention-pooled output (pooler_output / get_image_features)", "mean = std = 0.5, resize to the size",
           ("hf: SiglipModel, Siglip2Model (fixed resolution) (+ spiece.model / tokenizer.json)",
            "jax: big_vision SigLIP .npz (params/txt/; tokenizer: its spiece.model)",
            "vitkit: image-text dirs (save_pretrained)")),
    Family("siglip2_naflex", ("hf: Siglip2VisionModel, Siglip2Model (image tower; max_num_patches from the processor)",
                              "timm: naflexvit_* (learned table, token / avg / map pooling)"),
           ("google/siglip2-base-patch16-naflex", "timm/naflexvit_base_patch16_gap.e300_s576_in1k"),
           "pooler_output of images at their own aspect ratio, packed with a mask (vitkit.model.naflex.NaFlexBatch)",
           "mean = std = 0.5, bilinear resize to fit max_num_patches at the image's aspect ratio"),
    Family("mae", ("hf: ViTMAEModel, ViTMAEForPreTraining (encoder; decoder dropped with a note)",
                   "timm: vit_*_224.mae (plain ViT)", "timm: facebookresearch/mae mae_pretrain_vit_*.pth"),
           ("facebook/vit-mae-base", "timm/vit_base_patch16_224.mae"),
           "class token after the final norm (forward_features = HF last_hidden_state with every patch kept, in "
           "order: mask_ratio 0, noise arange(N))", "ImageNet mean/std, bicubic resize to 224 x 224"),
    Family("aimv2", ("hf: Aimv2VisionModel, Aimv2Model (image tower + visual_projection; native-resolution too)",
                     "timm: aimv2_*", "ml_aim: apple/ml-aim AIMv2 state dicts (encoders, LiT image tower)"),
           ("apple/aimv2-large-patch14-224", "apple/aimv2-large-patch14-224-lit", "apple/aimv2-large-patch14-native",
            "timm/aimv2_large_patch14_224.apple_pt"),
           "AIMv2's attention-pooled output where the checkpoint has the head (HF pooler_output; LiT: "
           "get_image_features), else the mean of the tokens after the final norm (timm global_pool 'avg')",
           "OpenAI CLIP mean/std, bicubic resize and centre crop to the size"),
    Family("eva02", ("timm: eva02_* (Eva: table + axial RoPE, q/v bias, SwiGLU with MLP norm; not eva02_enormous)",
                     "baai_eva: baaivision/EVA EVA-02 and EVA-CLIP tower state dicts (RoPE checked against rope.freqs_*)"),
           ("timm/eva02_base_patch14_224.mim_in22k", "timm/eva02_small_patch14_336.mim_in22k_ft_in1k"),
           "timm's global_pool: mean of the patch tokens + fc_norm (classifiers), class token (EVA-CLIP towers)",
           "OpenAI CLIP mean/std, bicubic, centre crop 0.9 (the hub config's pretrained_cfg)"),
    Family("perception_encoder", ("timm: vit_pe_core_*, vit_pe_lang_*, vit_pe_spatial_* (Eva: xy RoPE, offset 1)",
                                  "perception_models: facebookresearch/perception_models PE state dicts (visual.*)"),
           ("timm/vit_pe_core_base_patch16_224.fb", "timm/vit_pe_spatial_base_patch16_512.fb"),
           "core: 8-head attention pooling over every token, then the projection head; lang / spatial: mean of the "
           "patch tokens (no final norm)", "mean = std = 0.5, bicubic resize to the size"),
    Family("rope_vit", ("timm: vit_*_rope_224, vit_*_rope_mixed_*, *_ape_224 (RoPE-ViT), vit_*_rope_reg*_gap_256",),
           ("timm/vit_base_patch16_rope_224.naver_in1k", "timm/vit_base_patch16_rope_mixed_224.naver_in1k"),
           "class token (RoPE-ViT) or mean + fc_norm (SBB reg/gap); mixed RoPE's frequencies load as rope.freqs",
           "ImageNet mean/std, bicubic (the hub config's pretrained_cfg)"),
)


def families_table() -> list[dict[str, str | list[str]]]:
    return [{"family": f.name, "sources": list(f.sources), "hub_ids": list(f.hub_ids), "returns": f.returns,
             "preprocess": f.preprocess, "towers": f.towers, "text_sources": list(f.text)} for f in FAMILIES]


def layout_family(config, dinov2: bool) -> str | None:
    """The family whose layout a config needs beyond the plain ViT: "deit" (distillation token),
    "aimv2" (a norm after the patch embedding), "siglip" (attention pooling), "clip" (a norm before the blocks), "dinov2" when the caller's
    ``dinov2`` test says so (export: layer scale / registers / SwiGLU; timm: also its architecture
    name), else None. The one cascade the hf export and the timm reader share."""
    c = config
    return ("deit" if c.dist_token else "aimv2" if getattr(c, "patch_norm", False) else "siglip" if c.pooling == "map" else "clip" if c.norm_pre
            else "dinov2" if dinov2 else None)
