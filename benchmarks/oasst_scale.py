"""Data-stage time at oasst1 size (88,838 messages) with 1 and 2 processes (`data.num_proc`).

    python benchmarks/oasst_scale.py [--num-proc 1 2] [--recipe recipes/small.yaml]

oasst1 cannot be downloaded here, so the input is made by replicating the shared OpenAssistant
sample until it holds as many messages as oasst1, written to /tmp (never committed). Each copy
gets fresh message and tree ids, and its first prompt a short "(copy N)" prefix: the data stage
drops repeated conversations, and exact copies would leave nothing to tokenize. The recipe's
tree_states filter is lifted because oasst1 holds only exported trees while most sample trees are
still waiting for replies. The base model (Gemma-3-270m for `small`) must be importable; its
import is cached, so only the first run pays for it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import uuid
from pathlib import Path

# Run as a script, so the checkout's `pipeline` (not an installed copy) is the one measured.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OASST1_MESSAGES = 88_838
SAMPLE = Path(__file__).resolve().parents[1] / "../shared/data/oasst/oasst2_sample551.trees.jsonl"


def size(message: dict) -> int:
    return 1 + sum(size(r) for r in message.get("replies") or [])


def trim(message: dict, budget: int) -> int:
    """Drop replies (deepest subtrees last) until the subtree holds at most `budget` messages."""
    replies = message.get("replies") or []
    kept, used = [], 1
    for reply in replies:
        if used >= budget:
            break
        used += trim(reply, budget - used)
        kept.append(reply)
    message["replies"] = kept
    return used


def renumber(tree: dict, copy_index: int) -> dict:
    """The tree with fresh ids everywhere and a numbered first prompt."""
    tree = copy.deepcopy(tree)
    tree_id = str(uuid.uuid4())
    tree["message_tree_id"] = tree_id
    stack = [(tree["prompt"], None)]
    while stack:
        message, parent = stack.pop()
        message["message_id"] = tree_id if parent is None else str(uuid.uuid4())
        message["parent_id"] = parent
        message["message_tree_id"] = tree_id
        stack.extend((reply, message["message_id"]) for reply in message.get("replies") or [])
    tree["prompt"]["text"] = f"(copy {copy_index}) {tree['prompt']['text']}"
    return tree


def make_input(path: Path, sample: Path = SAMPLE, target: int = OASST1_MESSAGES) -> Path:
    """Write the replicated trees export with exactly `target` messages (cached by size)."""
    if path.exists() and sum(size(json.loads(line)["prompt"]) for line in path.open()) == target:
        return path
    trees = [json.loads(line) for line in sample.open()]
    total, copy_index = 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        while total < target:
            copy_index += 1
            for tree in trees:
                if total >= target:
                    break
                fresh = renumber(tree, copy_index)
                total += trim(fresh["prompt"], target - total)
                handle.write(json.dumps(fresh, ensure_ascii=False) + "\n")
    assert total == target, total
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--recipe", default="recipes/small.yaml")
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--input", type=Path, default=Path("/tmp/oasst1-size/oasst1_size.trees.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/oasst1-size/runs"))
    args = parser.parse_args()

    import logging

    from pipeline.config import load_recipe
    from pipeline.data import build_data
    from pipeline.import_base import import_base

    logging.basicConfig(level=logging.WARNING)
    source = make_input(args.input, args.sample)
    results = []
    for num_proc in args.num_proc:
        recipe = load_recipe(args.recipe, [f"--out_dir={args.out}/num_proc{num_proc}", f"--data.source={source}",
                                           f"--data.num_proc={num_proc}", "--data.tree_states=[]"])
        import_base(recipe)
        start, cpu = time.perf_counter(), time.process_time()
        out = build_data(recipe, overwrite=True)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        results.append({"num_proc": num_proc, "stage_seconds": round(wall, 1),
                        "records": report["records_read"], "threads": report["threads"],
                        "train_examples": report["splits"]["train"]["examples"],
                        "tokens": report["splits"]["train"]["tokens"] + report["splits"]["validation"]["tokens"],
                        "main_process_cpu_seconds": round(time.process_time() - cpu, 1),
                        "load_average": round(os.getloadavg()[0], 1)})
        print(json.dumps(results[-1]), flush=True)
    print("\n| data.num_proc | data stage (s) | trees | threads | tokens |\n| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['num_proc']} | {r['stage_seconds']} | {r['records']} | {r['threads']} | {r['tokens']} |")


if __name__ == "__main__":
    main()
