"""`python -m pipeline <stage> --recipe <file> [--overwrite] [--section.key=value ...]`

Tools beside the stages: `python -m pipeline bench --recipe <file> [--steps N] ...` (see pipeline/bench.py).

Also runs under `accelerate launch [--config_file recipes/accelerate/<cfg>.yaml] -m pipeline ...`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from pipeline import distributed
from pipeline.artifacts import StageConflict
from pipeline.checkpoints import CheckpointError, TrainingInterrupted
from pipeline.config import RecipeError, load_recipe
from pipeline.data import DataError, build_data
from pipeline.evaluate import evaluate
from pipeline.import_base import import_base
from pipeline.merge import merge
from pipeline.train import batch_layout, train

# The tuned model is evaluated from merged weights, so merge runs before eval.
STAGES = {
    "import-base": import_base,
    "data": build_data,
    "train": train,
    "merge": merge,
    "eval": evaluate,
}
# Commands that are not stages: they write no stage directory and take their own arguments.
TOOLS = {
    "bench": "pipeline.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("stage", choices=[*STAGES, "sft", *TOOLS])
    parser.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/small.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace a stage built from another recipe")
    args, overrides = parser.parse_known_args(argv)
    # Expected failures end with one line that names the cause and a distinct status, not a traceback.
    try:
        return run_stages(args, overrides)
    except TrainingInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr, flush=True)
        return error.exit_status
    except (RecipeError, StageConflict, DataError, CheckpointError, FloatingPointError,
            distributed.LaunchError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 2


def run_stages(args, overrides: list[str]) -> int:
    recipe = load_recipe(args.recipe, overrides)
    group = distributed.state()
    # One process speaks for the launch; the others only warn.
    logging.basicConfig(level=logging.INFO if group.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    stages = STAGES if args.stage == "sft" else {args.stage: STAGES[args.stage]}
    if "train" in stages:
        batch_layout(recipe.train, group.num_processes)  # a global batch the launch cannot split fails now
    for name, run in stages.items():
        start = time.perf_counter()
        path = run_stage(name, run, recipe, args.overwrite, group)
        if group.is_main_process:
            print(f"[{name}] -> {path} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


def run_stage(name, run, recipe, overwrite: bool, group):
    """One stage on every process of a launch (a single process without one).

    Training is the only stage all processes share. The base import and the data are built by the
    main process while the others wait, then found complete and reused by them; merge and eval run
    once, on the main process.
    """
    if name == "train" or group.num_processes == 1:
        return run(recipe, overwrite=overwrite)
    if name in ("import-base", "data"):
        with group.main_process_first():
            return run(recipe, overwrite=overwrite)
    return run(recipe, overwrite=overwrite) if group.is_main_process else None


if __name__ == "__main__":
    sys.exit(main())
