"""Several processes under `accelerate launch`: who builds, who waits, who writes.

`accelerate launch` (torchrun underneath) starts the same command once per device and describes
the group in the environment (WORLD_SIZE, RANK, LOCAL_RANK, ACCELERATE_USE_FSDP/_DEEPSPEED).
Stages that write shared files run on the main process while the others wait at a barrier; only
training is done by every process. Without a launcher everything here is a single-process no-op.
"""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments

from pipeline import artifacts

# The barrier timeout TrainingArguments would give the group (its `ddp_timeout` default): the
# other processes wait this long for the main one to import the base model and build the data.
TIMEOUT = timedelta(seconds=TrainingArguments.ddp_timeout)


class LaunchError(RuntimeError):
    """The launch configuration cannot work on this machine."""


def on_cpu() -> bool:
    # accelerate's torchrun launcher does not export the config's `use_cpu`, so no CUDA decides.
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"


def check_launch() -> None:
    """Refuse, before any process does work, a launch configuration this machine cannot run."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not importlib.util.find_spec("deepspeed"):
        raise LaunchError("this accelerate config uses DeepSpeed, which is not installed: `pip install deepspeed` "
                          "(needs CUDA), or use recipes/accelerate/fsdp.yaml or multi-gpu.yaml")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and on_cpu():
        raise LaunchError("this accelerate config uses FSDP, which shards the model over GPUs, and this machine has "
                          "none; on CPU use recipes/accelerate/cpu-2proc.yaml (data parallel over gloo)")
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not on_cpu() and per_machine > torch.cuda.device_count():
        # Otherwise NCCL fails later with "Duplicate GPU detected", after the data stage.
        raise LaunchError(f"{per_machine} processes per machine but {torch.cuda.device_count()} GPUs: pass "
                          f"--num_processes {torch.cuda.device_count()} (times the number of machines)")


def state() -> PartialState:
    """The launch's process group, set up as transformers' TrainingArguments sets it up.

    TrainingArguments re-creates accelerate's state later and reuses an initialised group, so both
    must agree: on a machine without CUDA that means `cpu=True` (gloo); with cpu=False every
    process would silently train alone.
    """
    check_launch()
    return PartialState(cpu=on_cpu(), timeout=TIMEOUT)


def begin(stage_dir: Path, inputs: dict, overwrite: bool = False, keep_partial: bool = False) -> bool:
    """`artifacts.begin` called by the main process alone; the others wait for its verdict.

    `begin` may delete a partial run and create the directory, so two processes calling it race.
    Afterwards the directory holds COMPLETE exactly when the main process chose to reuse it.
    """
    group = state()
    with group.main_process_first():
        if group.is_main_process:
            return artifacts.begin(stage_dir, inputs, overwrite, keep_partial)
    return (Path(stage_dir) / artifacts.COMPLETE).exists()
