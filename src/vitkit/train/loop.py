"""The training loop, top to bottom: ``train(cfg)``.

    build_run        device, data, model, optimizer, EMA, schedule, loaders  (vitkit.train.build)
    run_directory    the one place a run directory is chosen, created and held
    for each epoch:
      run_epoch      for each batch of the loader: train_step; every --log-every steps: read_point
      end_epoch      read the sums, evaluate_epoch (model and EMA on val), write metrics, last/, best/,
                     save_checkpoint (train_state.pt)
    finish           test the best weights, summary.json, curves.png, confusion_matrix.png

Everything that is saved and resumed is one object, :class:`vitkit.train.state.RunState`.

Resume (``train(cfg, resume=RUN)``): the run's effective config (config.yaml + amendments.yaml) is
compared with ``cfg`` before anything is written; changes outside RESUME_CHANGEABLE are refused,
allowed ones appended to amendments.yaml. ``--max-steps N`` stops this invocation after N steps and
saves the state there (mid-epoch, as a signal does), so a later resume continues exactly; a run dir
with a config.yaml but no train_state.pt yet starts again from its beginning.

Host syncs: none per step. Loss / accuracy sums and the first non-finite loss are accumulated on the
device and read at *read points*: every ``--log-every`` steps (progress bar), at an epoch end, and
when a signal arrives. A non-finite loss therefore stops the run at the next read point, naming the
step where it first appeared; nothing is saved after it, so the last good checkpoint stays.

Stop signals (SIGINT / SIGTERM): a single process checks its flag (a Python int, no sync) after every
step, so the run stops after the current step, saves its state mid-epoch and exits. Under torchrun the
flag is all-reduced at read points only (one collective per ``--log-every`` steps, not per step), so a
signal takes effect within ``--log-every`` steps. A second signal aborts at once.

Reproducibility: the data order of epoch e comes from (seed, e), the affine augmentation of step s
from (seed, s), the loader's position is saved (StatefulDataLoader), and everything else that is
random (init, dropout, stochastic depth, MixUp/CutMix) from torch's global RNG, saved with the state.
So a run resumed from any checkpoint continues exactly as the uninterrupted run (deterministic CPU mode).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataSpec, DataSplits, DataWorkerError, build_data
from ..data.augment import apply_affine, mix_transform, sample_affine, step_generator
from ..errors import CheckpointError, ConfigError, VitkitError
from ..eval.evaluate import evaluate, normalize
from ..io import atomic_write_text
from ..progress import progress_bar
from .build import (
    amp_dtype,
    build_ema,
    build_model,
    build_optimizer_and_schedule,
    check_fixed_arch,
    check_tokens,
    cpu_linear_kernels,
    pick_device,
    preprocess_cfg,
    probe_pretrained,
    set_threads,
    setup_backends,
)
from .checkpoint import STATE_NAME, load_state, save_state
from .config import AMENDMENTS_FILE, TrainConfig, read_run_config, record_amendment, resume_changes
from .data import eval_loader, train_loader
from .distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from .kernels import onednn_linear
from .optim import lr_at, set_lr
from .state import RunState

__all__ = ["train", "TrainingInterrupted", "NonFiniteLoss", "pick_device", "CONFIG_FILE"]

CONFIG_FILE = "config.yaml"


class TrainingInterrupted(VitkitError):
    """SIGINT / SIGTERM arrived: the state was saved; resume with ``vitkit train --resume RUN``."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


class NonFiniteLoss(VitkitError):
    pass


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


@dataclass
class Run:
    """What a run is built from; not saved (rebuilt from config.yaml on resume)."""

    cfg: TrainConfig
    data: DataSplits
    device: torch.device
    dist: DistInfo
    dmodel: torch.nn.Module  # what the forward runs: the model, or its DDP / FSDP / compiled wrapper
    amp: torch.dtype | None
    loss_fn: Any
    mixer: Any  # MixUp / CutMix on the device, or None
    affine: bool  # batch affine augmentation (and flips) on the device
    hflip: bool
    global_batch: int
    total_steps: int
    warmup_steps: int
    val_loader: Any
    say: Any
    cpu_linear: bool = False  # fp32 Linear layers on oneDNN in the step (vitkit.train.kernels)
    run_dir: Path = None  # type: ignore[assignment]
    stop_at: int = 0  # the step at which this invocation's --max-steps stops it (0: none)
    stop_rec: dict[str, Any] = field(default_factory=dict)  # the partial epoch's record where it stopped
    amended: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # --resume changes: option -> (old, new)
    tb: Any = None
    on_step: Any = None
    eval_kw: dict[str, Any] = field(default_factory=dict)


def _quiet(*a, **k) -> None:
    pass


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: str | Path | None = None, log=print, on_step=None) -> dict[str, Any]:
    """Train (or resume) one run; returns the summary dict (also written to summary.json).

    ``on_step(state)``: called after every optimizer step with the :class:`RunState` (progress
    hooks; tests use it to interrupt a run at an exact step)."""
    t0 = time.time()
    if resume is not None and cfg.overwrite:
        raise ConfigError("--overwrite replaces a run with a new one; it cannot be combined with --resume")
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    say = log if dist.is_main else _quiet
    setup_backends(cfg, device)
    torch.manual_seed(cfg.seed)
    with _SignalFlag() as flag:
        if resume is None:  # everything is checked before a directory is claimed
            run, st = build_run(cfg, device, dist, say)
            with run_directory(run.cfg, None, dist) as run_dir:
                summary = run_all(run, st, run_dir, None, flag, on_step, t0)
        else:  # the lock first: the state of a live run is neither read nor resumed twice
            with run_directory(cfg, resume, dist) as run_dir:
                # everything is checked before anything is written: refused changes, the state, the data
                effective = read_run_config(run_dir)
                changes = resume_changes(effective, cfg, resume)
                cfg = TrainConfig.from_dict({**effective, **changes, **{k: getattr(cfg, k) for k in
                                                                        ("out", "max_steps")}})
                saved = load_state(run_dir / STATE_NAME) if (run_dir / STATE_NAME).exists() else None
                check_resumable(saved, cfg, resume)
                run, st = build_run(cfg, device, dist, say)
                check_same_labels(saved, run, resume)
                base = TrainConfig.from_dict(effective)
                run.amended = {k: (getattr(base, k), v) for k, v in changes.items()}
                if saved is None:
                    say(f"{resume} has no training state yet (it stopped before its first checkpoint): starting it "
                        f"from the beginning with its recorded config")
                summary = run_all(run, st, run_dir, saved, flag, on_step, t0, resumed=True)
    cleanup(dist)
    return summary


def check_resumable(saved: dict[str, Any] | None, cfg: TrainConfig, resume) -> None:
    if saved is None:
        return
    done = saved["epoch"]
    # An older vitkit marked a run stopped by --max-steps as finished: only the schedule's end finishes a run.
    if saved.get("finished") and done >= cfg.epochs:
        raise CheckpointError(f"{resume} already finished ({done} epochs); nothing to resume")
    if done > cfg.epochs or (done == cfg.epochs and saved["batch_pos"]):
        raise ConfigError(f"--epochs {cfg.epochs}: {resume} has already trained {done} epoch(s)"
                          + (f" and {saved['batch_pos']} step(s) of the next" if saved["batch_pos"] else ""))


def check_same_labels(saved: dict[str, Any] | None, run: Run, resume) -> None:
    """A resumed run's data (e.g. a moved --data-dir) must have the classes / targets it was trained on."""
    have = list(run.data.classes) if run.data.classes else None
    if saved is not None and saved.get("labels") is not None and list(saved["labels"]) != have:
        raise ConfigError(f"--resume {resume}: the data at --data-dir {run.cfg.data_dir} has the classes "
                          f"{_names(have)}; the run was trained on {_names(saved['labels'])}")


def _names(labels) -> str:
    return "none" if not labels else str(list(labels)[:12])[:-1] + (", ...]" if len(labels) > 12 else "]")


def run_all(run: Run, st: RunState, run_dir: Path, saved, flag: _SignalFlag, on_step, t0: float,
            resumed: bool = False) -> dict[str, Any]:
    """Epochs until the end (or this invocation's --max-steps), then finish; in the claimed run directory."""
    run.run_dir, run.on_step = run_dir, on_step
    start(run, st, saved, resumed)
    try:
        while st.epoch < run.cfg.epochs:
            if run_epoch(run, st, flag):  # --max-steps inside the epoch: its position is saved
                break
            end_epoch(run, st, flag)
            if run.stop_at and st.step >= run.stop_at:
                break
        return finish(run, st, t0)
    except RuntimeError as e:  # torch reports a dead worker from its SIGCHLD handler, anywhere
        if "DataLoader worker" not in str(e):
            raise
        raise DataWorkerError(
            f"a data loader worker died ({str(e).strip().splitlines()[0]}); nothing was saved after the last "
            f"checkpoint {run_dir / STATE_NAME}: continue with vitkit train --resume {shlex.quote(str(run_dir))}") from e
    finally:
        if run.tb is not None:
            run.tb.close()


def build_run(cfg: TrainConfig, device: torch.device, dist: DistInfo, say) -> tuple[Run, RunState]:
    pretrained = None
    if cfg.pretrained:  # read before the data (an unreadable source fails first); the input size defaults to the model's
        pretrained = probe_pretrained(cfg)  # read once: build_model loads from it
        vc = pretrained.config
        check_fixed_arch(cfg, vc, f"--pretrained {cfg.pretrained}")
        if not cfg.image_size and vc.image_hw[0] == vc.image_hw[1]:
            cfg = cfg.replace(image_size=vc.image_hw[0])
    data = build_data(DataSpec.from_config(cfg))
    for note in data.notes + ([f"input size: {data.size_note}"] if data.size_note else []):
        say(note)
    model, cfg = build_model(cfg, data, pretrained)
    model.labels = list(data.classes) if data.classes else None
    model.preprocess_cfg = preprocess_cfg(data)
    if data.task == "regression":
        model.pretrained_info = {"task": "regression", "targets": data.classes}
    check_tokens(model, say)
    set_threads(cfg, device)
    model.to(device)
    hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and data.hflip_ok)
    affine = cfg.augment and bool(cfg.affine_degrees or cfg.affine_translate or cfg.affine_scale
                                  or cfg.affine_shear or hflip)
    batch = min(cfg.batch_size, len(data.train))  # the last partial batch is dropped: equal batches keep DDP exact
    loader = train_loader(data, cfg, batch_size=batch, dist=dist, device_type=device.type, device_flips=affine)
    dmodel = wrap_model(model, dist, cfg.strategy, device)  # before the optimizer: FSDP swaps the parameters
    optimizer, total, warmup = build_optimizer_and_schedule(cfg, model, len(loader), say)
    ema = build_ema(cfg, model, sharded=dist.enabled and cfg.strategy == "fsdp", say=say, total_steps=total)
    amp = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if cfg.compile:
        dmodel = torch.compile(dmodel)
    loss_kind = cfg.loss if cfg.loss != "auto" else ("ce" if data.task == "classification" else "mse")
    if data.task == "regression" and loss_kind == "ce":
        raise ConfigError("loss 'ce' needs a classification dataset; use mse or l1 for csv regression")
    val = eval_loader(data.val, 256, dist=dist, workers=cfg.workers, device_type=device.type) \
        if data.val is not None else None
    run = Run(cfg=cfg, data=data, device=device, dist=dist, dmodel=dmodel, amp=amp, loss_fn=make_loss(data.task,
              loss_kind, cfg.label_smoothing), mixer=mix_transform(cfg, data.num_outputs)
              if cfg.augment and data.task == "classification" else None, affine=affine, hflip=hflip,
              global_batch=batch, total_steps=total, warmup_steps=warmup, val_loader=val, say=say,
              cpu_linear=cpu_linear_kernels(cfg, model, device, say))
    run.eval_kw = dict(task=data.task, num_outputs=data.num_outputs, mean=data.mean, std=data.std, device=device,
                       dist=dist, regression_loss=loss_kind if loss_kind != "ce" else "mse", labels=data.classes,
                       amp_dtype=amp)
    st = RunState(model=model, optimizer=optimizer, ema=ema, scaler=scaler, loader=loader, device=device,
                  fsdp=dist.enabled and cfg.strategy == "fsdp", labels=list(data.classes) if data.classes else None)
    return run, st


def make_loss(task: str, kind: str, label_smoothing: float):
    if task == "regression":
        fn = F.mse_loss if kind == "mse" else F.l1_loss
        return lambda out, y: fn(out, y.float().view_as(out))
    # class ids and MixUp / CutMix soft targets alike
    return functools.partial(F.cross_entropy, label_smoothing=label_smoothing)


@contextlib.contextmanager
def run_directory(cfg: TrainConfig, resume, dist: DistInfo):
    """The one place a run directory is chosen, created and held for the life of the run:
    :func:`vitkit.train.rundir.claim_run_dir` (unique default names, a lock held by the live run,
    refusal of a directory that holds another run unless ``--overwrite``). Rank 0 claims and tells
    the other ranks the path."""
    from .rundir import claim_run_dir

    path = Path(resume) if resume is not None else (Path(cfg.out) if cfg.out else None)
    if dist.is_main:
        cm = claim_run_dir(path, overwrite=cfg.overwrite, resume=resume is not None,
                           inputs=(cfg.data_dir, cfg.model, cfg.pretrained))
    else:
        cm = contextlib.nullcontext(None)
    with cm as run_dir:
        if dist.enabled:
            box = [str(run_dir) if run_dir is not None else None]
            torch.distributed.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        yield Path(run_dir)


def start(run: Run, st: RunState, saved: dict[str, Any] | None, resumed: bool = False) -> None:
    """Restore a saved state; write config.yaml (a new run: a recipe, it never carries where to write)
    or amendments.yaml (a resumed run's changes, beside its config.yaml, never over it); say hello."""
    cfg, data, dist = run.cfg, run.data, run.dist
    if saved is not None:
        try:
            st.load_state_dict(saved, dist)
        except (RuntimeError, KeyError, ValueError) as e:  # torch's size mismatch: the state is not this model's
            raise CheckpointError(f"{run.run_dir / STATE_NAME} does not fit the model built from the run's config "
                                  f"({str(e).strip().splitlines()[0][:300]})") from e
    run.stop_at = st.step + cfg.max_steps if cfg.max_steps else 0
    if dist.is_main:
        if not resumed:
            cfg.replace(out=None).save(run.run_dir / CONFIG_FILE)
        elif run.amended:
            record_amendment(run.run_dir, {k: new for k, (_, new) in run.amended.items()}, step=st.step,
                             epoch=st.epoch)
        if resumed:  # metrics.jsonl = exactly the epochs in the state (none for a restart)
            atomic_write_text(run.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in st.history))
    if run.amended:
        run.say(f"amended (recorded in {AMENDMENTS_FILE}): "
                + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in run.amended.items()))
    if saved is not None:
        run.say(f"resumed {run.run_dir} at epoch {st.epoch}, step {st.step}"
                + (f" (batch {st.batch_pos})" if st.batch_pos else ""))
    c = st.model.config
    run.say(f"run dir: {run.run_dir}  |  {data.name}: {len(data.train)} train images, {data.num_outputs} "
            f"{'classes' if data.task == 'classification' else 'targets'}  |  model: {st.model.num_params():,} "
            f"params, {c.num_tokens} tokens  |  device {run.device}, {torch.get_num_threads()} thread(s), "
            f"world {dist.world_size}")
    if cfg.tensorboard and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.tb = SummaryWriter(str(run.run_dir))
        except ImportError:
            run.say("--tensorboard: tensorboard is not installed (pip install tensorboard); skipping")


# --------------------------------------------------------------------------- one step, one epoch
def train_step(run: Run, st: RunState, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on this rank's batch (x in [0, 1]): device augmentation, forward, loss,
    backward (over --accum-steps micro-batches), clip, step, EMA. No host sync."""
    cfg = run.cfg
    set_lr(st.optimizer, lr_at(st.step, run.total_steps, run.warmup_steps, cfg.lr, cfg.min_lr))
    y_host = y
    x, y = host_to_device(x, run.device), host_to_device(y, run.device)  # the loader pinned them
    if run.affine:  # parameters drawn on the host: the same stream on every device
        x = apply_affine(x, host_to_device(step_theta(run, st.step, len(x)), run.device))
    x = normalize(x, run.data.mean, run.data.std)
    y_hard = y
    if run.mixer is not None:
        # Labels mixed on the host: torchvision's one_hot checks the label range, which on device
        # labels is a host sync per step. The images are mixed on the device, by the same lam.
        x, y_soft = run.mixer(x, y_host)
        y = host_to_device(y_soft, run.device)
    parts = min(cfg.accum_steps, len(x))
    for k, (xc, yc, hc) in enumerate(zip(x.tensor_split(parts), y.tensor_split(parts), y_hard.tensor_split(parts))):
        no_sync = k < parts - 1 and hasattr(run.dmodel, "no_sync")  # DDP: all-reduce on the last part only
        with run.dmodel.no_sync() if no_sync else contextlib.nullcontext(), \
                torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None), \
                onednn_linear(run.cpu_linear):
            out = run.dmodel(xc)
            loss = run.loss_fn(out.float(), yc)
        st.scaler.scale(loss * (len(xc) / len(x))).backward()
        correct = (out.argmax(1) == hc).sum() if run.data.task == "classification" else loss.new_zeros(())
        st.note_loss(loss, correct, len(xc))
    if cfg.grad_clip > 0:
        st.scaler.unscale_(st.optimizer)
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)
    if st.ema is not None:
        st.ema.update_parameters(st.model)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: pinned first on CUDA (a copy from pageable
    memory waits for the GPU's queue to drain; the loader's batches come pinned already)."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def step_theta(run: Run, step: int, n_local: int) -> torch.Tensor:
    """This rank's rows of the affine parameters drawn for the whole global batch of ``step``, so N
    processes and a resumed run see exactly the augmentation of one uninterrupted process."""
    c = run.cfg
    theta = sample_affine(run.global_batch, step_generator(c.seed, step), c.affine_degrees, c.affine_translate,
                          c.affine_scale, c.affine_shear, run.hflip)
    per, extra = divmod(run.global_batch, run.dist.world_size)
    r = run.dist.rank
    begin = r * per + min(r, extra)
    return theta[begin:begin + n_local]


def run_epoch(run: Run, st: RunState, flag: _SignalFlag) -> bool:
    """Train through the rest of the epoch; True when --max-steps stopped this invocation inside it
    (last/ and the state are then saved mid-epoch, as a signal saves them, so --resume continues exactly)."""
    cfg = run.cfg
    run.dmodel.train()
    st.loader.set_epoch(st.epoch)
    bar = progress_bar(total=len(st.loader), initial=st.batch_pos, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                       disable=not (run.dist.is_main and cfg.progress), leave=False, unit="step")
    begin = time.time() - st.seconds
    at_limit = False
    for batch in st.loader:
        if batch is not None:  # None: every image of the batch skipped (--skip-bad-images)
            train_step(run, st, *batch)
        st.step += 1
        st.batch_pos += 1
        st.seconds = time.time() - begin
        bar.update(1)
        if run.on_step is not None:
            run.on_step(st)
        at_limit = bool(run.stop_at) and st.step >= run.stop_at
        local_signal = flag.signum and not run.dist.enabled  # torchrun: all ranks stop at a read point
        if local_signal or at_limit or st.step % cfg.log_every == 0:
            signum = read_point(run, st, flag, bar)
            if signum and not at_limit:
                bar.close()
                interrupt(run, st, signum)
        if at_limit:
            break
    bar.close()
    if at_limit and st.batch_pos < len(st.loader):
        save_model(run, st, st.model, run.run_dir / "last", "model")
        save_checkpoint(run, st, mid_epoch=True)
        barrier(run.dist)
        return True
    return False


def read_point(run: Run, st: RunState, flag: _SignalFlag, bar=None) -> int:
    """The loop's host sync: the first non-finite loss (raises), the stop signal (maximum over the
    ranks: one all-reduce) and the progress numbers. Returns the signal number (0: none)."""
    flags = torch.stack([st.bad[0], torch.full_like(st.bad[0], float(flag.signum))])
    all_reduce_max(flags, run.dist)
    bad_step, signum, bad_loss, loss_sum, correct, count = torch.cat([flags, st.bad[1:], st.sums]).tolist()
    if bad_step >= 0:
        raise non_finite(run, st, int(bad_step), bad_loss)
    if bar is not None and run.dist.is_main and run.cfg.progress:
        post = {"loss": f"{loss_sum / max(count, 1):.4f}",
                "lr": f"{lr_at(st.step - 1, run.total_steps, run.warmup_steps, run.cfg.lr, run.cfg.min_lr):.2e}",
                "img/s": f"{count * run.dist.world_size / max(st.seconds, 1e-9):.0f}"}
        if run.data.task == "classification":
            post["acc"] = f"{correct / max(count, 1):.3f}"
        bar.set_postfix(post, refresh=False)
    return int(signum)


def non_finite(run: Run, st: RunState, bad_step: int, bad_loss: float) -> NonFiniteLoss:
    ckpt = run.run_dir / STATE_NAME
    last = f"{ckpt} (end of epoch {st.epoch})" if ckpt.exists() else "none yet"
    batch = bad_step - (st.step - st.batch_pos) + 1
    value = bad_loss if bad_loss != 0.0 else "non-finite"  # another rank's loss
    return NonFiniteLoss(
        f"loss is {value} at step {bad_step} (epoch {st.epoch + 1}, batch {batch}); stopped at step {st.step} "
        f"(the loss is read every --log-every {run.cfg.log_every} steps; nothing was saved after it). Last good "
        f"checkpoint kept: {last}. Try a lower --lr or --grad-clip.")


def interrupt(run: Run, st: RunState, signum: int) -> None:
    save_checkpoint(run, st, mid_epoch=True)
    barrier(run.dist)  # no rank exits (and makes torchrun kill the others) before rank 0 has written
    raise TrainingInterrupted(
        f"interrupted by signal {signum} at step {st.step} (epoch {st.epoch + 1}); state saved to "
        f"{run.run_dir / STATE_NAME}. Continue with: vitkit train --resume {shlex.quote(str(run.run_dir))}", signum)


# --------------------------------------------------------------------------- epoch end
def train_record(run: Run, st: RunState) -> tuple[dict[str, Any], float]:
    """The epoch's record so far (epoch, step, lr, train loss / accuracy) from the reduced sums, and
    the images counted."""
    cfg = run.cfg
    loss_sum, correct, count = all_reduce_sum(st.sums.clone(), run.dist).tolist()
    rec: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step,
                           "lr": lr_at(max(st.step - 1, 0), run.total_steps, run.warmup_steps, cfg.lr, cfg.min_lr),
                           "train_loss": loss_sum / max(count, 1)}
    if run.data.task == "classification":
        rec["train_accuracy"] = correct / max(count, 1)
    return rec, count


def end_epoch(run: Run, st: RunState, flag: _SignalFlag) -> None:
    """Read and reduce the epoch's sums, evaluate, write metrics / last / best / state."""
    cfg = run.cfg
    signum = read_point(run, st, flag)  # a non-finite loss raises here, before anything is saved
    seconds = st.seconds
    rec, count = train_record(run, st)
    st.epoch += 1
    st.batch_pos, st.seconds = 0, 0.0
    st.reset_sums()
    # a --max-steps stop at this epoch's end is not "last": the state saved here is the uninterrupted
    # run's, so a later --resume continues exactly (finish reports the stop's weights after it)
    last = st.epoch == cfg.epochs
    if st.epoch % cfg.eval_every == 0 or last:
        evaluate_epoch(run, st, rec, last)
    rec["epoch_seconds"] = round(seconds, 3)
    rec["images_per_second"] = round(count / max(seconds, 1e-9), 1)
    st.history.append(rec)
    if run.dist.is_main:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if run.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    run.tb.add_scalar(k, v, st.epoch)
    save_model(run, st, st.model, run.run_dir / "last", "model")
    save_checkpoint(run, st, mid_epoch=False)
    run.say(_epoch_line(rec, cfg.epochs))
    barrier(run.dist)
    if signum:
        raise TrainingInterrupted(
            f"interrupted by signal {signum} at the end of epoch {st.epoch}; state saved to "
            f"{run.run_dir / STATE_NAME}. Continue with: vitkit train --resume {shlex.quote(str(run.run_dir))}", signum)


def evaluate_epoch(run: Run, st: RunState, rec: dict[str, Any], last: bool) -> None:
    """Model and EMA on the validation split, into ``rec``; then best/ (see --select)."""
    cands = candidates(st)
    scores = validate(run, cands, rec)
    for which, score in scores.items():
        # --select best: validation accuracy moves in steps of 1/len(val) (0.56% on digits): on a
        # tie the lower validation loss wins, otherwise an early lucky epoch is kept forever.
        if run.cfg.select == "best" and score > st.best["score"]:
            pre = "val" if which == "model" else "val_ema"
            st.best = {"score": score, "epoch": st.epoch, "step": st.step, "which": which,
                       "val_accuracy": rec.get(f"{pre}_accuracy"), "val_loss": rec[f"{pre}_loss"]}
            save_model(run, st, cands[which], run.run_dir / "best", which)
    if run.cfg.select == "final" and last:
        choose_final(run, st, cands, scores, rec)


def candidates(st: RunState) -> dict[str, torch.nn.Module]:
    return {"model": st.model, **({"ema": st.ema.module} if st.ema is not None else {})}


def validate(run: Run, cands: dict[str, torch.nn.Module], rec: dict[str, Any]) -> dict[str, list[float]]:
    """Each candidate on the validation split, its numbers into ``rec``; {which: score}, score =
    [accuracy, -loss] (regression: [-loss, -loss]), compared as lists. {} without a validation split."""
    scores: dict[str, list[float]] = {}
    for which, m in cands.items() if run.val_loader is not None else []:
        r = evaluate(m, run.val_loader, **run.eval_kw)
        pre = "val" if which == "model" else "val_ema"
        rec[f"{pre}_loss"] = r["loss"]
        if run.data.task == "classification":
            rec[f"{pre}_accuracy"] = r["accuracy"]
            if r["top5"] is not None:
                rec[f"{pre}_top5"] = r["top5"]
            score = [r["accuracy"], -r["loss"]]
        else:
            rec[f"{pre}_mae"], rec[f"{pre}_rmse"], rec[f"{pre}_r2"] = r["mae"], r["rmse"], r["r2"]
            score = [-r["loss"], -r["loss"]]
        scores[which] = score
    return scores


def choose_final(run: Run, st: RunState, cands: dict[str, torch.nn.Module], scores: dict[str, list[float]],
                 rec: dict[str, Any]) -> None:
    """--select final: of the weights the schedule ends with, the model or its EMA, whichever scores
    better on validation (accuracy, then loss; regression: loss). A short run's EMA lags its model
    (issue 22), a long run's usually wins; on a tie, or with no validation split, the EMA."""
    which = max(scores, key=lambda w: (scores[w], w == "ema")) if scores else list(cands)[-1]
    pre = "val" if which == "model" else "val_ema"
    choice = None
    if len(scores) > 1:
        metric = "accuracy" if run.data.task == "classification" else "loss"
        other = "ema" if which == "model" else "model"
        opre = "val" if other == "model" else "val_ema"
        choice = (f"{which} (val {metric} {rec[f'{pre}_{metric}']:.4f}, loss {rec[f'{pre}_loss']:.4f}) over "
                  f"{other} ({rec[f'{opre}_{metric}']:.4f}, {rec[f'{opre}_loss']:.4f})")
    elif len(cands) > 1:
        choice = f"{which} (no validation split to choose by: the EMA, where the schedule ends)"
    st.best = {"score": scores.get(which, [0.0, 0.0]), "epoch": st.epoch, "step": st.step, "which": which,
               "val_accuracy": rec.get(f"{pre}_accuracy"), "val_loss": rec.get(f"{pre}_loss"), "choice": choice}
    if choice:
        run.say(f"final weights: {choice}")
    save_model(run, st, cands[which], run.run_dir / "best", which)


def save_checkpoint(run: Run, st: RunState, *, mid_epoch: bool, finished: bool = False) -> None:
    """train_state.pt, atomically (collective under torchrun; rank 0 writes)."""
    state = st.state_dict(run.dist, mid_epoch=mid_epoch, finished=finished)
    if run.dist.is_main:
        save_state(run.run_dir / STATE_NAME, state)


def save_model(run: Run, st: RunState, weights_src, directory: Path, which: str) -> None:
    """Save ``weights_src`` (the model or the EMA copy) with the model's labels and preprocessing."""
    from ..io import save_pretrained

    model = st.model
    if st.fsdp:  # gather the full weights (every rank), rank 0 saves a plain copy
        from .. import ViT

        full = st.model_state()
        if not run.dist.is_main:
            return
        weights_src = ViT(model.config)
        weights_src.load_state_dict(full)
    elif not run.dist.is_main:
        return
    if weights_src is not model:  # EMA / FSDP copy: carry labels / preprocess over
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


# --------------------------------------------------------------------------- the end
def test_split_name(data: DataSplits) -> str:
    """Which split the final numbers are measured on (summary.json's test_split): test, or val /
    train-holdout when the data has no test split (vitkit.data.validation)."""
    return data.test_name if data.test is not None else data.val_name


def finish(run: Run, st: RunState, t0: float) -> dict[str, Any]:
    """Test the best weights; write summary.json, test_report.json and the plots; mark the state finished."""
    from ..io import load_model
    from .plots import plot_confusion, plot_curves

    data, dist = run.data, run.dist
    done = st.epoch >= run.cfg.epochs
    if not done:  # --max-steps stopped this invocation: report the weights it ends with, as the run's end would
        where = f"the end of epoch {st.epoch}" if not st.batch_pos else f"epoch {st.epoch + 1}, batch {st.batch_pos}"
        run.say(f"stopped by --max-steps {run.cfg.max_steps} at step {st.step} of {run.total_steps} ({where}); "
                f"state saved: continue with vitkit train --resume {shlex.quote(str(run.run_dir))}")
        stop_record(run, st)
    split = test_split_name(data)
    best_dir = run.run_dir / "best"
    best_model = load_model(best_dir, device=run.device) if best_dir.exists() else st.model
    test = data.test if data.test is not None else data.val
    r = evaluate(best_model, test, workers=run.cfg.workers, **run.eval_kw)
    wall = round(time.time() - t0 + st.wall_seconds, 2)
    summary: dict[str, Any] = {
        "dataset": data.name, "task": data.task, "epochs": st.history[-1]["epoch"] if st.history else 0,
        "steps": st.step, "params": st.model.num_params(), "test_split": split, "test_loss": r["loss"],
        "finished": done, "best_epoch": st.best["epoch"], "best_step": st.best.get("step"),
        "best_weights": st.best["which"], "weights_choice": st.best.get("choice"),
        "ema_decay": st.ema.decay if st.ema is not None else None, "wall_seconds": wall,
        "world_size": dist.world_size, "threads": torch.get_num_threads(), "run_dir": str(run.run_dir),
        "skipped_images": st.loader.skipped + len(getattr(data, "skipped_files", [])),
        # an image of the run's own data for the "next:" commands (file datasets only)
        "example_image": str(test.paths[0]) if getattr(test, "paths", None) else None}
    if data.task == "classification":
        final = run.stop_rec or (st.history[-1] if st.history else {})
        summary.update(test_accuracy=r["accuracy"], test_macro_f1=r["macro_f1"],
                       best_val_accuracy=st.best["val_accuracy"], final_val_accuracy=final.get("val_accuracy"),
                       final_val_ema_accuracy=final.get("val_ema_accuracy"))
        if r["top5"] is not None:  # with 5 classes or fewer top-5 is always 1.0
            summary["test_top5"] = r["top5"]
    else:
        summary.update(test_mae=r["mae"], test_rmse=r["rmse"], test_r2=r["r2"], best_val_loss=st.best.get("val_loss"))
    if dist.is_main:
        _write_results(run, st, r, summary, plot_curves, plot_confusion)
    if done:  # a stopped run's state stays the one saved where it stopped: --resume continues exactly
        st.wall_seconds = wall
        save_checkpoint(run, st, mid_epoch=False, finished=True)
    return summary


def stop_record(run: Run, st: RunState) -> None:
    """Where --max-steps stopped this invocation: the model and EMA on validation, and with --select
    final (or no best epoch yet) best/ = the better of them, as the run's end would choose. Inside an
    epoch, metrics.jsonl gets a ``"partial": true`` line for the epoch so far (a resume rewrites the file
    to the saved history). Nothing here reaches the saved state."""
    rec: dict[str, Any] = {}
    if st.batch_pos:
        rec, count = train_record(run, st)
        rec["partial"] = True
    cands = candidates(st)
    scores = validate(run, cands, rec)
    if run.cfg.select == "final" or st.best["epoch"] < 0:
        choose_final(run, st, cands, scores, rec)
    if st.batch_pos:
        rec["epoch_seconds"] = round(st.seconds, 3)
        rec["images_per_second"] = round(count / max(st.seconds, 1e-9), 1)
        run.stop_rec = rec
        if run.dist.is_main:
            with open(run.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")


def _write_results(run: Run, st: RunState, r: dict[str, Any], summary: dict[str, Any], plot_curves,
                   plot_confusion) -> None:
    data, run_dir, split = run.data, run.run_dir, summary["test_split"]
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if st.history:
        plot_curves(st.history, run_dir / "curves.png")
    where = f"on the {split} split" + (" (no test split: it also selected the best epoch)"
                                       if data.test is None or data.test is data.val else "")
    if data.task == "classification":
        plot_confusion(r["confusion_matrix"], data.classes, run_dir / "confusion_matrix.png",
                       title=f"{data.name} {split}, accuracy {r['accuracy']:.4f}")
        atomic_write_text(run_dir / "test_report.json", json.dumps(r, indent=2) + "\n")
        top5 = f"top-5 {r['top5']:.4f}, " if r["top5"] is not None else ""
        b = st.best
        mid = st.batch_pos and b.get("step") == st.step  # chosen where --max-steps stopped inside an epoch
        when = f"at step {st.step}" if mid else f"of epoch {b['epoch']}"
        run.say(f"test accuracy {r['accuracy']:.4f} ({top5}loss {r['loss']:.4f}) {where} with the "
                f"{'best ' if run.cfg.select == 'best' else ''}{b['which']} weights {when}  |  "
                f"{summary['wall_seconds']:.1f} s  |  {run_dir}")
    else:
        run.say(f"test MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  R^2 {r['r2']:.4f} {where}  |  "
                f"{summary['wall_seconds']:.1f} s  |  {run_dir}")
