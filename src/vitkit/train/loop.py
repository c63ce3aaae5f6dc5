"""The training loop, top to bottom: ``train(cfg)``.

setup (device, threads, seed, run dir) -> data -> model -> optimizer / EMA / scaler -> [resume]
-> for each epoch: for each global batch: lr_at(step), augment, forward, loss (finite check),
backward, clip, step, EMA -> evaluate model and EMA on val -> write metrics, last/, best/,
train_state.pt -> test the best model -> curves.png, confusion_matrix.png, summary.json.

Reproducibility: the data order of epoch e comes from a generator seeded with (seed, e), the
affine augmentation of step s from (seed, s), and everything else that is random (init, dropout,
stochastic depth, MixUp/CutMix, v2 transforms) from torch's global RNG, which is saved in the
training state. So a run resumed from any checkpoint (epoch end, or the mid-epoch one written on
SIGINT / SIGTERM) continues exactly as the uninterrupted run would have (in deterministic CPU mode).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.augment import apply_affine, mix_transform, per_sample_transform, sample_affine, step_generator
from ..data.datasets import DataSplits, build_datasets, load_batch
from ..errors import CheckpointError, ConfigError, VitkitError
from ..eval.evaluate import evaluate, normalize
from ..io import atomic_write_text
from .checkpoint import STATE_NAME, load_state, rng_state, save_state, set_rng_state
from .config import TrainConfig
from .distributed import all_reduce_sum, barrier, cleanup, init_distributed, shard, wrap_model
from .optim import build_optimizer, lr_at, set_lr
from .rundir import claim_run_dir

CONFIG_FILE = "config.yaml"
_STEP_SLEEP = float(os.environ.get("VITKIT_TEST_STEP_SLEEP", "0") or 0)


class TrainingInterrupted(VitkitError):
    """SIGINT / SIGTERM arrived: the state was saved; resume with ``vitkit train --resume RUN``."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


class NonFiniteLoss(VitkitError):
    pass


# --------------------------------------------------------------------------- setup helpers
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def set_threads(cfg: TrainConfig, num_params: int, device: torch.device) -> int:
    """``--threads 0`` = every core. On an idle 2-core machine even the 30k-parameter digits model
    trains faster on 2 threads than on 1 (1020 vs 642 img/s at batch 64, benchmarks/train_digits.md);
    pass ``--threads 1`` when other jobs share the cores."""
    if device.type != "cpu":
        return torch.get_num_threads()
    n = cfg.threads or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def build_model(cfg: TrainConfig, data: DataSplits):
    from .. import ViT, ViTConfig
    from ..config import get_config

    common = dict(image_size=data.image_hw, in_channels=data.in_channels, num_classes=data.num_outputs,
                  task=data.task, drop_path=cfg.drop_path, dropout=cfg.dropout)
    if cfg.pretrained:
        return load_pretrained(cfg.pretrained, data, drop_path=cfg.drop_path, dropout=cfg.dropout)
    if cfg.model:
        vc = get_config(cfg.model, **common)
    else:
        vc = ViTConfig(patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads,
                       mlp_ratio=cfg.mlp_ratio, pos_embed=cfg.pos_embed, pooling=cfg.pooling,
                       class_token=cfg.pooling == "cls", fc_norm=cfg.fc_norm and cfg.pooling == "mean",
                       name="vitkit_train", **common)
    model = ViT(vc)
    # MAE / big_vision initialise the patch projection like a linear layer (xavier-uniform over
    # the flattened patch). ViT's default trunc-normal(0.02) makes tokens of tiny patches (2x2x1 =
    # 4 inputs) ~50x smaller than the sin-cos position table, and training on digits then stalls.
    w = model.patch_embed.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    return model


def load_pretrained(source: str, data: DataSplits, **overrides):
    """Weights from ``source`` (any format ``vitkit.from_pretrained`` reads), resampled to this
    dataset's input size and channels, with a fresh head for its classes / targets."""
    import vitkit

    model = vitkit.from_pretrained(source, num_classes=data.num_outputs, image_size=data.image_hw,
                                   in_channels=data.in_channels, **overrides)
    # Fine-tuning always starts from a fresh head, even when the class count happens to match.
    c = model.config
    head_in = model.head.in_features if isinstance(model.head, torch.nn.Linear) else c.dim
    model.head = torch.nn.Linear(head_in, data.num_outputs)
    torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    torch.nn.init.zeros_(model.head.bias)
    model.config = c.replace(num_classes=data.num_outputs, task=data.task)
    return model.train()


def preprocess_cfg(data: DataSplits) -> dict[str, Any]:
    return {"input_size": [data.in_channels, *data.image_hw], "mean": list(data.mean), "std": list(data.std),
            "interpolation": "bilinear", "crop_pct": 1.0}


def make_run_dir(cfg: TrainConfig) -> Path | None:
    """``--out``, or None: ``claim_run_dir`` then creates a fresh ``runs/<timestamp>-<suffix>``."""
    return Path(cfg.out) if cfg.out else None


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class _SignalFlag:
    """Turns SIGINT / SIGTERM into a flag checked between steps (then: save, exit non-zero)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: str | Path | None = None, log=print) -> dict[str, Any]:
    """Train (or resume) one run; returns the summary dict (also written to summary.json).

    The run directory is claimed (locked, checked, cleared on --overwrite) before anything else, by
    rank 0 only: the other ranks of a torchrun job get its name from rank 0 once the group is up."""
    if resume is not None and cfg.overwrite:
        raise ConfigError("--overwrite replaces a run with a new one; it cannot be combined with --resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg, resume, log, None)
    with claim_run_dir(Path(resume) if resume is not None else make_run_dir(cfg), overwrite=cfg.overwrite,
                       resume=resume is not None) as run_dir:
        return _train(cfg, resume, log, run_dir)


def _train(cfg: TrainConfig, resume: str | Path | None, log, run_dir: Path | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t0 = time.time()
    state = None
    if resume is not None:
        run_dir = Path(resume)
        state = load_state(run_dir / STATE_NAME)
        if state.get("finished"):
            raise CheckpointError(f"{run_dir} already finished ({state['epoch']} epochs); nothing to resume")
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if dist.enabled:  # rank 0 claimed the run directory; the others write nothing but must know it
        names = [str(run_dir) if run_dir is not None else None]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    main = dist.is_main
    say = log if main else (lambda *a, **k: None)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)

    data = build_datasets(cfg)
    for note in data.notes:
        say(note)
    model = build_model(cfg, data)
    model.labels = list(data.classes) if data.classes else None
    model.preprocess_cfg = preprocess_cfg(data)
    if data.task == "regression":
        model.pretrained_info = {"task": "regression", "targets": data.classes}
    n_params = model.num_params()
    threads = set_threads(cfg, n_params, device)
    model.to(device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
    say(f"run dir: {run_dir}  |  {data.name}: {len(data.train)} train images, {data.num_outputs} "
        f"{'classes' if data.task == 'classification' else 'targets'}  |  model: {n_params:,} params, "
        f"{model.config.num_tokens} tokens  |  device {device}, {threads} thread(s), world {dist.world_size}")

    optimizer = build_optimizer(model, cfg)
    ema = None
    if cfg.ema and cfg.strategy != "fsdp":
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    dmodel = wrap_model(model, dist, cfg.strategy, device)
    if cfg.compile:
        dmodel = torch.compile(dmodel)

    loss_kind = cfg.loss if cfg.loss != "auto" else ("ce" if data.task == "classification" else "mse")
    if data.task == "regression" and loss_kind == "ce":
        raise ConfigError("loss 'ce' needs a classification dataset; use mse or l1 for csv regression")
    hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and data.hflip_ok)
    sample_tf = per_sample_transform(cfg, data.image_hw) if (cfg.augment and hasattr(data.train, "get_batch")) else None
    mixer = mix_transform(cfg, data.num_outputs) if (cfg.augment and data.task == "classification") else None

    n_train = len(data.train)
    B = cfg.batch_size
    if n_train < B:
        B = n_train
    batches_per_epoch = n_train // B  # drop the last partial batch: equal batches keep DDP exact
    steps_per_epoch = batches_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    # ------------------------------------------------------------ resume
    epoch, step, batch_pos = 0, 0, 0
    history: list[dict[str, Any]] = []
    best = {"score": [-math.inf, -math.inf], "epoch": -1, "which": None, "val_accuracy": None}
    partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, batch_pos = state["epoch"], state["step"], state["batch_pos"]
        history = [dict(h) for h in state["history"]]
        best = dict(state["best"])
        partial = dict(state["partial"])
        set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0])
        if main:  # metrics.jsonl = exactly the epochs in the state
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        say(f"resumed {run_dir} at epoch {epoch}, step {step}" + (f" (batch {batch_pos})" if batch_pos else ""))

    def snapshot(finished: bool = False) -> dict[str, Any]:
        rngs = [rng_state()]
        if dist.enabled:  # every rank's RNG (dropout streams differ per rank)
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                "rng": rngs, "epoch": epoch, "step": step, "batch_pos": batch_pos, "history": history,
                "best": best, "partial": partial, "finished": finished, "config": cfg.to_dict()}

    def save_training_state(finished: bool = False) -> None:
        snap = snapshot(finished)
        if main:
            save_state(run_dir / STATE_NAME, snap)

    def loss_fn(out, y):
        if data.task == "regression":
            y = y.float().view_as(out)
            return F.mse_loss(out, y) if loss_kind == "mse" else F.l1_loss(out, y)
        if y.ndim == 2:  # soft targets from MixUp / CutMix
            return F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        return F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)

    tb = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir))
        except ImportError:
            say("--tensorboard: tensorboard is not installed (pip install tensorboard); skipping")

    flag = _SignalFlag()
    stop_all = False
    with flag:
        while epoch < cfg.epochs and not stop_all:
            dmodel.train()
            perm = torch.randperm(n_train, generator=step_generator(cfg.seed, epoch, salt=1)).tolist()
            batches = [perm[i * B:(i + 1) * B] for i in range(batches_per_epoch)]
            t_epoch = time.time()
            bar = tqdm(total=len(batches), initial=batch_pos, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (main and cfg.progress), dynamic_ncols=True, leave=False, file=sys.stderr)
            while batch_pos < len(batches):
                lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr)
                set_lr(optimizer, lr)
                gbatch = batches[batch_pos]
                local = shard(gbatch, dist)
                theta = None
                if cfg.augment and (cfg.affine_degrees or cfg.affine_translate or cfg.affine_scale
                                    or cfg.affine_shear or hflip):
                    theta_all = sample_affine(len(gbatch), step_generator(cfg.seed, step), cfg.affine_degrees,
                                              cfg.affine_translate, cfg.affine_scale, cfg.affine_shear, hflip)
                    pos = {i: k for k, i in enumerate(gbatch)}
                    theta = theta_all[[pos[i] for i in local]]
                chunks = [list(range(k, len(local), cfg.accum_steps)) for k in range(cfg.accum_steps)]
                chunks = [c for c in chunks if c]
                step_loss = torch.zeros((), dtype=torch.float64)
                step_correct = torch.zeros((), dtype=torch.float64)
                step_count = torch.zeros((), dtype=torch.float64)
                for ci, chunk in enumerate(chunks):
                    batch = load_batch(data.train, [local[k] for k in chunk])
                    if batch is None:
                        continue
                    x, y = batch
                    if theta is not None and len(x) == len(chunk):
                        x = apply_affine(x, theta[chunk])
                    if sample_tf is not None:
                        x = torch.stack([sample_tf(xi) for xi in x])
                    x = normalize(x.to(device, non_blocking=True), data.mean, data.std)
                    y = y.to(device)
                    y_hard = y
                    if mixer is not None:
                        x, y = mixer(x, y)
                    sync = ci == len(chunks) - 1 or not hasattr(dmodel, "no_sync")
                    ctx = dmodel.no_sync() if not sync else _nullcontext()
                    with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = dmodel(x)
                        loss = loss_fn(out.float(), y)
                    if not torch.isfinite(loss):
                        last = f"{run_dir / STATE_NAME} (end of epoch {epoch})" if (run_dir / STATE_NAME).exists() \
                            else "none yet"
                        raise NonFiniteLoss(
                            f"loss is {float(loss.detach())} at step {step} (epoch {epoch + 1}, batch {batch_pos + 1}); "
                            f"stopped. Last good checkpoint kept: {last}. Try a lower --lr or --grad-clip.")
                    scaler.scale(loss * len(chunk) / len(local)).backward()
                    step_loss += float(loss.detach()) * len(x)
                    if data.task == "classification":
                        step_correct += float((out.argmax(1) == y_hard).sum())
                    step_count += len(x)
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                batch_pos += 1
                if _STEP_SLEEP:  # test hook: slow a tiny run down so a signal can land mid-epoch
                    time.sleep(_STEP_SLEEP)
                partial["loss"] += float(step_loss)
                partial["correct"] += float(step_correct)
                partial["count"] += float(step_count)
                elapsed = partial["seconds"] + time.time() - t_epoch
                bar.update(1)
                if main and cfg.progress:
                    post = {"loss": f"{partial['loss'] / max(partial['count'], 1):.4f}", "lr": f"{lr:.2e}",
                            "img/s": f"{partial['count'] * dist.world_size / max(elapsed, 1e-9):.0f}"}
                    if data.task == "classification":
                        post["acc"] = f"{partial['correct'] / max(partial['count'], 1):.3f}"
                    bar.set_postfix(post, refresh=False)
                sig = torch.tensor([flag.signum], dtype=torch.float64)
                if dist.enabled:
                    from .distributed import all_reduce_max

                    all_reduce_max(sig, dist)
                if sig.item():
                    partial["seconds"] = elapsed
                    save_training_state()
                    bar.close()
                    raise TrainingInterrupted(
                        f"interrupted by signal {int(sig.item())} at step {step} (epoch {epoch + 1}); state saved "
                        f"to {run_dir / STATE_NAME}. Continue with: vitkit train --resume {run_dir}", int(sig.item()))
                if cfg.max_steps and step >= cfg.max_steps:
                    stop_all = True
                    break
            bar.close()
            # ---------------------------------------------------- end of epoch
            tr = torch.tensor([partial["loss"], partial["correct"], partial["count"]], dtype=torch.float64)
            all_reduce_sum(tr, dist)
            seconds = partial["seconds"] + time.time() - t_epoch
            epoch += 1
            batch_pos = 0
            partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
            rec: dict[str, Any] = {"epoch": epoch, "step": step, "lr": lr_at(max(step - 1, 0), total_steps, warmup,
                                                                             cfg.lr, cfg.min_lr),
                                   "train_loss": float(tr[0] / max(tr[2], 1))}
            if data.task == "classification":
                rec["train_accuracy"] = float(tr[1] / max(tr[2], 1))
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or stop_all:
                ev_kw = dict(task=data.task, num_outputs=data.num_outputs, mean=data.mean, std=data.std,
                             device=device, dist=dist, regression_loss=loss_kind if loss_kind != "ce" else "mse",
                             labels=data.classes, amp_dtype=amp_dtype)
                cands = [("model", model)] + ([("ema", ema.module)] if ema is not None else [])
                for which, m in cands:
                    r = evaluate(m, data.val, **ev_kw)
                    pre = "val" if which == "model" else "val_ema"
                    rec[f"{pre}_loss"] = r["loss"]
                    # Validation accuracy moves in steps of 1/len(val) (0.56% on digits): on a tie the
                    # lower validation loss wins, otherwise an early lucky epoch is kept forever.
                    score = [r["accuracy"] if data.task == "classification" else -r["loss"], -r["loss"]]
                    if data.task == "classification":
                        rec[f"{pre}_accuracy"], rec[f"{pre}_top5"] = r["accuracy"], r["top5"]
                    else:
                        rec[f"{pre}_mae"], rec[f"{pre}_rmse"], rec[f"{pre}_r2"] = r["mae"], r["rmse"], r["r2"]
                    if score > best["score"]:
                        best = {"score": score, "epoch": epoch, "which": which,
                                "val_accuracy": r.get("accuracy"), "val_loss": r["loss"]}
                        if main:
                            save_model(m, model, run_dir / "best", which)
            rec["epoch_seconds"] = round(seconds, 3)
            rec["images_per_second"] = round(float(tr[2]) / max(seconds, 1e-9), 1)
            history.append(rec)
            if main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if tb is not None:
                    for k, v in rec.items():
                        if isinstance(v, (int, float)) and k != "epoch":
                            tb.add_scalar(k, v, epoch)
                save_model(model, model, run_dir / "last", "model")
            save_training_state(finished=False)
            say(_epoch_line(rec, cfg.epochs))
            barrier(dist)

    # ------------------------------------------------------------ test the best model
    summary = finish(cfg, run_dir, data, model, history, best, n_params, dist, device, amp_dtype, loss_kind,
                     t0, state, say)
    if tb is not None:
        tb.close()
    save_training_state(finished=True)
    cleanup(dist)
    return summary


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def save_model(weights_src, model, directory: Path, which: str) -> None:
    """Save ``weights_src`` (the model or the EMA copy) with ``model``'s metadata, vitkit format."""
    from ..io import save_pretrained

    if weights_src is not model:  # EMA copy: carry labels / preprocess over
        weights_src.labels, weights_src.preprocess_cfg = model.labels, model.preprocess_cfg
        weights_src.pretrained_info = model.pretrained_info
    save_pretrained(weights_src, directory, weights=which)


def _epoch_line(rec: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['train_loss']:.4f}"]
    for k in ("train_accuracy", "val_accuracy", "val_ema_accuracy", "val_r2", "val_ema_r2"):
        if k in rec:
            parts.append(f"{k.replace('_accuracy', '_acc')} {rec[k]:.4f}")
    parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"{rec['images_per_second']:.0f} img/s")
    return "  ".join(parts)


def finish(cfg, run_dir, data, model, history, best, n_params, dist, device, amp_dtype, loss_kind, t0, state, say):
    from ..io import load_model
    from .plots import plot_confusion, plot_curves

    test_split = data.test if data.test is not None else data.val
    best_model = load_model(run_dir / "best", device=device) if (run_dir / "best").exists() else model
    if not dist.is_main:  # other ranks: read what rank 0 wrote (after the last barrier)
        pass
    r = evaluate(best_model, test_split, task=data.task, num_outputs=data.num_outputs, mean=data.mean,
                 std=data.std, device=device, dist=dist, regression_loss=loss_kind if loss_kind != "ce" else "mse",
                 labels=data.classes, amp_dtype=amp_dtype)
    wall = time.time() - t0 + (state.get("wall_seconds", 0.0) if state else 0.0)
    summary: dict[str, Any] = {
        "dataset": data.name, "task": data.task, "epochs": history[-1]["epoch"] if history else 0,
        "steps": history[-1]["step"] if history else 0, "params": n_params,
        "test_split": "test" if data.test is not None else "val", "test_loss": r["loss"],
        "best_epoch": best["epoch"], "best_weights": best["which"], "wall_seconds": round(time.time() - t0, 2),
        "world_size": dist.world_size, "threads": torch.get_num_threads(), "run_dir": str(run_dir),
    }
    del wall
    if data.task == "classification":
        summary.update(test_accuracy=r["accuracy"], test_top5=r["top5"], test_macro_f1=r["macro_f1"],
                       best_val_accuracy=best["val_accuracy"],
                       final_val_accuracy=history[-1].get("val_accuracy") if history else None,
                       final_val_ema_accuracy=history[-1].get("val_ema_accuracy") if history else None)
    else:
        summary.update(test_mae=r["mae"], test_rmse=r["rmse"], test_r2=r["r2"], best_val_loss=best.get("val_loss"))
    if dist.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if history:
            plot_curves(history, run_dir / "curves.png")
        if data.task == "classification":
            plot_confusion(r["confusion_matrix"], data.classes, run_dir / "confusion_matrix.png",
                           title=f"{data.name} test, accuracy {r['accuracy']:.4f}")
            atomic_write_text(run_dir / "test_report.json", json.dumps(r, indent=2) + "\n")
        if data.task == "classification":
            say(f"test accuracy {r['accuracy']:.4f} (top-5 {r['top5']:.4f}, loss {r['loss']:.4f}) with the best "
                f"{best['which']} weights of epoch {best['epoch']}  |  {summary['wall_seconds']:.1f} s  |  {run_dir}")
        else:
            say(f"test MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  R^2 {r['r2']:.4f}  |  "
                f"{summary['wall_seconds']:.1f} s  |  {run_dir}")
    return summary
