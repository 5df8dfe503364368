"""Interruptible training, complete checkpoints, exact resume, and a stop on divergence.

Three TrainerCallbacks passed to SFTTrainer, plus the resume-point logic train.py uses:

- `Interrupt`: SIGTERM/SIGINT only set a flag; at the end of the current optimizer step the
  callback asks the Trainer to save a checkpoint and stop, so a signal never lands mid-accumulation.
  train() then raises `TrainingInterrupted`, which the CLI turns into a non-zero exit that says so.
- `MarkComplete`: writes `COMPLETE` into a checkpoint after the Trainer has written every file.
  HF's `get_last_checkpoint` takes the highest-numbered folder even when a kill left it half
  written; `resume_point` only trusts marked ones.
- `StopOnNonFinite`: a non-finite loss, gradient norm or trainable weight stops training with an
  error. The Trainer's own `logging_nan_inf_filter` would hide a NaN loss behind earlier averages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline import artifacts

log = logging.getLogger(__name__)

COMPLETE = artifacts.COMPLETE
# What exact resume needs besides the marker: weights, optimizer moments, schedule position, step/epoch
# counters, and the RNG states that the data order and dropout continue from.
REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# The inputs of the run that writes the checkpoints, beside them (removed with them when the run finishes).
STARTED = "run_inputs.json"
INTERRUPTED_EXIT = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a complete checkpoint; `exit_status` is 128 + the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from exactly."""


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def missing_files(checkpoint: Path) -> list[str]:
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if not list(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def resume_point(checkpoints: Path) -> str | None:
    """The newest checkpoint marked complete; partial ones (no marker) are deleted, since training would
    otherwise write its next save into or next to them. A marked checkpoint that lacks optimizer,
    scheduler or RNG state is an error: the Trainer would silently restart them."""
    found = sorted((p for p in Path(checkpoints).glob("checkpoint-*") if checkpoint_step(p) is not None),
                   key=checkpoint_step)
    complete = [p for p in found if (p / COMPLETE).is_file()]
    for partial in (p for p in found if p not in complete):
        log.warning("train: deleting partial checkpoint %s (no %s marker)", partial, COMPLETE)
        shutil.rmtree(partial)
    if not complete:
        log.warning("train: train.resume is set but %s holds no complete checkpoint; starting at step 0",
                    checkpoints)
        return None
    newest = complete[-1]
    missing = missing_files(newest)
    if missing:
        raise CheckpointError(f"{newest} is marked complete but lacks {missing}; resuming from it would restart "
                              "the optimizer or schedule. Delete it to resume from an older checkpoint, or set "
                              "train.resume=false to start over.")
    log.info("train: resuming from %s", newest)
    return str(newest)


def check_same_run(checkpoints: Path, inputs: dict, resume: bool) -> None:
    """A resumed run must continue the run that wrote the checkpoints, not one with another recipe."""
    path = Path(checkpoints) / STARTED
    normal = json.loads(json.dumps(inputs, default=str))
    if resume and path.is_file():
        changes = artifacts._diff(json.loads(path.read_text()), normal)
        if changes:
            raise artifacts.StageConflict(f"{checkpoints} holds checkpoints of a run with another recipe "
                                          f"({'; '.join(changes)}); set train.resume=false to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(path, normal)


def _any_process(flag: bool, device) -> bool:
    """Every process must stop at the same step, or the others wait forever in the next collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


class Interrupt(TrainerCallback):
    """SIGTERM/SIGINT -> checkpoint at the end of the current optimizer step, then stop.

    A second signal gives up on the checkpoint and restores the default behaviour.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("train: %s received; saving a checkpoint at the end of this step",
                    signal.Signals(signum).name)

    def _restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        # Python delivers signals to the main thread only; elsewhere (a notebook thread) keep defaults.
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.received is not None, args.device):
            self.received = self.received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()


class MarkComplete(TrainerCallback):
    """Write the completeness marker last, once the Trainer has saved every file of the checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its RNG state
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        missing = missing_files(checkpoint)
        if missing:
            raise CheckpointError(f"{checkpoint} was saved without {missing} (save_only_model?); it cannot be "
                                  "resumed from exactly")
        marker = checkpoint / COMPLETE
        marker.write_text(json.dumps({"global_step": state.global_step}) + "\n")
        with open(marker) as handle:
            os.fsync(handle.fileno())


class StopOnNonFinite(TrainerCallback):
    """Raise FloatingPointError as soon as training diverges, naming the step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        # One stacked check: a single device sync per step, not one per parameter.
        if params and not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
            raise FloatingPointError(f"training diverged: non-finite trainable weights after step "
                                     f"{state.global_step}; lower train.learning_rate")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(f"training diverged: {key}={value} at step {state.global_step}; "
                                         "lower train.learning_rate")
