"""`python -m pipeline <stage> --recipe <file> [--overwrite] [--section.key=value ...]`"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import load_recipe
from pipeline.data import build_data
from pipeline.evaluate import evaluate
from pipeline.import_base import import_base
from pipeline.merge import merge
from pipeline.train import train

# The tuned model is evaluated from merged weights, so merge runs before eval.
STAGES = {
    "import-base": import_base,
    "data": build_data,
    "train": train,
    "merge": merge,
    "eval": evaluate,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("stage", choices=[*STAGES, "sft"])
    parser.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/small.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace a stage built from another recipe")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, overrides)
    stages = STAGES if args.stage == "sft" else {args.stage: STAGES[args.stage]}
    for name, run in stages.items():
        print(f"[{name}] -> {run(recipe, overwrite=args.overwrite)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
