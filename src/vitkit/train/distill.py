"""Distillation from a teacher: ``vitkit train --teacher SRC --distill MODE``.

    loss = (1 - alpha) * loss(student, labels) + alpha * loss_MODE(student, teacher)      alpha: --distill-alpha

Modes (``--distill``):

* ``soft``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (Hinton et al. 2015,
  "Distilling the Knowledge in a Neural Network"; DeiT's "soft"). DeiT's own code divides the summed KL
  by ``B * K`` instead of ``B``, which is this loss over K; vitkit keeps Hinton's per-sample scale, so
  ``alpha`` weighs two losses of the same size.
* ``hard``: cross-entropy on the teacher's argmax (DeiT's "hard": Touvron et al. 2021, section 5).
* ``token`` / ``token-soft``: DeiT's distillation token. The class head learns the labels, the
  distillation head (``head_dist``, reading ``dist_token``) the teacher, by ``hard`` (DeiT's best) or
  ``soft``; evaluation averages the two heads (the model's eval forward). A student trained from
  scratch gets the token (and class-token pooling); a pretrained student must already have one.
* ``feature``: ``1 - cos(P s, t)`` between the student's pooled features ``s`` (what
  ``forward_head(..., pre_logits=True)`` returns) and the teacher's ``t``, ``P`` a learned Linear when
  the widths differ (part of the training state: saved and resumed in train_state.pt, never exported).
  It needs no class match: any backbone (DINOv2, a CLIP image tower) can teach.

The teacher (:class:`Teacher`) runs without gradients and in eval mode, in bf16 autocast where the
device computes bf16 natively (:func:`vitkit.cpu.bf16_native` on a CPU), else fp32, on the student's own
batch (the same augmentation, MixUp included: function matching, Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent"): the batch is taken back to [0, 1] and given the
teacher's channels, geometry and mean / std, as tensor ops. The geometry is the teacher's own preprocessing
(resize, then its center crop: ``crop_pct``) applied to the student's view as to an image, because that
framing is what the teacher learned: a DINOv2 fine-tune (crop_pct 0.875) on 32 px digits scored 0.844 on
the student's 64 px views squashed to 56 px and 0.891 on them center-cropped to 56, its own validation
figure (benchmarks/adapt.py).
With ``--teacher-cache`` (only where the pass has no random augmentation) the teacher's outputs are
computed once per training image in a fixed pass before the first step and looked up by index; a
resumed run computes the same pass, so resume stays exact.

``--unlabeled DIR``: images without labels join the training set (:func:`vitkit.data.file_datasets.add_unlabeled`,
target ``UNLABELLED``); the teacher's outputs are their only target: the label term is summed over the labelled
rows and divided by all rows (:meth:`Distiller.label_loss`), the distillation term is the mean over all rows.

``--teacher-zeroshot``: SRC is an image-text model (CLIP, SigLIP); the teacher is the zero-shot
classifier of the dataset's class names (:mod:`vitkit.features.zeroshot`, templates from
``--zeroshot-templates``). It is asked for, never guessed from the source: an image-text checkpoint is
also a plain image tower, which ``--distill feature`` reads as such.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from ..data.datasets import UNLABELLED
from ..data.transforms import resize_ops
from ..errors import CheckpointError, ConfigError, InputError, VitkitError
from ..eval.evaluate import normalize

TOKEN_MODES = ("token", "token-soft")


# ------------------------------------------------------------------------------ losses
def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_b KL(softmax(teacher_b / T) || softmax(student_b / T))``; logits (B, K)."""
    T = temperature
    return F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                    reduction="batchmean", log_target=True) * (T * T)


def hard_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's logits (B, K) on the teacher's argmax."""
    return F.cross_entropy(student, teacher.argmax(dim=-1))


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(student_b, teacher_b))``; features (B, D), already of one width."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


# ------------------------------------------------------------------------------ the teacher
def teacher_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (emulated bf16 is slower than fp32), else None (fp32)."""
    from .. import cpu

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu.bf16_native() else None


class Teacher:
    """A frozen model on the student's batches: ``teacher(x)`` -> float32 logits (B, K), in the data's
    class order (``class_index``), or pooled features (B, D) with ``output="features"``.

    ``x`` is the student's batch as the step feeds the student: normalised by the data's ``mean`` /
    ``std`` at the student's size and channels. A plain object, not an ``nn.Module``: nothing can
    register it into the student (its optimizer, EMA, state dict or ``.train()``)."""

    def __init__(self, model: nn.Module, *, output: str, mean, std, in_channels: int, image_hw: tuple[int, int],
                 device: torch.device, class_index: tuple[int, ...] | None = None) -> None:
        from ..preprocess import Preprocess

        self.model = model.to(device).eval().requires_grad_(False)
        self.output = output
        self.dtype = teacher_dtype(device)
        pre = Preprocess.of(model)
        self.channels, self.size = pre.input_size[0], tuple(pre.input_size[1:])
        self.geometry = T.Compose(resize_ops(pre))  # resize + center crop, as the teacher frames an image
        self.crop_pct = pre.crop_pct
        if self.channels != in_channels and 1 not in (self.channels, in_channels):
            raise ConfigError(f"the teacher takes {self.channels}-channel images, the data has {in_channels} "
                              "channels: only grey <-> RGB is converted")
        self.student = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self.mean, self.std = pre.mean, pre.std
        self.same_input = (self.channels == in_channels and self.size == tuple(image_hw) and self.crop_pct == 1
                           and (self.mean, self.std) == self.student)
        self.class_index = None if class_index is None or class_index == tuple(range(len(class_index))) else \
            torch.tensor(class_index, device=device)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch (B, C, H, W) as the teacher's input: back to [0, 1], the teacher's
        channels (grey repeated, or RGB averaged), resize and center crop (antialiased) and mean / std."""
        if self.same_input:
            return x
        m, s = self.student
        x = normalize(x, [-a / b for a, b in zip(m, s)], [1 / b for b in s])  # x * std + mean
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size or self.crop_pct != 1:
            x = self.geometry(x)
        return normalize(x, self.mean, self.std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapt(x)
        with torch.autocast(x.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            if self.output == "features":
                m = self.model
                out = m.forward_head(m.forward_features(x), pre_logits=True)  # (B, D)
            else:
                out = self.model(x)  # (B, K)
        out = out.float()
        return out if self.class_index is None else out[:, self.class_index]

    def fingerprint(self) -> str:
        """A hash of the teacher's weights: a resume checks it is still the teacher the run began with."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def read_teacher(cfg):
    """``--teacher``'s model, read before the data so that an unreadable teacher fails first: a ViT
    (eval mode, with its labels and preprocessing) or, with ``--teacher-zeroshot``, the image-text pair."""
    try:
        if cfg.teacher_zeroshot:
            from ..features.zeroshot import load_pair

            return load_pair(cfg.teacher, needed_for="--teacher-zeroshot")
        from ..interop import from_pretrained

        return from_pretrained(cfg.teacher)
    except (VitkitError, OSError) as e:
        raise ConfigError(f"--teacher {cfg.teacher}: cannot read it as a model ({str(e).strip()[:400]})") from e


def student_config(cfg, pretrained_config):
    """``cfg`` for the student of a token mode: from scratch class-token pooling (the token is added by
    :func:`add_dist_token`); a pretrained student without a distillation token is refused (a new token and
    head beside trained weights is not DeiT's recipe). Other runs: ``cfg`` unchanged."""
    if not (cfg.teacher and cfg.distill in TOKEN_MODES):
        return cfg
    if pretrained_config is None:
        return cfg if cfg.pooling else cfg.replace(pooling="cls")
    if not pretrained_config.dist_token:
        raise ConfigError(f"--distill {cfg.distill} trains DeiT's distillation token, and --pretrained "
                          f"{cfg.pretrained} has none (its weights were trained without one); use --distill soft or "
                          "hard with this student, a student that has one (a DeiT distilled checkpoint), or train "
                          "from scratch (--distill token adds the token)")
    return cfg


def add_dist_token(model):
    """A from-scratch student of the same config with DeiT's distillation token and head (rebuilt:
    the token adds a prefix row to every part that counts prefix tokens)."""
    from ..model.vit import ViT

    if model.dist_token is not None:
        return model
    new = ViT(model.config.replace(dist_token=True))
    new.labels, new.preprocess_cfg, new.pretrained_info = model.labels, model.preprocess_cfg, model.pretrained_info
    if model.grad_checkpointing:
        new.set_grad_checkpointing(True)
    return new


def _teacher_classes(teacher, cfg, data) -> tuple[tuple[int, ...], str | None]:
    """Which teacher output each of the data's classes is (the one label matcher, by name), and its note."""
    from ..data.labels import match_labels

    if data.task != "classification" or not data.classes:
        raise ConfigError(f"--distill {cfg.distill} distils class logits; {data.name} has no classes (task: "
                          f"{data.task}): use --distill feature")
    k = teacher.config.num_classes
    if k <= 0:
        raise ConfigError(f"--teacher {cfg.teacher} has no classifier head (a backbone), so --distill {cfg.distill} "
                          "has no logits to learn from; use --distill feature, or --teacher-zeroshot for a CLIP / "
                          "SigLIP teacher")
    try:
        match = match_labels(teacher.labels, data.classes, num_outputs=k, what="the teacher", map_option=False)
    except InputError as e:
        raise ConfigError(f"--teacher {cfg.teacher}: {e}; --distill feature reads the teacher's features and "
                          "needs no class match") from e
    return match.index, match.note


# ------------------------------------------------------------------------------ the run's distiller
class Distiller:
    """What a run adds to its step with ``--teacher``: the teacher's targets for a micro-batch
    (:meth:`targets`), the combined loss (:meth:`loss`), the feature projection and its saved state."""

    def __init__(self, cfg, teacher: Teacher, student: nn.Module, base_loss: Callable, *,
                 projection: nn.Linear | None, cache: torch.Tensor | None, fingerprint: str) -> None:
        self.mode, self.alpha, self.temperature = cfg.distill, cfg.distill_alpha, cfg.distill_temperature
        self.teacher, self.base_loss, self.projection, self.cache = teacher, base_loss, projection, cache
        self.fingerprint = fingerprint
        self.unlabelled = bool(cfg.unlabeled)  # rows labelled UNLABELLED may come (--unlabeled)
        self._pooled: list[torch.Tensor] = []
        if self.mode == "feature":
            # the student's pooled features of the forward the step runs (one forward, through any
            # DDP / compile wrapper): pre_logits' outputs, one per head read (two with a dist token)
            student.pre_logits.register_forward_hook(self._keep_pooled)
        student.distilled_training = self.mode in TOKEN_MODES

    def _keep_pooled(self, module, args, out) -> None:
        if module.training:  # evaluation's forwards are not the step's
            self._pooled.append(out)

    def targets(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The teacher's outputs for a micro-batch ``x`` (the student's input), from the cache by the
        training rows' ``index`` (``--teacher-cache``) or by running the teacher."""
        if self.cache is not None:
            return self.cache[index.to(self.cache.device)]
        return self.teacher(x)

    def label_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The run's label loss; with --unlabeled summed over the labelled rows and divided by all rows (the
        unlabelled ones add 0, by cross-entropy's ignore_index), so that ``alpha`` weighs the label and the
        distillation term alike on every batch, and a batch of labelled rows only gets the plain mean."""
        if not self.unlabelled:
            return self.base_loss(logits, y)
        return self.base_loss(logits, y, ignore_index=UNLABELLED, reduction="sum") / len(y)

    def loss(self, out, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's logits for its accuracy, the combined loss) for the student's output ``out``
        (token modes: the pair (class logits, distillation logits)), labels ``y``, teacher ``target``."""
        a = self.alpha
        if self.mode in TOKEN_MODES:
            cls, dist = out[0].float(), out[1].float()
            kd = hard_loss(dist, target) if self.mode == "token" else soft_loss(dist, target, self.temperature)
            return (out[0] + out[1]) / 2, (1 - a) * self.label_loss(cls, y) + a * kd
        base = self.label_loss(out.float(), y)
        if self.mode == "feature":
            pooled = torch.stack(self._pooled).mean(dim=0).float()  # (B, D)
            self._pooled.clear()
            kd = feature_loss(self.projection(pooled) if self.projection is not None else pooled, target)
        elif self.mode == "hard":
            kd = hard_loss(out.float(), target)
        else:
            kd = soft_loss(out.float(), target, self.temperature)
        return out, (1 - a) * base + a * kd

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The projection's AdamW groups (weight decayed, bias not, as the model's); [] without one."""
        if self.projection is None:
            return []
        p = self.projection
        return [{"params": [p.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": [p.bias], "weight_decay": 0.0, "lr_scale": 1.0}]

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.fingerprint,
                "projection": self.projection.state_dict() if self.projection is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None, where: str) -> None:
        if state is None:
            raise CheckpointError(f"{where} holds no distillation state: it was not saved by a run with --teacher")
        if state["teacher"] != self.fingerprint:
            raise CheckpointError(f"{where}: the teacher's weights are not the ones the run started with (they "
                                  "changed at the --teacher source); resume needs the same teacher")
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])


@torch.no_grad()
def teacher_cache(teacher: Teacher, data, *, batch_size: int, workers, device: torch.device) -> torch.Tensor:
    """The teacher's outputs for every training image (N, K or D), in one fixed, ordered pass
    without augmentation (rows of skipped images stay NaN: they are never trained on)."""
    from ..data import make_loader

    loader = make_loader(data.train, batch_size=batch_size, train=False, workers=workers, device_type=device.type,
                         drop_last=False, normalize=False, with_index=True)
    cache = None
    for x, _, idx in loader:
        out = teacher(normalize(x.to(device), data.mean, data.std))
        if cache is None:
            cache = torch.full((len(data.train), out.shape[1]), float("nan"), device=device)
        cache[idx.to(device)] = out
    return cache


CHECK_IMAGES = 4096  # the largest validation split the teacher is checked on before training (seconds on a CPU)


@torch.no_grad()
def teacher_accuracy(teacher: Teacher, split, data, *, batch_size: int, device: torch.device) -> float:
    """The teacher's top-1 accuracy on ``split`` (int labels) given as the student's batches."""
    from ..eval.evaluate import eval_loader

    right = seen = 0
    for x, y in eval_loader(split, batch_size, device_type=device.type):
        right += int((teacher(normalize(x.to(device), data.mean, data.std)).argmax(-1).cpu() == y).sum())
        seen += len(y)
    return right / max(seen, 1)


def build_distiller(cfg, teacher_model, data, student: nn.Module, base_loss: Callable, *, device: torch.device,
                    batch_size: int, random_augment: bool, distributed: bool, log) -> Distiller:
    """The run's :class:`Distiller`, every check made before the first step: the teacher's classes
    (logit modes), the student's distillation token (token modes), the projection's widths (feature)."""
    if cfg.teacher_cache and random_augment:
        raise ConfigError("--teacher-cache reuses the teacher's outputs for each image, which needs a pass without "
                          "random augmentation: add --no-augment (or leave out --teacher-cache)")
    if getattr(cfg, "train_only", None) == "probe":
        raise ConfigError("--train-only probe trains the head on cached backbone features, which a teacher cannot see; "
                          "use --train-only head (the images go through the frozen backbone) with --teacher")
    if cfg.distill == "feature" and distributed:
        raise ConfigError("--distill feature under torchrun is not supported yet (its projection is not "
                          "synchronised across processes); run it in one process, or use --distill soft / hard / token")
    if cfg.distill in TOKEN_MODES and student.dist_token is None:
        raise ConfigError(f"--distill {cfg.distill} needs a student with DeiT's distillation token")
    if cfg.teacher_zeroshot:
        from ..features.zeroshot import classifier_for_classes

        teacher_model = classifier_for_classes(teacher_model, data, templates=cfg.zeroshot_templates, note=log)
    index, note = (None, None) if cfg.distill == "feature" else _teacher_classes(teacher_model, cfg, data)
    if note:
        log(note)
    teacher = Teacher(teacher_model, output="features" if cfg.distill == "feature" else "logits", mean=data.mean,
                      std=data.std, in_channels=data.in_channels, image_hw=data.image_hw, device=device,
                      class_index=index)
    if cfg.distill != "feature" and data.val is not None and len(data.val) <= CHECK_IMAGES:
        # what the student can learn is the teacher on the student's own inputs (its size, its channels)
        log(f"teacher on the student's {len(data.val)} validation images ({data.image_hw[0]}x{data.image_hw[1]}): "
            f"accuracy {teacher_accuracy(teacher, data.val, data, batch_size=batch_size, device=device):.4f}")
    projection = None
    if cfg.distill == "feature":
        C, H, W = data.in_channels, *data.image_hw
        width = teacher(torch.zeros(1, C, H, W, device=device)).shape[1]  # the teacher's pooled width
        have = student.head.in_features if isinstance(student.head, nn.Linear) else student.config.dim
        if have != width:
            projection = nn.Linear(have, width).to(device)
    cache = None
    if cfg.teacher_cache:
        import time

        t0 = time.time()
        cache = teacher_cache(teacher, data, batch_size=batch_size, workers=cfg.workers, device=device)
        log(f"teacher cache: {len(cache)} outputs computed in {time.time() - t0:.1f} s")
    n = sum(p.numel() for p in teacher.model.parameters())
    log(f"teacher: {cfg.teacher}{' (zero-shot)' if cfg.teacher_zeroshot else ''}, {n:,} params, "
        f"{'bf16' if teacher.dtype else 'fp32'}, input {teacher.size[0]}x{teacher.size[1]}  |  distill {cfg.distill}, "
        f"alpha {cfg.distill_alpha:g}" + (f", T {cfg.distill_temperature:g}" if cfg.distill in ("soft", "token-soft")
                                          else "") + (f", projection {projection.in_features}->{projection.out_features}"
                                                      if projection is not None else ""))
    return Distiller(cfg, teacher, student, base_loss, projection=projection, cache=cache,
                     fingerprint=teacher.fingerprint())
