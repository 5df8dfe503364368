"""Shared test helpers: synthetic OpenAssistant data in both layouts, tiny models, pipeline runs.

Nothing here copies the shared OpenAssistant data; synthetic conversations are made from a fixed
word list so tests never depend on files outside the repository.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
WORDS = ("sky blue light sun red wave short long scatter air water cloud rain green tree leaf root seed "
         "grow fast slow cold warm heat ice river sea salt sand stone hill snow wind storm star moon").split()


def sentence(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def message(mid: str, parent: str | None, role: str, text: str, **extra) -> dict:
    return {"message_id": mid, "parent_id": parent, "text": text, "role": role, "lang": "en",
            "review_count": 3, "review_result": True, "deleted": False, "rank": extra.pop("rank", None),
            "synthetic": False, **extra}


def synthetic_tree(rng: random.Random, tree_id: str, turns: int, branches: int = 1) -> dict:
    """A ready_for_export tree: a prompter root and `turns` alternating levels, `branches` replies each."""
    root = message(tree_id, None, "prompter", sentence(rng))
    frontier, count = [root], 0
    for depth in range(1, turns):
        role = "assistant" if depth % 2 else "prompter"
        next_frontier = []
        for parent in frontier:
            parent["replies"] = []
            for rank in range(branches):
                count += 1
                child = message(f"{tree_id}-{count}", parent["message_id"], role, sentence(rng),
                                rank=rank if branches > 1 else None)
                parent["replies"].append(child)
                next_frontier.append(child)
        frontier = next_frontier
    for leaf in frontier:
        leaf["replies"] = []
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": root}


def synthetic_trees(n: int, seed: int = 0, branches: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [synthetic_tree(rng, f"tree{i:04d}", rng.choice([2, 4, 6]), branches) for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def chain_tree_line(depth: int, tree_id: str = "deep") -> str:
    """A `depth`-message alternating chain as one trees-layout JSON line, built as text: json.dumps
    recurses and would overflow on it."""
    opens, closes = [], []
    for i in range(depth):
        role = "prompter" if i % 2 == 0 else "assistant"
        mid = tree_id if i == 0 else f"{tree_id}-{i}"
        parent = json.dumps(None if i == 0 else (tree_id if i == 1 else f"{tree_id}-{i - 1}"))
        fields = json.dumps(message(mid, None, role, f"turn {i}"))[1:-1].replace('"parent_id": null',
                                                                                 f'"parent_id": {parent}')
        opens.append("{" + fields + ', "replies": [')
        closes.append("]}")
    prompt = "".join(opens) + "".join(closes)
    return f'{{"message_tree_id": "{tree_id}", "tree_state": "ready_for_export", "prompt": {prompt}}}'


def chain_messages(depth: int, tree_id: str = "deep") -> list[dict]:
    out = []
    for i in range(depth):
        mid = tree_id if i == 0 else f"{tree_id}-{i}"
        parent = None if i == 0 else (tree_id if i == 1 else f"{tree_id}-{i - 1}")
        out.append(message(mid, parent, "prompter" if i % 2 == 0 else "assistant", f"turn {i}",
                           message_tree_id=tree_id, tree_state="ready_for_export"))
    return out


# A fast variant of recipes/tiny.yaml: short synthetic conversations, LoRA, gradient accumulation 2.
FAST = ["--data.max_length=128", "--train.max_steps=8", "--train.batch_size=4", "--train.micro_batch_size=2",
        "--train.logging_steps=1", "--train.warmup=0", "--eval.max_prompts=2", "--eval.max_new_tokens=4"]


def cli(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, from the repository root."""
    result = subprocess.run([PYTHON, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
