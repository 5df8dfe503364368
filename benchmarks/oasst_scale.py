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
import resource
import shutil
import subprocess
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


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers: unlike wall time, blind to other load."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def recipe_for(args, num_proc: int):
    from pipeline.config import load_recipe

    return load_recipe(args.recipe, [f"--out_dir={args.out}/num_proc{num_proc}", f"--data.source={args.input}",
                                     f"--data.num_proc={num_proc}", "--data.tree_states=[]"])


def time_stage(args, num_proc: int) -> dict:
    """The whole data stage, from the records file to the parquet splits and the card."""
    from pipeline.data import build_data
    from pipeline.import_base import import_base

    recipe = recipe_for(args, num_proc)
    import_base(recipe)
    shutil.rmtree(recipe.out / "data", ignore_errors=True)  # a finished build would be reused
    start, cpu = time.perf_counter(), cpu_seconds()
    out = build_data(recipe)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    report = json.loads((out / "report.json").read_text())
    return {"stage_seconds": round(seconds, 1), "stage_cpu_seconds": round(cpu, 1), "records": report["records_read"],
            "threads": report["threads"], "tokens": sum(split["tokens"] for split in report["splits"].values())}


def time_tokenize(args, num_proc: int) -> dict:
    """The part num_proc parallelises, alone: render, tokenize, cut at turn boundaries."""
    from collections import Counter

    from transformers import AutoTokenizer

    from pipeline.data import chat_template_for, extract_threads, load_trees, tokenize_parallel

    recipe = recipe_for(args, num_proc)
    trees, quarantined, _, _ = load_trees(str(args.input))
    threads = extract_threads(trees, recipe.data, quarantined, Counter())
    tokenizer = AutoTokenizer.from_pretrained(recipe.out / "base")
    template = chat_template_for(tokenizer, recipe.data.chat_template)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokenize_parallel(threads, tokenizer, template, recipe.data.max_length, Counter(), num_proc)
    return {"tokenize_seconds": round(time.perf_counter() - start, 1),
            "tokenize_cpu_seconds": round(cpu_seconds() - cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--recipe", default="recipes/small.yaml")
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--input", type=Path, default=Path("/tmp/oasst1-size/oasst1_size.trees.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/oasst1-size/runs"))
    parser.add_argument("--measure", choices=["stage", "tokenize"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.measure:  # one measurement in this fresh process
        (num_proc,) = args.num_proc
        print(json.dumps((time_stage if args.measure == "stage" else time_tokenize)(args, num_proc)))
        return

    import pyarrow.parquet as pq

    make_input(args.input, args.sample)
    results = []
    for num_proc in args.num_proc:
        # A fresh process per measurement: a tokenizer that has already run in parallel in a
        # process runs serially in the processes forked from it, which would skew the comparison.
        row = {"num_proc": num_proc}
        for measure in ("stage", "tokenize"):
            command = [sys.executable, __file__, "--measure", measure, "--num-proc", str(num_proc),
                       "--recipe", args.recipe, "--input", str(args.input), "--out", str(args.out)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            row |= json.loads(done.stdout.strip().splitlines()[-1])
        row["load_average"] = round(os.getloadavg()[0], 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    first = results[0]["num_proc"]
    for r in results[1:]:
        same = all(pq.read_table(args.out / f"num_proc{r['num_proc']}/data/{split}.parquet").equals(
            pq.read_table(args.out / f"num_proc{first}/data/{split}.parquet")) for split in ("train", "validation"))
        print(f"num_proc={r['num_proc']} output identical to num_proc={first}: {same}")
    print(f"\n{os.cpu_count()} CPU cores; {results[0]['records']} trees, {results[0]['threads']} threads, "
          f"{results[0]['tokens']} tokens\n\n| data.num_proc | data stage, wall (s) | data stage, CPU (s) "
          "| render + tokenize, wall (s) | render + tokenize, CPU (s) | load average |\n" + "| --- " * 6 + "|")
    for r in results:
        print(f"| {r['num_proc']} | {r['stage_seconds']} | {r['stage_cpu_seconds']} | {r['tokenize_seconds']} | "
              f"{r['tokenize_cpu_seconds']} | {r['load_average']} |")

if __name__ == "__main__":
    main()
