"""The training loop, top to bottom: ``train(cfg)``.

    setup_process, build_run   device, data, model, optimizer, EMA, schedule, loaders  (vitkit.train.build)
    run_directory              the one place a run directory is chosen, created and held (vitkit.train.rundir)
    open_session               restore a saved state, write config.yaml / amendments  (vitkit.train.session)
    for each epoch:
      run_epoch      for each batch of the loader: train_step; every --log-every steps: read_point
      end_epoch      read the sums, evaluate_epoch (model and EMA on val), write metrics, last/, best/,
                     save_checkpoint (train_state.pt)
    finish           the final weights (model or EMA, chosen on validation), tested; summary.json,
                     curves.png, confusion_matrix.png

This module is ~490 lines on purpose: the step, the epoch and the end of a run are one story, read
in one file (DESIGN.md, style 10); building, resuming and the session live beside it.

Everything that is saved and resumed is one object, :class:`vitkit.train.state.RunState`; what the
loop reads is the :class:`vitkit.train.build.Run` (frozen) and this invocation's
:class:`vitkit.train.session.Session`.

Resume (``train(cfg, resume=RUN)``): the run's effective config (config.yaml + amendments.yaml) is
compared with ``cfg`` before anything is written; changes outside RESUME_CHANGEABLE are refused,
allowed ones appended to amendments.yaml (:mod:`vitkit.train.resume`). ``--max-steps N`` stops this
invocation after N steps and saves the state there (mid-epoch, as a signal does), so a later resume
continues exactly; a run dir with a config.yaml but no train_state.pt yet starts again from its beginning.

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
import json
import shlex
import time
from pathlib import Path
from typing import Any

import torch

from ..data import DataSplits, DataWorkerError
from ..data.augment import apply_affine, sample_affine, step_generator
from ..distributed import all_reduce_max, all_reduce_sum, barrier, cleanup
from ..errors import ConfigError
from ..eval.evaluate import evaluate, normalize
from ..io import atomic_write_text
from ..progress import progress_bar
from .amp import amp_name
from .build import Run, build_run, setup_process
from .checkpoint import STATE_NAME
from .config import TrainConfig
from .optim import lr_at, set_lr
from .resume import check_same_labels, read_resume
from .rundir import run_directory
from .session import (
    NonFiniteLoss,
    Session,
    StopSignals,
    TrainingInterrupted,
    open_session,
    save_checkpoint,
    save_model,
)
from .state import RunState

__all__ = ["train", "TrainingInterrupted", "NonFiniteLoss"]


def _quiet(*a, **k) -> None:
    pass


def train(cfg: TrainConfig, resume: str | Path | None = None, log=print, on_step=None) -> dict[str, Any]:
    """Train (or resume) one run; returns the summary dict (also written to summary.json).

    ``on_step(state)``: called after every optimizer step with the :class:`RunState` (progress
    hooks; tests use it to interrupt a run at an exact step)."""
    t0 = time.time()
    if resume is not None and cfg.overwrite:
        raise ConfigError("--overwrite replaces a run with a new one; it cannot be combined with --resume")
    device, dist = setup_process(cfg)
    log = log if dist.is_main else _quiet
    with StopSignals() as signals:
        if resume is None:  # everything is checked before a directory is claimed
            run, state = build_run(cfg, device, dist, log)
            with run_directory(run.cfg, None, dist) as run_dir:
                summary = run_session(run, state, open_session(run, state, run_dir, signals, on_step), t0)
        else:  # the lock first: the state of a live run is neither read nor resumed twice
            with run_directory(cfg, resume, dist) as run_dir:
                cfg, amended, saved = read_resume(run_dir, cfg, resume, log)
                run, state = build_run(cfg, device, dist, log, resumed=True)
                check_same_labels(saved, run.data.classes, run.cfg.data_dir, resume)
                if saved is None:
                    log(f"{resume} has no training state yet (it stopped before its first checkpoint): starting it "
                        f"from the beginning with its recorded config")
                session = open_session(run, state, run_dir, signals, on_step, saved=saved, amended=amended,
                                       resumed=True)
                summary = run_session(run, state, session, t0)
    cleanup(dist)
    return summary


def run_session(run: Run, state: RunState, session: Session, t0: float) -> dict[str, Any]:
    """Epochs until the end (or this invocation's --max-steps), then finish; in the claimed run directory."""
    try:
        while state.epoch < run.cfg.epochs:
            if run_epoch(run, state, session):  # --max-steps inside the epoch: its position is saved
                break
            end_epoch(run, state, session)
            if session.stop_at and state.step >= session.stop_at:
                break
        return finish(run, state, session, t0)
    except RuntimeError as e:  # torch reports a dead worker from its SIGCHLD handler, anywhere
        if "DataLoader worker" not in str(e):
            raise
        raise DataWorkerError(
            f"a data loader worker died ({str(e).strip().splitlines()[0]}); nothing was saved after the last "
            f"checkpoint {session.run_dir / STATE_NAME}: continue with vitkit train --resume "
            f"{shlex.quote(str(session.run_dir))}") from e
    finally:
        if session.tb is not None:
            session.tb.close()


# --------------------------------------------------------------------------- one step, one epoch
def train_step(run: Run, state: RunState, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """One optimizer step on this rank's batch (x normalised; in [0, 1] for the batch affine): device
    augmentation, forward, loss (with --teacher: vitkit.train.distill's), backward (over --accum-steps
    micro-batches), clip, step, EMA. No host sync. ``index``: the batch's rows in the training set (--teacher-cache's loader)."""
    cfg = run.cfg
    set_lr(state.optimizer, lr_at(state.step, run.total_steps, run.warmup_steps, cfg.lr, cfg.min_lr))
    y_host = y
    x, y = host_to_device(x, run.device), host_to_device(y, run.device)  # the loader pinned them
    # The batch affine runs on [0, 1] images (its zero padding is black), then normalises; without it the
    # loader's workers normalised (and --train-only probe's x is the cached features, vitkit.train.adapt)
    if run.affine is not None:  # parameters drawn on the host: the same stream on every device
        x = apply_affine(x, host_to_device(step_theta(run, state.step, len(x)), run.device))
        x = normalize(x, run.data.mean, run.data.std)
    y_hard = y
    if run.mixer is not None:
        # Labels mixed on the host: torchvision's one_hot checks the label range, which on device
        # labels is a host sync per step. The images are mixed on the device, by the same lam.
        x, y_soft = run.mixer(x, y_host)
        y = host_to_device(y_soft, run.device)
    parts = min(cfg.accum_steps, len(x))
    rows = index.tensor_split(parts) if index is not None else [None] * parts
    for k, (xc, yc, hc, rc) in enumerate(zip(x.tensor_split(parts), y.tensor_split(parts), y_hard.tensor_split(parts),
                                             rows)):
        # the teacher's outputs first, outside the student's autocast (it has its own dtype)
        target = run.distill.targets(xc, rc) if run.distill is not None else None
        no_sync = k < parts - 1 and hasattr(run.wrapped, "no_sync")  # DDP: all-reduce on the last part only
        with run.wrapped.no_sync() if no_sync else contextlib.nullcontext(), \
                torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            out = run.wrapped(xc)
            if target is None:
                loss = run.loss_fn(out.float(), yc)
            else:  # out: the logits scored below (token modes: the mean of the two heads)
                out, loss = run.distill.loss(out, yc, target)
        state.scaler.scale(loss * (len(xc) / len(x))).backward()
        if run.data.task == "classification":  # an unlabelled row's label (-1) is never a prediction
            state.note_loss(loss, (out.argmax(1) == hc).sum(), len(xc), labelled=(hc >= 0).sum())
        else:
            state.note_loss(loss, loss.new_zeros(()), len(xc))
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update_parameters(state.model)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: pinned first on CUDA (a copy from pageable
    memory waits for the GPU's queue to drain; the loader's batches come pinned already)."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def step_theta(run: Run, step: int, n_local: int) -> torch.Tensor:
    """This rank's rows of the affine parameters drawn for the whole global batch of ``step``, so N
    processes and a resumed run see exactly the augmentation of one uninterrupted process."""
    theta = sample_affine(run.global_batch, step_generator(run.cfg.seed, step), *run.affine, run.hflip)
    per, extra = divmod(run.global_batch, run.dist.world_size)
    r = run.dist.rank
    begin = r * per + min(r, extra)
    return theta[begin:begin + n_local]


def run_epoch(run: Run, state: RunState, session: Session) -> bool:
    """Train through the rest of the epoch; True when --max-steps stopped this invocation inside it
    (last/ and the state are then saved mid-epoch, as a signal saves them, so --resume continues exactly)."""
    cfg = run.cfg
    run.wrapped.train()
    state.loader.set_epoch(state.epoch)
    bar = progress_bar(total=len(state.loader), initial=state.batch_pos, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                       disable=not (run.dist.is_main and cfg.progress), leave=False, unit="step")
    begin = time.time() - state.seconds
    at_limit = False
    for batch in state.loader:
        if batch is not None:  # None: every image of the batch skipped (--skip-bad-images)
            train_step(run, state, *batch)
        state.step += 1
        state.batch_pos += 1
        state.seconds = time.time() - begin
        bar.update(1)
        if session.on_step is not None:
            session.on_step(state)
        at_limit = bool(session.stop_at) and state.step >= session.stop_at
        local_signal = session.signals.signum and not run.dist.enabled  # torchrun: all ranks stop at a read point
        if local_signal or at_limit or state.step % cfg.log_every == 0:
            signum = read_point(run, state, session, bar)
            if signum and not at_limit:
                bar.close()
                interrupt(run, state, session, signum)
        if at_limit:
            break
    bar.close()
    if at_limit and state.batch_pos < len(state.loader):
        save_model(run, state, state.model, session.run_dir / "last", "model")
        save_checkpoint(run, state, session, mid_epoch=True)
        barrier(run.dist)
        return True
    return False


def read_point(run: Run, state: RunState, session: Session, bar=None) -> int:
    """The loop's host sync: the first non-finite loss (raises), the stop signal (maximum over the
    ranks: one all-reduce) and the progress numbers. Returns the signal number (0: none)."""
    nonfinite = state.first_nonfinite
    flags = torch.stack([nonfinite[0], torch.full_like(nonfinite[0], float(session.signals.signum))])
    all_reduce_max(flags, run.dist)
    bad_step, signum, bad_loss, loss_sum, correct, count, labelled = torch.cat([flags, nonfinite[1:], state.sums]).tolist()
    if bad_step >= 0:
        raise non_finite(run, state, session, int(bad_step), bad_loss)
    if bar is not None and run.dist.is_main and run.cfg.progress:
        post = {"loss": f"{loss_sum / max(count, 1):.4f}",
                "lr": f"{lr_at(state.step - 1, run.total_steps, run.warmup_steps, run.cfg.lr, run.cfg.min_lr):.2e}",
                "img/s": f"{count * run.dist.world_size / max(state.seconds, 1e-9):.0f}"}
        if run.data.task == "classification":
            post["acc"] = f"{correct / max(labelled, 1):.3f}"
        bar.set_postfix(post, refresh=False)
    return int(signum)


def non_finite(run: Run, state: RunState, session: Session, bad_step: int, bad_loss: float) -> NonFiniteLoss:
    ckpt = session.run_dir / STATE_NAME
    last = f"{ckpt} (end of epoch {state.epoch})" if ckpt.exists() else "none yet"
    batch = bad_step - (state.step - state.batch_pos) + 1
    value = bad_loss if bad_loss != 0.0 else "non-finite"  # another rank's loss
    return NonFiniteLoss(
        f"loss is {value} at step {bad_step} (epoch {state.epoch + 1}, batch {batch}); stopped at step {state.step} "
        f"(the loss is read every --log-every {run.cfg.log_every} steps; nothing was saved after it). Last good "
        f"checkpoint kept: {last}. Try a lower --lr or --grad-clip.")


def interrupt(run: Run, state: RunState, session: Session, signum: int) -> None:
    save_checkpoint(run, state, session, mid_epoch=True)
    barrier(run.dist)  # no rank exits (and makes torchrun kill the others) before rank 0 has written
    raise TrainingInterrupted(
        f"interrupted by signal {signum} at step {state.step} (epoch {state.epoch + 1}); state saved to "
        f"{session.run_dir / STATE_NAME}. Continue with: vitkit train --resume {shlex.quote(str(session.run_dir))}",
        signum)


# --------------------------------------------------------------------------- epoch end
def train_record(run: Run, state: RunState) -> tuple[dict[str, Any], float]:
    """The epoch's record so far (epoch, step, lr, train loss / accuracy) from the reduced sums, and
    the images counted."""
    cfg = run.cfg
    loss_sum, correct, count, labelled = all_reduce_sum(state.sums.clone(), run.dist).tolist()
    rec: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step,
                           "lr": lr_at(max(state.step - 1, 0), run.total_steps, run.warmup_steps, cfg.lr, cfg.min_lr),
                           "train_loss": loss_sum / max(count, 1)}
    if run.data.task == "classification":
        rec["train_accuracy"] = correct / max(labelled, 1)  # of the labelled images (--unlabeled's are not)
    return rec, count


def end_epoch(run: Run, state: RunState, session: Session) -> None:
    """Read and reduce the epoch's sums, evaluate, write metrics / last / best / state."""
    cfg = run.cfg
    signum = read_point(run, state, session)  # a non-finite loss raises here, before anything is saved
    seconds = state.seconds
    rec, count = train_record(run, state)
    state.epoch += 1
    state.batch_pos, state.seconds = 0, 0.0
    state.reset_sums()
    # a --max-steps stop at this epoch's end is not "last": the state saved here is the uninterrupted
    # run's, so a later --resume continues exactly (finish reports the stop's weights after it)
    last = state.epoch == cfg.epochs
    if state.epoch % cfg.eval_every == 0 or last:
        evaluate_epoch(run, state, session, rec, last)
    rec["epoch_seconds"] = round(seconds, 3)
    rec["images_per_second"] = round(count / max(seconds, 1e-9), 1)
    state.history.append(rec)
    if run.dist.is_main:
        with open(session.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if session.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    session.tb.add_scalar(k, v, state.epoch)
    save_model(run, state, state.model, session.run_dir / "last", "model")
    save_checkpoint(run, state, session, mid_epoch=False)
    run.log(_epoch_line(rec, cfg.epochs))
    barrier(run.dist)
    if signum:
        raise TrainingInterrupted(
            f"interrupted by signal {signum} at the end of epoch {state.epoch}; state saved to "
            f"{session.run_dir / STATE_NAME}. Continue with: vitkit train --resume "
            f"{shlex.quote(str(session.run_dir))}", signum)


def evaluate_epoch(run: Run, state: RunState, session: Session, rec: dict[str, Any], last: bool) -> None:
    """Model and EMA on the validation split, into ``rec``; then best/ (see --select)."""
    cands = candidates(state)
    scores = validate(run, cands, rec)
    for which, score in scores.items():
        # --select best: validation accuracy moves in steps of 1/len(val) (0.56% on digits): on a
        # tie the lower validation loss wins, otherwise an early lucky epoch is kept forever.
        if run.cfg.select == "best" and score > state.best["score"]:
            pre = "val" if which == "model" else "val_ema"
            state.best = {"score": score, "epoch": state.epoch, "step": state.step, "which": which,
                       "val_accuracy": rec.get(f"{pre}_accuracy"), "val_loss": rec[f"{pre}_loss"]}
            save_model(run, state, cands[which], session.run_dir / "best", which)
    if run.cfg.select == "final" and last:
        choose_final(run, state, session, cands, scores, rec)


def candidates(state: RunState) -> dict[str, torch.nn.Module]:
    return {"model": state.model, **({"ema": state.ema.module} if state.ema is not None else {})}


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


def choose_final(run: Run, state: RunState, session: Session, cands: dict[str, torch.nn.Module],
                 scores: dict[str, list[float]], rec: dict[str, Any]) -> None:
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
    state.best = {"score": scores.get(which, [0.0, 0.0]), "epoch": state.epoch, "step": state.step, "which": which,
               "val_accuracy": rec.get(f"{pre}_accuracy"), "val_loss": rec.get(f"{pre}_loss"), "choice": choice}
    if choice:
        run.log(f"final weights: {choice}")
    save_model(run, state, cands[which], session.run_dir / "best", which)


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


def finish(run: Run, state: RunState, session: Session, t0: float) -> dict[str, Any]:
    """Test the best weights; write summary.json, test_report.json and the plots; mark the state finished."""
    from ..interop import load_model
    from .plots import plot_confusion, plot_curves

    data, dist, run_dir = run.data, run.dist, session.run_dir
    done = state.epoch >= run.cfg.epochs
    stop_rec: dict[str, Any] = {}
    if not done:  # --max-steps stopped this invocation: report the weights it ends with, as the run's end would
        where = f"the end of epoch {state.epoch}" if not state.batch_pos else f"epoch {state.epoch + 1}, batch {state.batch_pos}"
        run.log(f"stopped by --max-steps {run.cfg.max_steps} at step {state.step} of {run.total_steps} ({where}); "
                f"state saved: continue with vitkit train --resume {shlex.quote(str(run_dir))}")
        stop_rec = stop_record(run, state, session)
    split = test_split_name(data)
    best_dir = run_dir / "best"
    best_model = load_model(best_dir, device=run.device) if best_dir.exists() else state.model
    test = data.test if data.test is not None else data.val
    r = evaluate(best_model, test, workers=run.cfg.workers, **run.eval_kw)
    wall = round(time.time() - t0 + state.wall_seconds, 2)
    summary: dict[str, Any] = {
        "dataset": data.name, "task": data.task, "epochs": state.history[-1]["epoch"] if state.history else 0,
        "steps": state.step, "params": state.model.num_params(), "test_split": split, "test_loss": r["loss"],
        "finished": done, "best_epoch": state.best["epoch"], "best_step": state.best.get("step"),
        "best_weights": state.best["which"], "weights_choice": state.best.get("choice"),
        "ema_decay": state.ema.decay if state.ema is not None else None, "wall_seconds": wall,
        "world_size": dist.world_size, "threads": torch.get_num_threads(), "amp": amp_name(run.amp),
        "run_dir": str(run_dir),
        "skipped_images": state.loader.skipped + len(getattr(data, "skipped_files", [])),
        # an image of the run's own data for the "next:" commands (file datasets only)
        "example_image": str(test.paths[0]) if getattr(test, "paths", None) else None}
    if data.task == "classification":
        final = stop_rec or (state.history[-1] if state.history else {})
        summary.update(test_accuracy=r["accuracy"], test_macro_f1=r["macro_f1"],
                       best_val_accuracy=state.best["val_accuracy"], final_val_accuracy=final.get("val_accuracy"),
                       final_val_ema_accuracy=final.get("val_ema_accuracy"))
        if r["top5"] is not None:  # with 5 classes or fewer top-5 is always 1.0
            summary["test_top5"] = r["top5"]
    else:
        summary.update(test_mae=r["mae"], test_rmse=r["rmse"], test_r2=r["r2"], best_val_loss=state.best.get("val_loss"))
    if dist.is_main:
        _write_results(run, state, run_dir, r, summary, plot_curves, plot_confusion)
    if done:  # a stopped run's state stays the one saved where it stopped: --resume continues exactly
        state.wall_seconds = wall
        save_checkpoint(run, state, session, mid_epoch=False, finished=True)
    return summary


def stop_record(run: Run, state: RunState, session: Session) -> dict[str, Any]:
    """Where --max-steps stopped this invocation: the model and EMA on validation, and with --select
    final (or no best epoch yet) best/ = the better of them, as the run's end would choose. Inside an
    epoch, metrics.jsonl gets a ``"partial": true`` line for the epoch so far (a resume rewrites the file
    to the saved history); that record is returned ({} at an epoch end). Nothing here reaches the saved state."""
    rec: dict[str, Any] = {}
    if state.batch_pos:
        rec, count = train_record(run, state)
        rec["partial"] = True
    cands = candidates(state)
    scores = validate(run, cands, rec)
    if run.cfg.select == "final" or state.best["epoch"] < 0:
        choose_final(run, state, session, cands, scores, rec)
    if not state.batch_pos:
        return {}
    rec["epoch_seconds"] = round(state.seconds, 3)
    rec["images_per_second"] = round(count / max(state.seconds, 1e-9), 1)
    if run.dist.is_main:
        with open(session.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def _write_results(run: Run, state: RunState, run_dir: Path, r: dict[str, Any], summary: dict[str, Any], plot_curves,
                   plot_confusion) -> None:
    data, split = run.data, summary["test_split"]
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if state.history:
        plot_curves(state.history, run_dir / "curves.png")
    where = f"on the {split} split" + (" (no test split: it also selected the best epoch)"
                                       if data.test is None or data.test is data.val else "")
    if data.task == "classification":
        plot_confusion(r["confusion_matrix"], data.classes, run_dir / "confusion_matrix.png",
                       title=f"{data.name} {split}, accuracy {r['accuracy']:.4f}")
        atomic_write_text(run_dir / "test_report.json", json.dumps(r, indent=2) + "\n")
        top5 = f"top-5 {r['top5']:.4f}, " if r["top5"] is not None else ""
        b = state.best
        mid = state.batch_pos and b.get("step") == state.step  # chosen where --max-steps stopped inside an epoch
        when = f"at step {state.step}" if mid else f"of epoch {b['epoch']}"
        run.log(f"test accuracy {r['accuracy']:.4f} ({top5}loss {r['loss']:.4f}) {where} with the "
                f"{'best ' if run.cfg.select == 'best' else ''}{b['which']} weights {when}  |  "
                f"{summary['wall_seconds']:.1f} s  |  {run_dir}")
    else:
        run.log(f"test MAE {r['mae']:.4f}  RMSE {r['rmse']:.4f}  R^2 {r['r2']:.4f} {where}  |  "
                f"{summary['wall_seconds']:.1f} s  |  {run_dir}")
