"""TrainConfig: everything one training run needs, in one typed dataclass.

It is filled from defaults, then ``--config file.yaml|json``, then ``--key value`` overrides
(type-checked; unknown keys are rejected with a suggestion), and saved as ``config.yaml`` in the
run directory so a run can be reproduced or resumed from its files alone.

The defaults are the digits recipe measured in ``benchmarks/train_digits.md``: a 4-block, 64-wide
ViT on 2x2 patches of the 8x8 digits (16 tokens), sin-cos 2-D position embedding, mean pooling,
mild random affine augmentation (bilinear resampling blurs 8x8 images: stronger jitter hurt),
label smoothing 0.1, stochastic depth 0.1, AdamW (lr 2e-3, batch 16: more steps beat bigger batches here), warmup + cosine, EMA.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.registry import dataset_names
from ..errors import ConfigError

# From-scratch architecture when a field is not given (the digits recipe, benchmarks/train_digits.md).
ARCH_DEFAULTS: dict[str, Any] = {"dim": 32, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "pos_embed": "sincos2d",
                                 "pooling": "mean", "fc_norm": False}
ARCH_FIELDS = ("patch_size", *ARCH_DEFAULTS)  # what --pretrained / --model fix
DATASETS = dataset_names()


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- data
    dataset: str = field(default="digits", metadata={
        "help": f"dataset: one of {', '.join(DATASETS)} (see docs/training.md)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "where the dataset files are (torchvision datasets, imagefolder root, csv file or its dir)"})
    download: bool = field(default=False, metadata={"help": "download torchvision datasets into --data-dir"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "fraction held out for validation when the dataset has no val split (stratified, seeded)"})
    test_fraction: float = field(default=0.2, metadata={
        "help": "digits only: fraction held out as the test split (stratified, seeded)"})
    subset: int = field(default=0, metadata={"help": "use only the first N training images (0 = all; for smoke tests)"})
    image_size: int = field(default=0, metadata={
        "help": "model input size (0 = the dataset's native size: 8 digits, 28 mnist, 32 cifar, 224 others)"})
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
        "help": "DataLoader worker processes for file datasets (default: CPU cores - 1, at most 8; 0 = read in "
                "the training process). In-memory datasets (digits, mnist, cifar) never need workers"})
    # ---------------------------------------------------------------- model
    model: str | None = field(default=None, metadata={
        "help": "preset name (vit_tiny_patch16_224 ...) instead of the width/depth fields below"})
    pretrained: str | None = field(default=None, metadata={
        "help": "fine-tune from weights (vitkit dir, or any source vitkit.from_pretrained accepts); head re-initialised"})
    # Architecture: None = not given. From scratch that means ARCH_DEFAULTS (patch size: chosen from the
    # image size, see vitkit.train.build.auto_patch_size); with --pretrained / --model, the model's own
    # value. A value given together with --pretrained / --model that the model does not have is an error.
    patch_size: int | None = field(default=None, metadata={
        "help": "patch side in pixels (default: the smallest that keeps at most 256 tokens, e.g. 2 for 8x8 "
                "digits, 16 for 224x224)"})
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
    # ---------------------------------------------------------------- optimisation
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={"help": "global batch size (split across ranks)"})
    accum_steps: int = field(default=1, metadata={"help": "gradient accumulation steps per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine decay"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (never on norms, biases, position embeddings, prefix tokens)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_epochs: float = field(default=3.0, metadata={"help": "linear warmup length in epochs"})
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise lr decay (1.0 = off; 0.65-0.75 for fine-tuning)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip gradient global norm (0 = off)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing for cross-entropy"})
    loss: str = field(default="auto", metadata={"help": "auto | ce | mse | l1 (auto: ce for classes, mse for csv)"})
    ema: bool = field(default=True, metadata={"help": "keep an EMA of the weights and evaluate it too"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay per optimizer step"})
    # ---------------------------------------------------------------- augmentation
    augment: bool = field(default=True, metadata={"help": "training augmentation on/off (all pieces below)"})
    affine_degrees: float = field(default=5.0, metadata={"help": "random rotation range +-degrees"})
    affine_translate: float = field(default=0.05, metadata={"help": "random translation, fraction of size"})
    affine_scale: float = field(default=0.05, metadata={"help": "random scale range 1 +- this"})
    affine_shear: float = field(default=0.0, metadata={"help": "random shear range +-degrees"})
    hflip: str = field(default="auto", metadata={
        "help": "horizontal flips: auto (on for natural images, off for digits/mnist/csv) | on | off"})
    random_resized_crop: bool = field(default=False, metadata={
        "help": "file datasets: RandomResizedCrop instead of a plain resize"})
    auto_augment: str = field(default="none", metadata={"help": "none | randaugment | trivialaugment (uint8 images)"})
    random_erasing: float = field(default=0.0, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "MixUp alpha (0 = off)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0 = off)"})
    # ---------------------------------------------------------------- system
    seed: int = field(default=0, metadata={"help": "random seed (data split, init, order, augmentation)"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (bit-exact resume on CPU)"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0 = every core; 1 is faster when other jobs share the cores)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    amp: str = field(default="off", metadata={"help": "off | bf16 (CUDA or CPU autocast) | fp16 (CUDA, with a grad scaler)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA or CPU; the first steps compile)"})
    strategy: str = field(default="ddp", metadata={"help": "ddp | fsdp when launched with torchrun"})
    eval_every: int = field(default=1, metadata={"help": "validate every N epochs (and always on the last)"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<timestamp>)"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard events (needs tensorboard)"})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0 = no limit; for tests)"})
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
                close = difflib.get_close_matches(str(v), options, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{name} must be one of {list(options)}, got {v!r}{hint}")

        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), f.type, f.name))
        choice("dataset", DATASETS)
        if self.pos_embed is not None:
            choice("pos_embed", ("learned", "sincos1d", "sincos2d", "none"))
        if self.pooling is not None:
            choice("pooling", ("mean", "cls"))
        choice("loss", ("auto", "ce", "mse", "l1"))
        choice("hflip", ("auto", "on", "off"))
        choice("auto_augment", ("none", "randaugment", "trivialaugment"))
        choice("amp", ("off", "bf16", "fp16"))
        choice("strategy", ("ddp", "fsdp"))
        for name in ("epochs", "batch_size", "accum_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_fraction", "test_fraction", "label_smoothing", "drop_path", "dropout", "random_erasing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("patch_size", "dim", "depth", "num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ConfigError("amp fp16 needs CUDA (it relies on a grad scaler); on the CPU use --amp bf16")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")

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
        from ..io import atomic_write_text

        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
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
            close = difflib.get_close_matches(str(k).replace("-", "_"), known, n=1)
            msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown training option(s): {', '.join(msgs)}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError (a ValueError subclass? no) below
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and gently convert: '3' -> 3 from the command line, 1 -> 1.0) one field value."""
    tp = _resolve(annotation)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        kind = "an int" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be {kind}, got {value!r}")
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):  # from __future__ annotations
        return eval(annotation, {"tuple": tuple, "int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    return annotation
