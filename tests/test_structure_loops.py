"""One block loop, one engine block, one table per fact (issue 24, items 2, 4, 5): every caller
of the blocks gets what the model's own stages give (oracle: the stage calls, or the model's
forward), and the facts that used to live in several places agree with their one source."""

from __future__ import annotations

import re

import pytest
import torch

from vitkit import ViT, ViTConfig
from vitkit.summary import walkthrough

TINY = dict(image_size=16, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)


def perturbed(**overrides) -> ViT:
    """Every parameter off its init (unit norms would hide a skipped norm)."""
    m = ViT(ViTConfig(**{**TINY, **overrides})).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def test_walkthrough_runs_the_models_own_embedding_norm_pre_included():
    """CLIP-style norm_pre (ln_pre) sits between the embedding and block 0: the walk-through's
    prediction is the model's, and it lists the stage."""
    m = perturbed(norm_pre=True, patch_bias=False)
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    text = walkthrough(m, x, labels=[f"c{i}" for i in range(5)])
    with torch.no_grad():
        p = m(x[None]).softmax(-1)[0]
    k = int(p.argmax())
    assert f"top-1 = c{k} (p={float(p[k]):.3f})" in text, text
    assert re.search(r"^norm_pre\s+\(5, 32\)", text, re.M), text


def test_layer_table_counts_every_parameter_of_every_stage():
    """norm_pre, the distillation token and its head, and MAP pooling have parameters too: the
    table's rows sum to the model's count (oracle: model.num_params())."""
    from vitkit.summary import layer_table

    for kw in (dict(norm_pre=True, patch_bias=False), dict(dist_token=True), dict(pooling="map")):
        m = ViT(ViTConfig(**{**TINY, **kw}))
        assert sum(r.params for r in layer_table(m)) == m.num_params(), kw


# --------------------------------------------------------------------------- the Predictor's outputs
def _stages(m: ViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        tokens = m.forward_features(x)
        return {"logits": m(x), "pooled": m.forward_head(tokens, pre_logits=True), "tokens": tokens}


@pytest.mark.parametrize("kw", [{}, dict(dist_token=True, head_hidden_dim=16), dict(pooling="mean", fc_norm=True),
                                dict(norm_first=False, layer_scale=0.3, num_registers=2)],
                         ids=["cls", "dist_pre_logits", "mean", "post_norm_ls_registers"])
def test_predictor_outputs_equal_the_stage_calls(kw):
    """output="pooled" / "tokens": the exact walk is bit-identical to the stage calls it names
    (oracle: forward_head(forward_features(x), pre_logits=True) / forward_features(x)); the default
    walk within float rounding."""
    from vitkit.infer import Predictor

    m = perturbed(**kw)
    x = torch.randn(3, 3, 16, 16)
    want = _stages(m, x)
    for output, ref in want.items():
        exact = Predictor(m, exact=True, output=output)
        assert exact.path == "engine", exact.notes
        assert torch.equal(exact(x), ref), output
        fast = Predictor(m, output=output)
        torch.testing.assert_close(fast(x), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_predictor_output_without_the_engine_is_the_stage_call():
    """A model the engine cannot run (a hook on a block): the Predictor calls the stages itself."""
    from vitkit.infer import Predictor

    m = perturbed()
    m.blocks[0].register_forward_hook(lambda mod, i, o: None)
    x = torch.randn(2, 3, 16, 16)
    for output, ref in _stages(m, x).items():
        p = Predictor(m, output=output)
        assert p.path == "model"
        assert torch.equal(p(x), ref), output


def test_predictor_output_is_checked():
    from vitkit.errors import ConfigError
    from vitkit.infer import Predictor

    with pytest.raises(ConfigError, match=r"output must be one of \['logits', 'pooled', 'tokens'\], got 'features'"):
        Predictor(perturbed(), output="features")


# --------------------------------------------------------------------------- one loop
def test_every_block_walk_goes_through_the_one_loop(monkeypatch):
    """forward, attention maps, intermediates, the walk-through, the Predictor's engine and the
    text tower all run the blocks through vitkit.model.block.run_blocks (a spy counts the calls)."""
    import vitkit.model.block as block_mod
    import vitkit.model.text as text_mod
    import vitkit.model.vit as vit_mod
    from vitkit.config import TextConfig
    from vitkit.infer import Predictor

    calls = []
    real = block_mod.run_blocks

    def spy(*a, **k):
        calls.append(k.get("block") is not None)
        return real(*a, **k)

    monkeypatch.setattr(vit_mod, "run_blocks", spy)
    monkeypatch.setattr(text_mod, "run_blocks", spy)
    m = perturbed()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        m(x)
        m(x, return_attention=True)
        m.forward_intermediates(x, 1)
        walkthrough(m, x[0])
        assert len(calls) == 4 and not any(calls)
        p = Predictor(m, verify=False)
        assert p.path == "engine"
        p(x)
        assert calls[-1]  # the engine's block function inside the model's loop
        n = len(calls)
        tower = text_mod.TextTransformer(TextConfig(vocab_size=50, context_length=8, dim=32, depth=2, num_heads=2,
                                                    mlp_dim=64, embed_dim=16, eos_token_id=49))
        tower(torch.randint(0, 50, (2, 8)))
        assert len(calls) == n + 1


def test_intermediates_stop_early_and_equal_the_full_walk():
    m = perturbed(depth=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, [0, -1], norm=True)
        early = m.forward_intermediates(x, [0], norm=True, intermediates_only=True)
        assert torch.equal(final, m.forward_features(x)) and torch.equal(inter[1], final)
        assert torch.equal(early[0], inter[0])


# --------------------------------------------------------------------------- optimizer groups
def test_distillation_token_is_an_undecayed_embedding_in_the_optimizer_groups():
    """DeiT's dist_token is a prefix token like cls_token: no weight decay, and with layer-wise
    lr decay the embeddings' scale (layer 0), not the head's."""
    from vitkit.train.optim import param_groups

    m = ViT(ViTConfig(**{**TINY, "dist_token": True}))
    groups = param_groups(m, 0.05, layer_decay=0.5)
    where = {n: g for g in groups for n in g["names"]}
    assert where["dist_token"]["weight_decay"] == 0.0
    assert where["dist_token"]["lr_scale"] == where["cls_token"]["lr_scale"] == 0.5 ** (m.config.depth + 1)


# --------------------------------------------------------------------------- one table per fact
def test_activation_table_matches_the_modules_and_the_peers():
    """config.ACTIVATION_NAMES is the one list of activations: make_act builds each name, and every
    transformers / timm name it gives computes the same function as vitkit's module (oracles:
    transformers' ACT2FN and timm's get_act_layer); the interop lookups are derived from it."""
    from vitkit.config import ACTIVATION_NAMES, ACTIVATIONS
    from vitkit.interop import hf_common
    from vitkit.interop import timm as timm_mod
    from vitkit.model.block import ACT_MODULES, make_act

    assert list(ACT_MODULES) == list(ACTIVATIONS) == list(ACTIVATION_NAMES)
    x = torch.linspace(-6, 6, 241)
    ACT2FN = pytest.importorskip("transformers.activations").ACT2FN
    get_act_layer = pytest.importorskip("timm.layers").get_act_layer
    for act, names in ACTIVATION_NAMES.items():
        want = make_act(act)(x)
        for hf in names.hf:
            torch.testing.assert_close(ACT2FN[hf](x), want, atol=1e-6, rtol=1e-5, msg=f"{act} vs HF {hf}")
            assert hf_common.hf_act(hf) == act
        for t in names.timm:
            torch.testing.assert_close(get_act_layer(t)()(x), want, atol=1e-6, rtol=1e-5, msg=f"{act} vs timm {t}")
            assert timm_mod.act_from_args({"act_layer": t}, None, "x", []) == act
        if names.hf:
            assert hf_common.act_back(act) == names.hf[0]


def test_one_require_names_the_package_and_the_extra(monkeypatch):
    import importlib

    from vitkit.deps import require
    from vitkit.errors import ConfigError

    assert require("json", "reading", "data").dumps([1]) == "[1]"
    real = importlib.import_module

    def missing(name, *a, **k):
        if name.startswith("faiss"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ConfigError, match=r"^the ivf search backend needs faiss-cpu, which is not installed: "
                                          r"pip install 'vitkit\[features\]'"):
        require("faiss", "the ivf search backend", "features")


def test_imagenet_statistics_have_one_source():
    from vitkit.data import transforms
    from vitkit.interop import deit, dinov2, dinov3
    from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD

    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's
    assert transforms.IMAGENET_MEAN is IMAGENET_MEAN and transforms.IMAGENET_STD is IMAGENET_STD
    for fam in (deit, dinov2, dinov3):
        assert fam.PREPROCESS["mean"] == list(IMAGENET_MEAN) and fam.PREPROCESS["std"] == list(IMAGENET_STD)
