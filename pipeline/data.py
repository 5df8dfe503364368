"""Stage 2: conversation records -> chat-formatted, tokenized SFT splits with a data card.

Everything up to rendering is pure functions on plain dicts: read records, assemble
trees, prune messages, walk threads, check roles, deduplicate, split by tree. Every record
or thread left out is appended to one `skipped` list as {line, kind, reason, ...}: `invalid`
(unusable data), `filtered` (usable but excluded by the recipe) or `trimmed` (kept, shortened).
That list is written to quarantine.jsonl and counted by reason in report.json and the card.
All walks are iterative, so a 10,000-turn chain cannot overflow the stack.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline import artifacts
from pipeline.config import DataConfig, Recipe

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
ROLES = {"prompter": "user", "assistant": "assistant"}
REQUIRED = {"message_id": str, "text": str, "role": str}
# Optional message fields whose wrong type would otherwise be misread (a string "false" is truthy).
OPTIONAL = {"parent_id": str, "lang": str, "deleted": bool, "synthetic": bool, "review_result": bool,
            "replies": list}
RAW_CHARS = 2000  # raw text kept per quarantined line: enough to find and fix it, not a copy of the data
MAX_NESTING = 200_000  # JSON nesting levels (two per turn in the trees layout) parsed before a line is refused


class DataError(RuntimeError):
    """A systemic problem: the whole build is wrong, not one record."""


def skip(skipped: list, kind: str, reason: str, line: int | None, **details) -> None:
    skipped.append({"line": line, "kind": kind, "reason": reason, **details})


def counts(skipped: list, kind: str) -> dict:
    return dict(Counter(s["reason"] for s in skipped if s["kind"] == kind).most_common())


# --------------------------------------------------------------------------- reading


def parse_json(text: str):
    """json.loads, also for deeply nested lines (a long chain in the trees layout nests two levels per
    turn). CPython's decoder recurses in C, so deep lines are parsed on a thread with a large stack."""
    try:
        return json.loads(text)
    except RecursionError:
        pass
    depth = text.count("{") + text.count("[")  # an upper bound on the nesting
    if depth > MAX_NESTING:
        raise ValueError("too_deep")
    result = {}

    def work():
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * depth + 1000))
        try:
            result["value"] = json.loads(text)
        except (ValueError, RecursionError) as error:
            result["error"] = error
        finally:
            sys.setrecursionlimit(limit)

    old = threading.stack_size(1 << 29)  # 512 MiB of address space, committed only as used
    try:
        worker = threading.Thread(target=work, name="deep-json")
        worker.start()
        worker.join()
    finally:
        threading.stack_size(old)
    if "error" in result:
        raise ValueError("too_deep") from result["error"]
    return result["value"]


def read_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Yield (line number, record, reason it is unreadable, raw line) for a .jsonl(.gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, "invalid_utf8", raw.decode("utf-8", "replace")
                continue
            try:
                record = parse_json(text)
            except ValueError as error:  # JSONDecodeError is a ValueError
                yield number, None, "too_deep" if str(error) == "too_deep" else "malformed_json", text
                continue
            if not isinstance(record, dict):
                yield number, None, "not_an_object", text
                continue
            yield number, record, None, text


def read_records(source: str, hub_splits: Iterable[str]) -> Iterator[tuple[int, dict | None, str | None, str]]:
    path = Path(source)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, record, None, ""
    elif path.exists():
        yield from read_lines(path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        from datasets import load_dataset

        number = 0
        for split in hub_splits:
            for record in load_dataset(source, split=split):
                number += 1
                yield number, record, None, ""
    else:
        raise DataError(f"data source {source!r} is neither a file nor a Hub dataset id")


def record_layout(record: dict) -> str | None:
    """`trees` (one tree per record under `prompt`), `messages` (flat oasst1), or None."""
    if "prompt" in record:
        return "trees"
    if "message_id" in record or "parent_id" in record:
        return "messages"
    return None


def detect_layout(records: Iterable[dict], source: str = "input") -> str:
    """The layout of the first recognisable record; one stray record does not decide for the file."""
    first = None
    for record in records:
        layout = record_layout(record)
        if layout:
            return layout
        first = first or record
    keys = sorted(first)[:12] if first else []
    raise DataError(f"{source}: unrecognised layout: no record is an OpenAssistant tree (`prompt`) or message "
                    f"(`message_id`, `parent_id`); first record keys: {keys}")


def message_problem(message: dict) -> str | None:
    """Why a message cannot be used at all (quarantined), or None."""
    for key, kind in REQUIRED.items():
        if not isinstance(message.get(key), kind):
            return f"missing_or_bad_{key}"
    for key, kind in OPTIONAL.items():
        if message.get(key) is not None and not isinstance(message[key], kind):
            return f"missing_or_bad_{key}"
    if message["role"] not in ROLES:
        return "unknown_role"
    text = message["text"]
    if "\x00" in text:
        return "nul_byte"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate"
    if not text.strip():
        return "empty_text"
    rank = message.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float) or rank != rank):
        return "missing_or_bad_rank"
    return None


def flatten_tree(root: dict) -> list[dict]:
    """Nested tree -> its messages without `replies`, parents before children (the flat oasst1 layout)."""
    flat, stack = [], [root]
    while stack:
        node = stack.pop()
        flat.append({k: v for k, v in node.items() if k != "replies"})
        replies = node.get("replies")
        stack.extend(reversed(replies) if isinstance(replies, list) else ())
    return flat


def trees_from_messages(rows: list[tuple[int, dict]], skipped: list) -> list[dict]:
    """Assemble flat oasst1 messages into nested trees, keeping file order among siblings.

    Duplicate ids keep the first; orphans (unknown parent) and messages on a parent cycle are
    quarantined with every descendant. Content problems are left to `prune_tree`, so that the
    replies under a bad message are counted as dropped with it rather than as orphans.
    """
    nodes = {}
    for line, message in rows:
        mid = message["message_id"]
        if mid in nodes:
            skip(skipped, "invalid", "duplicate_message_id", line, message_id=mid)
            continue
        nodes[mid] = {k: v for k, v in message.items() if k != "replies"} | {"replies": [], "_line": line}
    roots = []
    for mid, node in nodes.items():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(node)
        elif parent in nodes and parent != mid:
            nodes[parent]["replies"].append(node)
    reached, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        reached.add(node["message_id"])
        stack.extend(node["replies"])
    for mid, node in nodes.items():
        if mid in reached:
            continue
        # Walk up until a missing parent (orphan) or a repeat (cycle), iteratively.
        seen, cursor = set(), node
        while cursor is not None and cursor["message_id"] not in seen:
            seen.add(cursor["message_id"])
            cursor = nodes.get(cursor.get("parent_id"))
        reason = "orphan" if cursor is None else "cycle"
        skip(skipped, "invalid", reason, node["_line"], message_id=mid, parent_id=node.get("parent_id"))
    return [{"message_tree_id": r.get("message_tree_id") or r["message_id"], "tree_state": r.get("tree_state"),
             "prompt": r, "_line": r["_line"]} for r in roots]


def load_trees(source: str, skipped: list, hub_splits: Iterable[str] = ("train",)) -> tuple[list[dict], int, str]:
    """Read either layout into nested trees. Returns (trees, records read, layout); unusable records go to
    `skipped`. Raises DataError when no record has a recognisable layout."""
    rows, total = [], 0
    for line, record, problem, raw in read_records(source, hub_splits):
        total += 1
        if problem:
            skip(skipped, "invalid", problem, line, raw=raw[:RAW_CHARS])
        else:
            rows.append((line, record, raw))
    if not rows:
        raise DataError(f"{source}: no readable records ({total} lines; "
                        f"{counts(skipped, 'invalid') or 'the file is empty'})")
    layout = detect_layout((record for _, record, _ in rows), source)
    trees, flat = [], []
    for line, record, raw in rows:
        kind = record_layout(record)
        if kind != layout:
            skip(skipped, "invalid", f"not_a_{layout}_record", line, raw=raw[:RAW_CHARS])
        elif layout == "trees":
            if not isinstance(record["prompt"], dict):
                skip(skipped, "invalid", "missing_or_bad_prompt", line, raw=raw[:RAW_CHARS])
                continue
            trees.append(record | {"_line": line})
        elif not isinstance(record.get("message_id"), str):
            skip(skipped, "invalid", "missing_or_bad_message_id", line, raw=raw[:RAW_CHARS])
        elif "parent_id" not in record or not isinstance(record["parent_id"], str | None):
            skip(skipped, "invalid", "missing_or_bad_parent_id", line, raw=raw[:RAW_CHARS])
        else:
            flat.append((line, record))
    if layout == "messages":
        trees = trees_from_messages(flat, skipped)
    return trees, total, layout


# --------------------------------------------------------------------------- filtering and walking


def filter_reason(message: dict, cfg: DataConfig) -> str | None:
    """Why a well-formed message is left out of training (counted, not quarantined), or None."""
    if message.get("deleted"):
        return "deleted"
    if cfg.require_review and message.get("review_result") is not True:
        return "not_reviewed"
    if message.get("synthetic") and not cfg.keep_synthetic:
        return "synthetic"
    if cfg.languages and message.get("lang") not in cfg.languages:
        return "language"
    length = len(message["text"].strip())
    if length < cfg.min_chars:
        return "too_short"
    if length > cfg.max_chars:
        return "too_long"
    return None


def subtree_size(message: dict) -> int:
    size, stack = 0, [message]
    while stack:
        node = stack.pop()
        size += 1
        replies = node.get("replies") if isinstance(node, dict) else None
        stack.extend(replies if isinstance(replies, list) else ())
    return size


def prune_tree(tree: dict, cfg: DataConfig, skipped: list, seen: set | None = None) -> dict | None:
    """Copy of the tree's root with unusable messages removed together with their subtrees.

    `seen` holds message and tree ids across trees, so an id used twice anywhere in the file is caught.
    """
    seen = set() if seen is None else seen
    tree_line = tree.get("_line")
    tree_id = tree.get("message_tree_id")
    if not isinstance(tree_id, str | None) or not isinstance(tree.get("tree_state"), str | None):
        skip(skipped, "invalid", "missing_or_bad_tree_fields", tree_line, message_tree_id=str(tree_id)[:100])
        return None
    if cfg.tree_states and tree.get("tree_state") not in cfg.tree_states:
        skip(skipped, "filtered", "tree_state", tree_line, message_tree_id=tree_id,
             tree_state=tree.get("tree_state"))
        return None
    if tree_id is not None and ("tree", tree_id) in seen:
        # Exports do repeat whole trees (the oasst2 sample lists 31 twice); the first copy is kept.
        skip(skipped, "invalid", "duplicate_tree", tree_line, message_tree_id=tree_id)
        return None
    seen.add(("tree", tree_id))

    def keep(message, parent_id) -> bool:
        # Flat messages carry their own line; nested ones share their tree's.
        line = message.get("_line", tree_line) if isinstance(message, dict) else tree_line
        if not isinstance(message, dict):
            skip(skipped, "invalid", "not_an_object", line)
            return False
        problem = message_problem(message)
        if problem is None and message["message_id"] in seen:
            problem = "duplicate_message_id"
        if problem is None and parent_id is not None and message.get("parent_id") not in (None, parent_id):
            problem = "parent_mismatch"  # a nested reply that names another parent: the tree is inconsistent
        kind, reason = ("invalid", problem) if problem else ("filtered", filter_reason(message, cfg))
        if reason is None:
            seen.add(message["message_id"])
            return True
        message_id = message.get("message_id")
        skip(skipped, kind, reason, line, message_id=message_id if isinstance(message_id, str) else None,
             dropped_messages=subtree_size(message))
        return False

    root = tree["prompt"]
    if not keep(root, None):
        return None
    copy = {k: v for k, v in root.items() if k != "replies"} | {"replies": []}
    stack = [(root, copy)]
    while stack:
        original, pruned = stack.pop()
        for reply in original.get("replies") or []:
            if keep(reply, original["message_id"]):
                child = {k: v for k, v in reply.items() if k != "replies"} | {"replies": []}
                pruned["replies"].append(child)
                stack.append((reply, child))
    return copy


def rank_key(indexed: tuple[int, dict]):
    index, message = indexed
    rank = message.get("rank")
    return (rank is None, rank if rank is not None else 0, index)


def best_thread(root: dict) -> list[dict]:
    """Follow the best-ranked reply at every turn (unranked replies come after ranked ones)."""
    thread, node = [root], root
    while node["replies"]:
        node = min(enumerate(node["replies"]), key=rank_key)[1]
        thread.append(node)
    return thread


def all_threads(root: dict) -> list[list[dict]]:
    """Every root-to-leaf path, depth-first, without recursion. Paths are rebuilt from parent links at
    the leaves, so a deep chain costs its length, not its length squared."""
    threads, stack, parents = [], [(root, None)], {}
    while stack:
        node, parent = stack.pop()
        parents[id(node)] = (node, parent)
        if not node["replies"]:
            path, cursor = [], (node, parent)
            while cursor is not None:
                path.append(cursor[0])
                cursor = parents[id(cursor[1])] if cursor[1] is not None else None
            threads.append(path[::-1])
        stack.extend((reply, node) for reply in reversed(node["replies"]))
    return threads


def trim_to_assistant(thread: list[dict]) -> list[dict]:
    """A training thread ends on an assistant message: drop trailing prompter turns."""
    end = len(thread)
    while end and thread[end - 1]["role"] != "assistant":
        end -= 1
    return thread[:end]


def alternates(thread: list[dict]) -> bool:
    return all(m["role"] == ("prompter" if i % 2 == 0 else "assistant") for i, m in enumerate(thread))


def conversation_key(thread: list[dict]) -> tuple:
    return tuple((m["role"], " ".join(m["text"].lower().split())) for m in thread)


def extract_threads(trees: list[dict], cfg: DataConfig, skipped: list) -> list[dict]:
    """Pruned trees -> unique, alternating threads that end on an assistant reply, as
    {tree_id, lang, source_line, messages}."""
    threads, seen_conversations, seen_ids = [], set(), set()
    for tree in trees:
        root = prune_tree(tree, cfg, skipped, seen_ids)
        if root is None:
            continue
        line, tree_id = tree.get("_line"), str(tree.get("message_tree_id") or root["message_id"])
        paths = [best_thread(root)] if cfg.threads == "best" else all_threads(root)
        for path in paths:
            thread = trim_to_assistant(path)
            if len(thread) < 2:
                skip(skipped, "filtered", "no_assistant_reply", line, tree_id=tree_id)
                continue
            if not alternates(thread):
                skip(skipped, "filtered", "roles_not_alternating", line, tree_id=tree_id,
                     roles=[m["role"] for m in thread][:20])
                continue
            if len(thread) < len(path):
                # Counted, not dropped: the turns before a trailing prompter message are a complete example.
                skip(skipped, "trimmed", "ends_on_prompter", line, tree_id=tree_id,
                     dropped_messages=len(path) - len(thread))
            key = conversation_key(thread)
            if key in seen_conversations:
                skip(skipped, "filtered", "duplicate_conversation", line, tree_id=tree_id)
                continue
            seen_conversations.add(key)
            threads.append({
                "tree_id": tree_id,
                "lang": root.get("lang") or "unknown",
                "source_line": line,
                "messages": [{"role": ROLES[m["role"]], "content": m["text"].strip()} for m in thread],
            })
    return threads


def skip_rate(skipped: list, records: int) -> float:
    """Fraction of input records (lines) with at least one invalid part."""
    bad_lines = {s["line"] for s in skipped if s["kind"] == "invalid"}
    return len(bad_lines) / max(records, 1)


def check_skip_rate(skipped: list, records: int, cfg: DataConfig) -> float:
    rate = skip_rate(skipped, records)
    if rate > cfg.max_skip_rate:
        first = [f"{s['reason']} at line {s['line']}" for s in skipped if s["kind"] == "invalid"][:3]
        raise DataError(f"{cfg.source}: {rate:.0%} of {records} records are invalid (over data.max_skip_rate="
                        f"{cfg.max_skip_rate}): {counts(skipped, 'invalid')}; first: {'; '.join(first)}")
    return rate


def split_by_tree(threads: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    tree_ids = sorted({t["tree_id"] for t in threads})
    random.Random(seed).shuffle(tree_ids)
    n_val = min(len(tree_ids) - 1, max(1, round(fraction * len(tree_ids)))) if fraction > 0 else 0
    held_out = set(tree_ids[:n_val])
    return [t for t in threads if t["tree_id"] not in held_out], [t for t in threads if t["tree_id"] in held_out]


# --------------------------------------------------------------------------- rendering


def chat_template_for(tokenizer, choice: str) -> str:
    """The template used for training and serving; it must mark generations."""
    if choice == "auto":
        own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        if own and re.search(r"\{%-?\s*generation\s*-?%\}", own):
            return own
        choice = "chatml" if "<|im_start|>" in tokenizer.get_vocab() else "gemma"
    path = TEMPLATES / f"{choice}.jinja" if choice in ("gemma", "chatml") else Path(choice)
    return path.read_text()


def end_of_turn_id(tokenizer, template: str) -> int:
    """The token that closes an assistant turn: the last special token inside the generation block."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    if not any(mask):
        raise DataError("the chat template marks no assistant tokens: wrap replies in {% generation %}")
    return ids[max(i for i, bit in enumerate(mask) if bit)]


def tokenize_threads(threads: list[dict], tokenizer, template: str, max_length: int,
                     skipped: list, batch: int = 512) -> list[dict]:
    """Render and tokenize with assistant masks; cut over-long threads at a turn boundary.

    Each assistant span must end on the end-of-turn token, and a cut only ever falls right after
    one, so no example ends mid-reply with its end-of-turn token untrained. A thread whose first
    reply does not fit is dropped, counted.
    """
    eot = end_of_turn_id(tokenizer, template)
    rows = []
    for start in range(0, len(threads), batch):
        chunk = threads[start:start + batch]
        encoded = tokenizer.apply_chat_template(
            [t["messages"] for t in chunk], chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)
        for thread, ids, mask in zip(chunk, encoded["input_ids"], encoded["assistant_masks"]):
            span_ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
            if not span_ends:
                raise DataError(f"thread from line {thread.get('source_line')} (tree {thread['tree_id']}) has no "
                                "trainable token: the chat template dropped its assistant turns")
            if any(ids[end - 1] != eot for end in span_ends):
                raise DataError("the chat template leaves an assistant turn without its end-of-turn token trained")
            fitting = [end for end in span_ends if end <= max_length]
            line, tree_id = thread.get("source_line"), thread["tree_id"]
            if not fitting:
                skip(skipped, "filtered", "first_reply_over_max_length", line, tree_id=tree_id, tokens=len(ids))
                continue
            # Rows end on the last kept end-of-turn token; the template's untrained newline after it goes too.
            cut = fitting[-1]
            kept_turns = len(fitting)
            if kept_turns < len(span_ends):
                skip(skipped, "trimmed", "truncated_at_turn_boundary", line, tree_id=tree_id, tokens=len(ids),
                     kept_turns=kept_turns, dropped_turns=len(span_ends) - kept_turns)
            rows.append(thread | {
                "messages": thread["messages"][: 2 * kept_turns],
                "input_ids": ids[:cut],
                "assistant_masks": mask[:cut],
            })
    return rows


# Forked tokenizing workers inherit these instead of unpickling a tokenizer (~30 MB for Gemma).
_WORKER: dict = {}


def _keep_for_workers(tokenizer, template: str, max_length: int) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, max_length=max_length)


def _tokenize_chunk(threads: list[dict]) -> tuple[list[dict], list[dict]]:
    skipped = []
    rows = tokenize_threads(threads, _WORKER["tokenizer"], _WORKER["template"], _WORKER["max_length"], skipped)
    return rows, skipped


def tokenize_parallel(threads: list[dict], tokenizer, template: str, max_length: int, skipped: list,
                      num_proc: int = 1) -> list[dict]:
    """`tokenize_threads` over `num_proc` forked processes; rows and skips as from one process.

    Rendering the template and cutting at turn boundaries is Python, so one process keeps one core
    busy. Contiguous chunks come back in order, so the output does not depend on `num_proc`.
    """
    if num_proc <= 1 or len(threads) < 2 * num_proc:
        return tokenize_threads(threads, tokenizer, template, max_length, skipped)
    size = -(-len(threads) // (4 * num_proc))  # a few chunks per process even out their lengths
    chunks = [threads[i:i + size] for i in range(0, len(threads), size)]
    shared = (tokenizer, template, max_length)
    with multiprocessing.get_context("fork").Pool(num_proc, _keep_for_workers, shared) as pool:
        parts = pool.map(_tokenize_chunk, chunks, chunksize=1)
    rows = []
    for part, part_skipped in parts:
        rows += part
        skipped += part_skipped
    return rows


# --------------------------------------------------------------------------- cache

# What a build writes that depends on its inputs only; README.md (names the recipe) and report.json
# (timings) are rewritten on a cache hit.
CACHED_FILES = ("train.parquet", "validation.parquet", "chat_template.jinja", "quarantine.jsonl", "report.json")
# Files of a model directory that are not the tokenizer: weights and stage bookkeeping.
NOT_TOKENIZER = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5"}
STAGE_FILES = {artifacts.COMPLETE, "metrics.json", "provenance.json", "recipe.yaml", "source.json"}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cache_key(cfg: DataConfig, base_dir: Path) -> str:
    """Content address of a build: the same key means the same files, whatever the paths.

    Covers the data settings (but `num_proc` and `cache_dir`, which do not change the output), the
    source's bytes (a Hub dataset by its id, as the stage itself does), every tokenizer file of the
    base, the templates a `chat_template` choice can resolve to, this module's code, and the versions
    of the libraries that tokenize.
    """
    from importlib import metadata

    source = Path(cfg.source)
    templates = sorted(TEMPLATES.glob("*.jinja"))
    if cfg.chat_template not in ("auto", "gemma", "chatml"):
        templates.append(Path(cfg.chat_template))
    tokenizer_files = sorted(p for p in Path(base_dir).iterdir()
                             if p.is_file() and p.suffix not in NOT_TOKENIZER and p.name not in STAGE_FILES)
    key = {
        "data": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_proc", "cache_dir")},
        "source": {"sha256": file_digest(source)} if source.is_file() else {"hub": cfg.source},
        "tokenizer": {p.name: file_digest(p) for p in tokenizer_files},
        "templates": {str(p): file_digest(p) for p in templates if p.is_file()},
        "code": file_digest(Path(__file__)),
        "libraries": {name: metadata.version(name) for name in ("tokenizers", "transformers", "jinja2")},
    }
    return artifacts.fingerprint(key)


def cache_dir_for(cfg: DataConfig, base_dir: Path) -> Path | None:
    return Path(cfg.cache_dir).expanduser() / cache_key(cfg, base_dir) if cfg.cache_dir else None


def restore_cached(cache: Path, out: Path) -> dict | None:
    """Link a cached build into `out`; its report, or None when the cache holds no complete build."""
    if not (cache / artifacts.COMPLETE).exists():
        return None
    for name in CACHED_FILES:
        artifacts.link_file(cache / name, out / name)
    return json.loads((cache / "report.json").read_text())


def store_cached(out: Path, cache: Path) -> None:
    """Copy a finished build into the cache: staged, then renamed, so a reader never sees half of it."""
    if (cache / artifacts.COMPLETE).exists():
        return
    staging = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in CACHED_FILES:
        artifacts.link_file(out / name, staging / name)
    (staging / artifacts.COMPLETE).write_text("")
    try:
        staging.rename(cache)
    except OSError:  # another process stored the same build first
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- stage


def length_stats(rows: list[dict]) -> dict:
    lengths = sorted(len(r["input_ids"]) for r in rows)
    if not lengths:
        return {}
    trained = [sum(r["assistant_masks"]) for r in rows]
    return {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "assistant_tokens": sum(trained),
        "mean": round(statistics.fmean(lengths), 1),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
    }


def build_data(recipe: Recipe, overwrite: bool = False) -> Path:
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg, base_dir, out = recipe.data, recipe.out / "base", recipe.out / "data"
    source = Path(cfg.source)
    source_id = {"path": str(source.resolve()), "bytes": source.stat().st_size,
                 "mtime": int(source.stat().st_mtime)} if source.exists() else {"hub": cfg.source}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}  # where, not what
    inputs = {"data": settings, "source": source_id, "base": artifacts.upstream(base_dir)}
    if artifacts.begin(out, inputs, overwrite):
        log.info("data: reusing %s", out)
        return out
    start = time.perf_counter()
    cache = cache_dir_for(cfg, base_dir)
    cached = restore_cached(cache, out) if cache else None
    if cached is not None:
        log.info("data: cache hit %s", cache)
        report = cached | {"source": cfg.source, "cache_hit": True, "seconds": round(time.perf_counter() - start, 2)}
        artifacts.write_json(out / "report.json", report)
        (out / "README.md").write_text(data_card(recipe, report))
        return artifacts.finish(out, "data", inputs, recipe, report)
    skipped = []
    trees, n_records, layout = load_trees(cfg.source, skipped, cfg.hub_splits)
    threads = extract_threads(trees, cfg, skipped)
    rate = check_skip_rate(skipped, n_records, cfg)
    if not threads:
        raise DataError(f"{cfg.source}: no conversation survived filtering (invalid: {counts(skipped, 'invalid')}; "
                        f"filtered: {counts(skipped, 'filtered')})")
    train, validation = split_by_tree(threads, cfg.validation_fraction, cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = chat_template_for(tokenizer, cfg.chat_template)
    splits = {name: tokenize_parallel(rows, tokenizer, template, cfg.max_length, skipped, cfg.num_proc)
              for name, rows in (("train", train), ("validation", validation))}
    for name, rows in splits.items():
        if not rows and (name == "train" or validation):
            raise DataError(f"{cfg.source}: no {name} example fits data.max_length={cfg.max_length} "
                            f"({counts(skipped, 'filtered').get('first_reply_over_max_length', 0)} threads dropped)")
    for name, rows in splits.items():
        Dataset.from_list(rows).to_parquet(str(out / f"{name}.parquet"))
    (out / "chat_template.jinja").write_text(template)
    with open(out / "quarantine.jsonl", "w") as handle:
        for item in skipped:
            handle.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")

    report = {
        "source": cfg.source,
        "layout": layout,
        "records_read": n_records,
        "trees": len(trees),
        "threads": len(threads),
        "invalid_record_rate": round(rate, 4),
        "quarantined": counts(skipped, "invalid"),
        "filtered": counts(skipped, "filtered"),
        "trimmed": counts(skipped, "trimmed"),
        "splits": {name: length_stats(rows) for name, rows in splits.items()},
        "split_trees": {name: len({r["tree_id"] for r in rows}) for name, rows in splits.items()},
        "languages": dict(Counter(r["lang"] for rows in splits.values() for r in rows).most_common()),
        "turns": dict(sorted(Counter(len(r["messages"]) // 2 for r in splits["train"]).items())),
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer, template)),
        "cache_hit": False,
        "seconds": round(time.perf_counter() - start, 2),
    }
    artifacts.write_json(out / "report.json", report)
    (out / "README.md").write_text(data_card(recipe, report))
    if cache:
        store_cached(out, cache)
    return artifacts.finish(out, "data", inputs, recipe, report)


def data_card(recipe: Recipe, report: dict) -> str:
    """A Hugging Face dataset card for the built splits."""
    languages = list(report["languages"])
    lines = [
        "---",
        f"language: {json.dumps(languages)}",
        "task_categories: [text-generation]",
        f"pretty_name: SFT data for recipe {recipe.name}",
        "configs:",
        "- config_name: default",
        "  data_files: [{split: train, path: train.parquet}, {split: validation, path: validation.parquet}]",
        "---",
        f"# SFT data built for `{recipe.name}`",
        "",
        "## Source",
        f"`{report['source']}` ({report['layout']} layout): {report['records_read']} records, "
        f"{report['trees']} trees, {report['threads']} threads after filtering "
        f"(`{recipe.data.threads}` thread extraction). {report['invalid_record_rate']:.1%} of records were "
        f"invalid (the build fails above data.max_skip_rate={recipe.data.max_skip_rate}).",
        "",
        "## Splits (by tree; no tree is in both)",
        "| split | trees | examples | tokens | assistant tokens | mean | p50 | p95 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, stats in report["splits"].items():
        if stats:
            lines.append(f"| {name} | {report['split_trees'][name]} | {stats['examples']} | {stats['tokens']} | "
                         f"{stats['assistant_tokens']} | {stats['mean']} | {stats['p50']} | {stats['p95']} | "
                         f"{stats['max']} |")
    lines += ["", "## Languages", ", ".join(f"{k}: {v}" for k, v in report["languages"].items()), "",
              "## Turns per training example", ", ".join(f"{k}: {v}" for k, v in report["turns"].items()), "",
              "## Skipped and trimmed",
              "Every entry is in `quarantine.jsonl` with its source line number. `invalid`: unusable records; "
              "`filtered`: excluded by the recipe; `trimmed`: kept, shortened at a turn boundary.", "",
              "| reason | count | kind |", "| --- | --- | --- |"]
    for kind, key in (("invalid", "quarantined"), ("filtered", "filtered"), ("trimmed", "trimmed")):
        lines += [f"| {k} | {v} | {kind} |" for k, v in report[key].items()]
    lines += ["", "## Format",
              f"Rendered with the chat template in `chat_template.jinja`; only assistant tokens and the "
              f"end-of-turn token `{report['end_of_turn_token']}` are trained (`assistant_masks`).", ""]
    return "\n".join(lines)
