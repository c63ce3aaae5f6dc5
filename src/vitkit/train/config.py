"""TrainConfig: everything one training run needs, in one typed dataclass.

It is filled from defaults, then ``--config file.yaml|json``, then ``--key value`` overrides
(type-checked; unknown keys are rejected with a suggestion), and saved as ``config.yaml`` in the
run directory so a run can be reproduced or resumed from its files alone. A resume never rewrites it:
the options it may change are appended to ``amendments.yaml``, the rest refused, and the run's
effective config is both files together (:mod:`vitkit.train.resume`). How a value is checked and a
recipe file read safely: :mod:`vitkit.train.options`.

The defaults are the digits recipe measured in ``benchmarks/train_digits.md``: a 4-block, 32-wide
ViT on the 8x8 digits upsampled to 16x16 with 4x4 patches (16 tokens), sin-cos 2-D position
embedding, mean pooling, random affine augmentation (10 degrees, 10 % translate and scale: on the
16x16 grid it moves strokes without the blur it caused at 8x8; image files default to RandomResizedCrop
+ flips per image instead, :class:`vitkit.data.augment.AugmentChoice`), label smoothing 0.1, stochastic depth 0.1, AdamW (lr 3e-3, batch 64), 3 warm-up epochs + cosine over
150 epochs, EMA 0.99, and the final weights reported (``select="final"``: the EMA or the raw model,
whichever validates better).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.registry import dataset_names
from ..errors import ConfigError
from .options import coerce, load_yaml, short

# From-scratch architecture when a field is not given (the digits recipe, benchmarks/train_digits.md).
ARCH_DEFAULTS: dict[str, Any] = {"dim": 32, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "pos_embed": "sincos2d",
                                 "pooling": "mean", "fc_norm": False}
ARCH_FIELDS = ("patch_size", *ARCH_DEFAULTS)  # what --pretrained fixes and --model presets set
# Where a run writes is chosen per invocation, never by a recipe (a run's saved config.yaml reused as
# a recipe must not train into that run): save() omits these and read_config_file() drops them.
NOT_RECIPE = ("out", "overwrite")
# Options of one invocation only: never saved with a run (a run started with --max-steps 2 and resumed
# without it runs to its --epochs), never compared on --resume.
PER_INVOCATION = (*NOT_RECIPE, "max_steps")
DATASETS = dataset_names()
DISTILL_MODES = ("soft", "hard", "token", "token-soft", "feature")  # --distill: vitkit.train.distill
# Options an older vitkit saved that no longer exist: a saved run or recipe that sets one still loads and
# resumes, the option dropped with a note saying why (drop_removed).
REMOVED = {"cpu_linear": "the oneDNN fp32 training kernels were removed: 0.97x timm's step on an Intel AMX CPU, "
                         "BENCHMARKS.md"}


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- data
    dataset: str = field(default="digits", metadata={
        "help": f"dataset: one of {', '.join(DATASETS)} (see docs/training.md)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "where the dataset files are: torchvision datasets; imagefolder DIR/train/<class>/ (+ val/, test/) "
                "or a flat DIR/<class>/ (validation held out of it); webdataset DIR/train-*.tar or DIR/train/*.tar "
                "(+ val, test likewise); a csv file or its dir; an hf dataset dir"})
    download: bool = field(default=False, metadata={"help": "download torchvision datasets into --data-dir"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "fraction held out for validation when the dataset has no val split (stratified, seeded)"})
    test_fraction: float = field(default=0.2, metadata={
        "help": "digits only: fraction held out as the test split (stratified, seeded)"})
    subset: int = field(default=0, metadata={"help": "use only the first N training images (0 = all; for smoke tests)"})
    image_size: int = field(default=0, metadata={
        "help": "model input size (0 = the dataset's default: 16 for digits (8x8 upsampled), 28 mnist, 32 cifar; "
                "files: their common size, else 224)"})
    preprocess: str = field(default="auto", metadata={
        "help": "auto: with --pretrained, the model's own preprocessing (mean / std, interpolation, crop) at the run's "
                "input size, also saved as the run's; else the data's | data: the data's mean / std and a bilinear "
                "resize, --pretrained too"})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "log and skip unreadable images instead of stopping with the file's path"})
    target_columns: str | None = field(default=None, metadata={
        "help": "csv: comma-separated target column names (default: every column but the first)"})
    allow_absolute_paths: bool = field(default=False, metadata={
        "help": "csv: accept image paths outside the CSV's folder (absolute or ../)"})
    allow_empty_classes: bool = field(default=False, metadata={
        "help": "imagefolder: accept an empty class folder (a class with no training images)"})
    image_column: str = field(default="image", metadata={"help": "hf: the image column"})
    label_column: str = field(default="label", metadata={"help": "hf: the label column"})
    workers: int | None = field(default=None, metadata={
        "help": "DataLoader worker processes for file datasets (default: CPU cores per local rank - 1, at most "
                "16; 0 = read in the training process). In-memory datasets (digits, mnist, cifar) never need workers"})
    # ---------------------------------------------------------------- model
    model: str | None = field(default=None, metadata={
        "help": "preset name (vit_tiny_patch16_224 ...) instead of the width/depth fields below"})
    pretrained: str | None = field(default=None, metadata={
        "help": "fine-tune from weights (vitkit dir, or any source vitkit.from_pretrained accepts); head re-initialised"})
    zeroshot_head: bool = field(default=False, metadata={
        "help": "with --pretrained CLIP / SigLIP (both towers): start the classifier from the class names' text "
                "embeddings (the zero-shot head, as WiSE-FT / FLYP fine-tuning starts) instead of at random"})
    zeroshot_templates: str = field(default="simple", metadata={
        "help": "--zeroshot-head / --teacher-zeroshot prompts: simple | imagenet | imagenet7 | a template with {} | "
                "a file (see `vitkit zeroshot --help`)"})
    # Cheap adaptation (vitkit.train.adapt; docs/training.md, "LoRA and partial fine-tuning")
    lora: int = field(default=0, metadata={
        "help": "LoRA rank through peft (0 = off; needs --pretrained): adapters on --lora-targets train, the "
                "pretrained weights stay frozen; best/ holds the merged model, best/adapter/ peft's adapter"})
    lora_alpha: float = field(default=0.0, metadata={
        "help": "LoRA scale numerator: the update is (alpha / rank) * B A (0 = the rank, i.e. scale 1)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_targets: str = field(default="qkv", metadata={
        "help": "comma-separated layers of every block that get LoRA: qkv (the fused qkv Linear, one LoRA), "
                "proj, fc1, fc2; or q,k,v: one rank-R LoRA per slice of the fused qkv (peft's block-diagonal "
                "LoRA, total rank 3R; a subset such as q,v is refused)"})
    train_only: str = field(default="auto", metadata={
        "help": "what trains (needs --pretrained unless all): auto (everything; with --lora the adapters and the "
                "head) | all | head | norms+head (BitFit: every norm and bias, and the head) | last:N (the last N "
                "blocks, the final norm and the head) | probe (a linear probe: the frozen backbone's features "
                "computed once, then only the head trains, without augmentation)"})
    # Architecture: None = not given. From scratch that means ARCH_DEFAULTS (patch size: chosen from the
    # image size, see vitkit.train.arch.auto_patch_size); with --model PRESET, the preset's (a value
    # given overrides it); with --pretrained, the model's own (a value it does not have is an error).
    patch_size: int | None = field(default=None, metadata={
        "help": "patch side in pixels (default: 4 for digits at 16x16, else the smallest that keeps at most 256 "
                "tokens, e.g. 2 for 32x32, 16 for 224x224)"})
    dim: int | None = field(default=None, metadata={"help": "token width (default 32)"})
    depth: int | None = field(default=None, metadata={"help": "number of encoder blocks (default 4)"})
    num_heads: int | None = field(default=None, metadata={"help": "attention heads (default 4)"})
    mlp_ratio: float | None = field(default=None, metadata={"help": "MLP hidden width / token width (default 2)"})
    pos_embed: str | None = field(default=None, metadata={"help": "learned | sincos1d | sincos2d | none (default sincos2d)"})
    pooling: str | None = field(default=None, metadata={"help": "mean (of patch tokens) | cls (class token) (default mean)"})
    fc_norm: bool | None = field(default=None, metadata={
        "help": "mean pooling: final LayerNorm after pooling (timm's layout) instead of before (default off)"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "activation checkpointing of the blocks: less memory, ~30%% more compute, same gradients"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate (max over depth)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate"})
    num_classes: int = field(default=0, metadata={
        "help": "number of classes / regression targets (0 = from the data; a mismatch is an error)"})
    # ---------------------------------------------------------------- distillation (vitkit.train.distill)
    teacher: str | None = field(default=None, metadata={
        "help": "distil from this model: any source vitkit.from_pretrained reads (a vitkit run, timm, Hugging Face, "
                "DINOv2, CLIP ...); frozen, eval mode, bf16 where the CPU has it natively"})
    teacher_zeroshot: bool = field(default=False, metadata={
        "help": "--teacher is an image-text model (CLIP / SigLIP): the teacher is the zero-shot classifier of the "
                "dataset's class names (--zeroshot-templates)"})
    distill: str = field(default="soft", metadata={
        "help": "with --teacher: soft (KL at --distill-temperature, x T^2) | hard (the teacher's argmax) | token "
                "(DeiT's distillation token, hard; token-soft: soft) | feature (cosine to the teacher's pooled "
                "features through a learned projection; no class match needed)"})
    distill_alpha: float = field(default=0.5, metadata={
        "help": "weight of the distillation loss: (1 - alpha) * label loss + alpha * distillation loss"})
    distill_temperature: float = field(default=1.0, metadata={"help": "soft / token-soft: the softmax temperature"})
    teacher_cache: bool = field(default=False, metadata={
        "help": "compute the teacher's outputs once per training image before the first step (needs --no-augment)"})
    unlabeled: str | None = field(default=None, metadata={
        "help": "with --teacher: a folder of images without labels (any layout, searched recursively) added to the "
                "training set, the teacher's outputs their only target (the label loss skips them): the teacher "
                "labels the images you have no labels for. Image-file data (--dataset imagefolder); no MixUp / CutMix"})
    # ---------------------------------------------------------------- optimisation
    epochs: int = field(default=150, metadata={
        "help": "training epochs (the digits default: 150; benchmarks/train_digits.md)"})
    batch_size: int = field(default=64, metadata={"help": "global batch size (split across ranks)"})
    accum_steps: int = field(default=1, metadata={"help": "gradient accumulation steps per optimizer step"})
    lr: float = field(default=0.0, metadata={
        "help": "peak learning rate (AdamW) (default 0 = auto, scaled by sqrt(batch / 64) and logged: 3e-3 from scratch, "
                "1e-4 fine-tuning --pretrained weights, 1e-3 when they stay frozen (--lora, --train-only head / "
                "norms+head / probe); vitkit.train.finetune)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine decay"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (never on norms, biases, position embeddings, prefix tokens)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_epochs: float = field(default=3.0, metadata={"help": "linear warmup length in epochs"})
    layer_decay: float = field(default=0.0, metadata={
        "help": "layer-wise lr decay (1.0 = off; default 0 = auto: 0.75 fine-tuning every --pretrained weight, else off)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip gradient global norm (0 = off)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing for cross-entropy"})
    loss: str = field(default="auto", metadata={"help": "auto | ce | mse | l1 (auto: ce for classes, mse for csv)"})
    ema: bool = field(default=True, metadata={"help": "keep an EMA of the weights and evaluate it too"})
    ema_decay: float = field(default=0.99, metadata={
        "help": "EMA decay per optimizer step, at most 1 - 10/total steps (the EMA averages over at most a tenth "
                "of the run; the default digits run keeps 0.99)"})
    select: str = field(default="final", metadata={
        "help": "which weights become best/ (and are tested): final = where the schedule ends (the model or, with "
                "--ema, its EMA: whichever is better on validation), best = the epoch best on validation (model or EMA). On digits' 179 validation images "
                "'best' picks noise: final tested higher over seeds (benchmarks/train_digits.md)"})
    # ---------------------------------------------------------------- augmentation
    augment: bool = field(default=True, metadata={"help": "training augmentation on/off (all pieces below)"})
    # None = the default of the kind of data (vitkit.data.augment.DEFAULT_AFFINE): the digits recipe's batch
    # affine on in-memory small images, none on image files (they get --random-resized-crop and flips per image)
    affine_degrees: float | None = field(default=None, metadata={
        "help": "batch random affine: rotation range +-degrees (default: 10 for in-memory data (digits, mnist, "
                "cifar), 0 for image files)"})
    affine_translate: float | None = field(default=None, metadata={
        "help": "batch random affine: translation, fraction of size (default: 0.1 in memory, 0 for image files)"})
    affine_scale: float | None = field(default=None, metadata={
        "help": "batch random affine: scale range 1 +- this (default: 0.1 in memory, 0 for image files)"})
    affine_shear: float = field(default=0.0, metadata={"help": "random shear range +-degrees"})
    hflip: str = field(default="auto", metadata={
        "help": "horizontal flips: auto (on for natural images, off for digits/mnist/csv) | on | off"})
    random_resized_crop: bool | None = field(default=None, metadata={
        "help": "RandomResizedCrop (scale 0.35-1) per image in the loader's workers instead of a plain resize "
                "(default: on for image files (imagefolder, csv, webdataset, hf), off for in-memory data)"})
    auto_augment: str = field(default="none", metadata={"help": "none | randaugment | trivialaugment (uint8 images)"})
    random_erasing: float = field(default=0.0, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "MixUp alpha (0 = off)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0 = off)"})
    # ---------------------------------------------------------------- system
    seed: int = field(default=0, metadata={"help": "random seed (data split, init, order, augmentation)"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (bit-exact resume on CPU)"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0 = every core, less the loader's workers' cores when the model's step is light, "
                "under 1 GFLOP an image: said in the log; 1 is faster when other jobs share the cores)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    amp: str = field(default="auto", metadata={
        "help": "auto | off | bf16 (CUDA or CPU autocast) | fp16 (CUDA, with a grad scaler). auto: on a CPU with native "
                "bf16 matmuls (AVX-512-BF16, AMX) bf16 autocast where a few forward + backward steps of the model at "
                "hand measure it >= 1.1x the fp32 step (the log says the ratio; saved with the run, a resume keeps "
                "it), else fp32; fp32 on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA or CPU; the first steps compile)"})
    strategy: str = field(default="ddp", metadata={"help": "ddp | fsdp when launched with torchrun"})
    eval_every: int = field(default=1, metadata={"help": "validate every N epochs (and always on the last)"})
    out: str | None = field(default=None, metadata={
        "help": "run directory, new or empty (default: a fresh runs/<timestamp>-<suffix>); never saved in config.yaml"})
    overwrite: bool = field(default=False, metadata={
        "help": "let --out replace an existing run directory (its files are deleted first); never saved"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard events (needs tensorboard)"})
    max_steps: int = field(default=0, metadata={
        "help": "stop this invocation after N optimizer steps (0 = no limit), saving the state: a later --resume "
                "continues the run to its --epochs; never saved in config.yaml"})
    progress: bool = field(default=True, metadata={"help": "progress bars (plain periodic lines when stderr is not a terminal)"})
    log_every: int = field(default=25, metadata={
        "help": "read loss / accuracy from the device every N steps (progress bar, non-finite check; under "
                "torchrun also the stop-signal check): the only host syncs between epoch ends"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in options:
                close = difflib.get_close_matches(str(v)[:100], options, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{name} must be one of {list(options)}, got {short(v)}{hint}")

        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), f.type, f.name))
        choice("dataset", DATASETS)
        if self.pos_embed is not None:
            choice("pos_embed", ("learned", "sincos1d", "sincos2d", "none"))
        if self.pooling is not None:
            choice("pooling", ("mean", "cls"))
        choice("loss", ("auto", "ce", "mse", "l1"))
        choice("hflip", ("auto", "on", "off"))
        choice("select", ("final", "best"))
        choice("auto_augment", ("none", "randaugment", "trivialaugment"))
        choice("amp", ("auto", "off", "bf16", "fp16"))
        choice("strategy", ("ddp", "fsdp"))
        choice("preprocess", ("auto", "data"))
        choice("distill", DISTILL_MODES)
        for name in ("epochs", "batch_size", "accum_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_fraction", "test_fraction", "label_smoothing", "drop_path", "dropout", "random_erasing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1] (0 = auto), got {self.layer_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("patch_size", "dim", "depth", "num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ConfigError("amp fp16 needs CUDA (it relies on a grad scaler); on the CPU use --amp bf16")
        if self.lr < 0:
            raise ConfigError(f"lr must be positive (0 = auto), got {self.lr}")
        if self.lora < 0 or self.lora_alpha < 0:  # the targets and --train-only: vitkit.train.adapt.check_options
            raise ConfigError(f"lora and lora_alpha must be >= 0, got {self.lora} and {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.zeroshot_head and not self.pretrained:
            raise ConfigError("zeroshot_head starts the classifier from an image-text model's text tower: it needs "
                              "--pretrained CLIP_OR_SIGLIP_SOURCE")
        self._check_distill()

    def _check_distill(self) -> None:
        if not self.teacher:
            given = [f"--{k.replace('_', '-')}" for k, v in (("teacher_zeroshot", False), ("distill", "soft"),
                     ("distill_alpha", 0.5), ("distill_temperature", 1.0), ("teacher_cache", False),
                     ("unlabeled", None))
                     if getattr(self, k) != v]
            if given:
                raise ConfigError(f"{', '.join(given)} {'says' if len(given) == 1 else 'say'} how to distil from a "
                                  "teacher: add --teacher SRC")
            return
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be positive, got {self.distill_temperature}")
        if self.teacher_zeroshot and self.distill == "feature":
            raise ConfigError("--teacher-zeroshot makes the teacher a classifier of the class names; --distill feature "
                              "reads its image features instead: leave out --teacher-zeroshot")
        if self.unlabeled and (self.mixup > 0 or self.cutmix > 0):
            raise ConfigError(f"--unlabeled images have no label to mix: MixUp / CutMix (--mixup {self.mixup:g}, "
                              f"--cutmix {self.cutmix:g}) mix labels; set both to 0 with --unlabeled")
        if self.distill in ("token", "token-soft") and self.pooling == "mean":
            raise ConfigError(f"--distill {self.distill} reads DeiT's class and distillation tokens: it needs class-token "
                              "pooling, got --pooling mean (leave it out: token distillation sets --pooling cls)")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a TrainConfig must be a mapping, got {type(data).__name__}")
        check_keys(data)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        return cls.from_dict({**read_config_file(path), **overrides})

    def save(self, path: str | Path) -> Path:
        """Write the recipe: every option except where to write (``out``, ``overwrite``) and this
        invocation's ``max_steps``, so that ``vitkit train --config OLD_RUN/config.yaml`` starts a new run
        instead of writing into the old one."""
        from ..io import atomic_write_text

        path = Path(path)
        d = {k: v for k, v in self.to_dict().items() if k not in PER_INVOCATION}
        if path.suffix == ".json":
            text = json.dumps(d, indent=2) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(d, sort_keys=False)
        return atomic_write_text(path, text)

    def replace(self, **overrides: Any) -> TrainConfig:
        check_keys(overrides)
        return TrainConfig(**{**self.to_dict(), **overrides})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_keys(data: dict[str, Any]) -> None:
    known = field_names()
    unknown = [k for k in data if k not in known]
    if unknown:
        msgs = []
        for k in unknown:
            if k in REMOVED:
                msgs.append(f"{k} ({REMOVED[k]})")
                continue
            close = difflib.get_close_matches(str(k)[:100].replace("-", "_"), known, n=1)
            msgs.append(short(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown training option(s): {', '.join(msgs)}")


def read_config_file(path: str | Path, *, note=None, removed_note=None) -> dict[str, Any]:
    """Options from a yaml / json recipe. ``out`` / ``overwrite`` in it are dropped (with a note through
    ``note``, default: stderr): pass them on the command line. Options vitkit no longer has are dropped
    too, with a note through ``removed_note`` (default: ``note``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = load_yaml(text, p)
    except ConfigError:
        raise
    except ValueError as e:  # json.JSONDecodeError; yaml.YAMLError is not a ValueError: below
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if note is None:
        import sys

        def note(msg):
            print(msg, file=sys.stderr)

    dropped = [k for k in NOT_RECIPE if k in data and data.pop(k) not in (None, False)]
    if dropped:
        note(f"note: {p} sets {', '.join(dropped)}: ignored (a recipe never says where to write; "
             f"pass --out DIR on the command line)")
    return drop_removed(data, p, removed_note or note)


def drop_removed(data: dict[str, Any], where, note) -> dict[str, Any]:
    """``data`` without the options vitkit no longer has (:data:`REMOVED`), each named through ``note``."""
    for k in [k for k in data if k in REMOVED]:
        note(f"note: {where} sets {k}: ignored ({REMOVED[k]})")
        del data[k]
    return data
