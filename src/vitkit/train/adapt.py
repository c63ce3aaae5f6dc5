"""Cheap adaptation of a pretrained ViT: LoRA through Hugging Face ``peft`` (``--lora RANK``), which
parameters train (``--train-only``), the linear probe on features computed once, and the
trainable-parameter / optimizer-memory line every run prints.

LoRA targets (``--lora-targets``, comma-separated, inside the encoder blocks only):

    qkv        one LoRA of rank R on the fused (3D x D) qkv projection, as one Linear
    q,k,v      three LoRAs of rank R each, one per slice of the fused qkv (the query, key and value rows):
               peft's block-diagonal LoRA (BD-LoRA, ``use_bdlora``) with LoRA-B block-diagonal in 3 blocks
               and total rank 3R: delta_W = blockdiag(B_q, B_k, B_v) @ [A_q; A_k; A_v], i.e. exactly
               B_q A_q on the query rows, B_k A_k on the key rows, B_v A_v on the value rows, each scaled
               alpha / R (peft's alpha is set to 3 alpha for its rank 3R). One dropout mask is shared by
               the three. A subset (q,v) is not expressible this way and is refused.
    proj       the attention output projection
    fc1, fc2   the MLP's two Linear layers

What trains with LoRA: the adapters and the head (``--train-only auto`` / ``head``), or also every
norm and bias (``norms+head``, peft's ``bias="all"``). The head (and norms) are peft
``modules_to_save``, so the adapter directory holds everything that differs from the base.

A LoRA run's ``best/`` and ``last/`` hold the merged model (peft's ``merge_and_unload``: a plain ViT
that ``vitkit predict / eval / embed`` read as any run) and, in ``adapter/`` beside it, the peft
adapter of the same weights (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, RUN/best/adapter)`` loads onto the base: the ``--pretrained``
model built at the run's input size and classes (what :func:`base_for_run` builds).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

ADAPTER_DIR = "adapter"  # beside a LoRA run's merged weights: best/adapter, last/adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names (peft.utils.constants)
# --lora-targets: the Linear layers of the encoder blocks each name stands for (peft matches a string
# target_modules with re.fullmatch on the module's name: blocks.N.<layer>)
LORA_LAYERS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
QKV_SLICES = ("q", "k", "v")
TRAIN_ONLY = ("auto", "all", "head", "norms+head", "last:N", "probe")
_AFTER_BLOCKS = ("norm.", "fc_norm.", "attn_pool.", "pre_logits.", "head.", "head_dist.")  # what last:N trains too
_NORMS = (nn.LayerNorm, nn.RMSNorm)


# --------------------------------------------------------------------------- options
def parse_targets(text: str) -> tuple[list[str], bool]:
    """``--lora-targets`` -> (layer names among LORA_LAYERS, whether qkv is split into q,k,v)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    known = (*LORA_LAYERS, *QKV_SLICES)
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise ConfigError(f"lora_targets must be a comma-separated list of {', '.join(known)}, got {text!r}")
    slices = [n for n in names if n in QKV_SLICES]
    if slices and sorted(slices) != sorted(QKV_SLICES):
        raise ConfigError(f"lora_targets {text!r}: q, k and v are slices of one fused qkv Linear and take LoRA "
                          "together (peft's block-diagonal LoRA, one block each); use q,k,v or qkv")
    if slices and "qkv" in names:
        raise ConfigError(f"lora_targets {text!r}: qkv (one LoRA on the fused layer) and q,k,v (one per slice) "
                          "exclude each other")
    layers = [n for n in LORA_LAYERS if n in names or (n == "qkv" and slices)]
    return layers, bool(slices)


def parse_train_only(text: str) -> tuple[str, int]:
    """``--train-only`` -> (mode, N for last:N else 0)."""
    if text.startswith("last:"):
        n = text[5:]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"train_only last:N needs a block count N >= 1, got {text!r}")
        return "last", int(n)
    if text not in TRAIN_ONLY:
        raise ConfigError(f"train_only must be one of {', '.join(TRAIN_ONLY)}, got {text!r}")
    return text, 0


def check_options(cfg) -> None:
    """The adaptation options of a TrainConfig, checked before anything is built (build_run's first
    step; TrainConfig checks the numbers' ranges, and cannot import this module: it reads runs)."""
    mode, _ = parse_train_only(cfg.train_only)
    parse_targets(cfg.lora_targets)
    if (cfg.lora or mode not in ("auto", "all")) and not cfg.pretrained:
        what = f"--lora {cfg.lora}" if cfg.lora else f"--train-only {cfg.train_only}"
        raise ConfigError(f"{what} adapts pretrained weights (a frozen random backbone learns little): it needs "
                          "--pretrained SRC")
    if cfg.lora and mode not in ("auto", "head", "norms+head"):
        raise ConfigError(f"--train-only {cfg.train_only} cannot combine with --lora {cfg.lora}: with LoRA the "
                          "adapters train with the head (auto, head) or with the head, norms and biases (norms+head)")


# --------------------------------------------------------------------------- building
def adapt_model(cfg, model: nn.Module):
    """Freeze ``model`` for ``--train-only`` and, with ``--lora``, inject peft's LoRA layers in place
    (the ViT stays the module that trains). Returns the peft model (None without LoRA)."""
    mode, n = parse_train_only(cfg.train_only)
    if cfg.lora:
        return _inject_lora(cfg, model, norms=mode == "norms+head")
    if mode in ("auto", "all"):
        return None
    depth = len(model.blocks)
    if mode == "last" and n > depth:
        raise ConfigError(f"--train-only last:{n}: the model has {depth} blocks")
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
    first = depth - n
    for name, p in model.named_parameters():
        head = name.startswith(("head.", "head_dist."))
        if mode in ("head", "probe"):
            p.requires_grad_(head)
        elif mode == "norms+head":  # BitFit (Ben Zaken et al. 2022) with the norms, as timm's fine-tuning does
            p.requires_grad_(head or id(p) in norm_params or name.endswith(".bias"))
        else:  # last:N
            p.requires_grad_(name.startswith(_AFTER_BLOCKS) or
                             (name.startswith("blocks.") and int(name.split(".")[1]) >= first))
    return None


def lora_config(cfg, model: nn.Module, *, norms: bool = False):
    """peft's LoraConfig for ``cfg``'s LoRA options on ``model``, every target and rank checked."""
    from ..deps import require

    peft = require("peft", "--lora", "adapt")
    layers, split = parse_targets(cfg.lora_targets)
    rank, alpha = cfg.lora, cfg.lora_alpha or cfg.lora
    names = dict(model.named_modules())
    pattern = r"blocks\.\d+\.(" + "|".join(re.escape(LORA_LAYERS[t]) for t in layers) + ")"
    for t in layers:
        found = [(k, m) for k, m in names.items() if re.fullmatch(r"blocks\.\d+\." + re.escape(LORA_LAYERS[t]), k)]
        if not found or not all(isinstance(m, nn.Linear) for _, m in found):
            raise ConfigError(f"--lora-targets {t}: expected a Linear layer blocks.N.{LORA_LAYERS[t]} "
                              f"in this model, got {'a ' + type(found[0][1]).__name__ if found else 'none'}")
        name, m = found[0]
        out = m.out_features // 3 if (t == "qkv" and split) else m.out_features
        side = min(m.in_features, out)
        if rank > side:
            what = f"each {out}x{m.in_features} slice of {name}" if (t == "qkv" and split) else \
                f"{name} ({m.out_features}x{m.in_features})"
            raise ConfigError(f"--lora {rank} is larger than {what}'s smaller side {side}: a rank at most {side}")
    save = [k for k in ("head", "head_dist") if isinstance(names.get(k), nn.Linear)]
    if norms:
        save += [k for k, m in names.items() if isinstance(m, _NORMS) and any(True for _ in m.parameters())]
    kw: dict[str, Any] = {}
    if split:  # q,k,v: rank 3R on the fused layer, B block-diagonal in 3 (module docstring)
        kw = dict(rank_pattern={re.escape("attn.qkv"): 3 * rank}, alpha_pattern={re.escape("attn.qkv"): 3 * alpha},
                  use_bdlora=peft.tuners.lora.config.BdLoraConfig(target_modules_bd_b=["attn.qkv"], nblocks=3,
                                                                    match_strict=False))
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=pattern,
                           modules_to_save=save, bias="all" if norms else "none", **kw)


def _inject_lora(cfg, model: nn.Module, *, norms: bool):
    from ..deps import require

    peft = require("peft", "--lora", "adapt")
    conf = lora_config(cfg, model, norms=norms)
    return peft.get_peft_model(model, conf)


def base_for_run(run_dir: str | Path):
    """A LoRA run's base model: its ``--pretrained`` source at the run's input size and classes, the
    model its adapter applies to (the head is the adapter's). Read from RUN/config.yaml and best/."""
    from ..interop.vitkit_format import model_dir, read_meta
    from .arch import load_pretrained
    from .resume import read_run_config

    opts = read_run_config(run_dir)
    d = model_dir(run_dir)
    if d is None:
        raise CheckpointError(f"{run_dir} has no saved weights (best/ or last/)")
    c = read_meta(d)["config"]
    size = c["image_size"] if isinstance(c["image_size"], (list, tuple)) else (c["image_size"], c["image_size"])
    data = SimpleNamespace(num_outputs=c["num_classes"], image_hw=tuple(size), in_channels=c["in_channels"],
                           task=c.get("task", "classification"))
    return load_pretrained(opts["pretrained"], data).eval(), d


def merge_lora_run(run_dir: str | Path):
    """``vitkit export --merge-lora RUN``: the run's adapter (best/adapter) loaded by peft onto its base
    and merged (``merge_and_unload``): a plain ViT with the run's labels and preprocessing."""
    from ..deps import require
    from ..interop.vitkit_format import model_dir, read_meta

    d = model_dir(run_dir)
    if d is None or not (d / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--merge-lora {run_dir}: expected a run trained with --lora (with "
                          f"best/{ADAPTER_DIR}/{ADAPTER_CONFIG}), got a model without a LoRA adapter; export it "
                          "without --merge-lora")
    peft = require("peft", "--merge-lora", "adapt")
    base, d = base_for_run(run_dir)
    merged = peft.PeftModel.from_pretrained(base, str(d / ADAPTER_DIR)).merge_and_unload()
    meta = read_meta(d)
    merged.labels, merged.preprocess_cfg, merged.pretrained_info = (meta.get("labels"), meta.get("preprocess"),
                                                                     meta.get("pretrained_info"))
    return merged.eval()


# --------------------------------------------------------------------------- saving
def save_lora(peft_model, weights_src: nn.Module, directory: str | Path, which: str) -> None:
    """``directory``: the merged model of ``weights_src`` (the training model or its EMA copy, both
    LoRA-injected ViTs) in vitkit's format, and its peft adapter in ``directory/adapter``."""
    from peft import get_peft_model_state_dict

    from ..io import atomic_write_text, save_pretrained, save_state_dict

    directory = Path(directory)
    copy_ = copy.deepcopy(peft_model)
    if weights_src is not peft_model.get_base_model():
        copy_.get_base_model().load_state_dict(weights_src.state_dict())
    conf = copy_.peft_config["default"]
    out = directory / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    # what PeftModel.save_pretrained writes, through vitkit's one writer (atomic, in the run's manifest)
    save_state_dict(get_peft_model_state_dict(copy_), out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    d = conf.to_dict()
    d["inference_mode"] = True
    d = {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(d, indent=2, sort_keys=True) + "\n")
    plain = copy_.merge_and_unload()
    save_pretrained(plain, directory, weights=which, lora={"rank": conf.r, "adapter": ADAPTER_DIR})


# --------------------------------------------------------------------------- counts
def param_summary(model: nn.Module) -> str:
    """"trainable 0.30M / 22.1M params (1.36%), optimizer state 2.4 MB": AdamW keeps two fp32-sized
    moments (exp_avg, exp_avg_sq) per trainable element, in the parameter's dtype."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    train = [p for p in params if p.requires_grad]
    n = sum(p.numel() for p in train)
    state = sum(2 * p.numel() * p.element_size() for p in train)
    return (f"trainable {_m(n)} / {_m(total)} params ({100 * n / max(total, 1):.2f}%), "
            f"optimizer state {state / 1e6:.1f} MB")


def _m(n: int) -> str:
    return f"{n:,}" if n < 100_000 else f"{n / 1e6:.2f}M" if n < 10e6 else f"{n / 1e6:.1f}M"


# --------------------------------------------------------------------------- linear probe
class FeatureDataset(torch.utils.data.Dataset):
    """Cached backbone features (N, D) and their targets, read by vitkit's loader like in-memory images
    (``read_batch``: one gather per batch; no resize, no normalisation)."""

    in_memory = True

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets
        self.image_hw = (1, features.shape[1])  # unused on the in-memory path; the loader reads it

    def __len__(self) -> int:
        return len(self.features)

    def read(self, i: int):
        return self.features[i], self.targets[i]

    def read_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.features[idx], self.targets[idx]

    def __getitem__(self, i: int):
        return self.read(i)


class ProbeHead(nn.Module):
    """What a ``--train-only probe`` step calls: cached pre-logits features (B, D) -> logits (B, K)
    through the model's own head (and head dropout)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.head_drop(features))


@torch.no_grad()
def probe_features(model: nn.Module, dataset, *, mean, std, device: torch.device, workers, batch_size: int = 256,
                   amp: torch.dtype | None = None) -> FeatureDataset:
    """The frozen backbone's pre-logits features of every training image, computed once through the
    evaluation loader (no augmentation, in order), kept on the host."""
    from ..eval.evaluate import eval_loader, normalize

    if getattr(model, "dist_token", None) is not None:
        raise ConfigError("--train-only probe: a model with a distillation token has two heads on two tokens; "
                          "use --train-only head")
    was = model.training
    model.eval()
    feats, ys = [], []
    for batch in eval_loader(dataset, batch_size, workers=workers, device_type=device.type):
        if batch is None:  # every image of the batch skipped (--skip-bad-images)
            continue
        x, y = batch
        x = normalize(x.to(device), mean, std)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(f.float().cpu())
        ys.append(y)
    model.train(was)
    return FeatureDataset(torch.cat(feats), torch.cat(ys))
