"""One invocation of ``train()`` on a built run: the :class:`Session` (the claimed run directory,
where ``--max-steps`` stops this invocation, the stop signals, the progress hook, TensorBoard),
opened once by :func:`open_session`; what it writes into the run directory (config.yaml,
amendments.yaml, last/ and best/ weights, train_state.pt); the two ways an invocation stops early.

A run may take several sessions (``--resume``); what carries over between them is the saved
:class:`vitkit.train.state.RunState`, never a Session.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, VitkitError
from ..io import atomic_write_text
from .amp import amp_name
from .build import Run
from .checkpoint import STATE_NAME, save_state
from .resume import AMENDMENTS_FILE, record_amendment
from .state import RunState

CONFIG_FILE = "config.yaml"


class TrainingInterrupted(VitkitError):
    """SIGINT / SIGTERM arrived: the state was saved; resume with ``vitkit train --resume RUN``."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


class NonFiniteLoss(VitkitError):
    pass


class StopSignals:
    """Turns SIGINT / SIGTERM into a number (``signum``, 0: none) checked between steps (then: save,
    exit non-zero). A second signal aborts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
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


@dataclass(frozen=True)
class Session:
    run_dir: Path
    stop_at: int  # the step at which this invocation's --max-steps stops it (0: none)
    signals: StopSignals
    on_step: Callable[[RunState], None] | None  # called after every optimizer step (progress hooks, tests)
    tb: Any  # a TensorBoard SummaryWriter (rank 0, --tensorboard), or None


def open_session(run: Run, state: RunState, run_dir: Path, signals: StopSignals, on_step, *,
                 saved: dict[str, Any] | None = None, amended: dict[str, tuple[Any, Any]] | None = None,
                 resumed: bool = False) -> Session:
    """Restore a saved state; write config.yaml (a new run: a recipe, it never carries where to write)
    or amendments.yaml (a resumed run's changes, beside its config.yaml, never over it); say hello."""
    cfg, data, dist = run.cfg, run.data, run.dist
    if saved is not None:
        try:
            state.load_state_dict(saved, dist)
        except (RuntimeError, KeyError, ValueError) as e:  # torch's size mismatch: the state is not this model's
            raise CheckpointError(f"{run_dir / STATE_NAME} does not fit the model built from the run's config "
                                  f"({str(e).strip().splitlines()[0][:300]})") from e
        if run.distill is not None:  # the teacher it began with, the feature projection
            run.distill.load_state_dict(saved.get("distill"), str(run_dir / STATE_NAME))
    if dist.is_main:
        if not resumed:
            cfg.replace(out=None).save(run_dir / CONFIG_FILE)
        elif amended:
            record_amendment(run_dir, {k: new for k, (_, new) in amended.items()}, step=state.step, epoch=state.epoch)
        if resumed:  # metrics.jsonl = exactly the epochs in the state (none for a restart)
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
    if amended:
        run.log(f"amended (recorded in {AMENDMENTS_FILE}): "
                + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in amended.items()))
    if saved is not None:
        run.log(f"resumed {run_dir} at epoch {state.epoch}, step {state.step}"
                + (f" (batch {state.batch_pos})" if state.batch_pos else ""))
    c = state.model.config
    run.log(f"run dir: {run_dir}  |  {data.name}: {len(data.train)} train images, {data.num_outputs} "
            f"{'classes' if data.task == 'classification' else 'targets'}  |  model: {state.model.num_params():,} "
            f"params, {c.num_tokens} tokens  |  device {run.device}, {torch.get_num_threads()} thread(s), "
            f"world {dist.world_size}")
    return Session(run_dir=run_dir, stop_at=state.step + cfg.max_steps if cfg.max_steps else 0, signals=signals,
                   on_step=on_step, tb=_tensorboard(run, run_dir))


def _tensorboard(run: Run, run_dir: Path):
    if not (run.cfg.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        run.log("--tensorboard: tensorboard is not installed (pip install tensorboard); skipping")
        return None
    return SummaryWriter(str(run_dir))


def save_checkpoint(run: Run, state: RunState, session: Session, *, mid_epoch: bool, finished: bool = False) -> None:
    """train_state.pt, atomically (collective under torchrun; rank 0 writes)."""
    saved = state.state_dict(run.dist, mid_epoch=mid_epoch, finished=finished)
    saved["amp"] = amp_name(run.amp)  # --amp auto's choice: a resume keeps it (vitkit.train.amp)
    if run.distill is not None:
        saved["distill"] = run.distill.state_dict()
    if run.dist.is_main:
        save_state(session.run_dir / STATE_NAME, saved)


def save_model(run: Run, state: RunState, weights_src, directory: Path, which: str) -> None:
    """Save ``weights_src`` (the model or the EMA copy) with the model's labels and preprocessing."""
    from ..io import save_pretrained

    model = state.model
    if state.fsdp:  # gather the full weights (every rank), rank 0 saves a plain copy
        from .. import ViT

        full = state.model_state()
        if not run.dist.is_main:
            return
        weights_src = ViT(model.config)
        weights_src.load_state_dict(full)
    elif not run.dist.is_main:
        return
    if weights_src is not model:  # EMA / FSDP copy: carry labels / preprocess over
        weights_src.labels, weights_src.preprocess_cfg = model.labels, model.preprocess_cfg
        weights_src.pretrained_info = model.pretrained_info
    if run.lora is not None:  # the merged model, and peft's adapter beside it (vitkit.train.adapt)
        from .adapt import save_lora

        save_lora(run.lora, weights_src, directory, which)
        return
    save_pretrained(weights_src, directory, weights=which)
