"""Deliberately corrupted copies of an OpenAssistant trees export, one bad-input case per line.

`corrupt_trees(lines)` takes the lines of a trees-layout file and returns (corrupted lines, cases);
`corrupt_messages(lines)` flattens it to the oasst1 messages layout first. Each case names the line
it damaged and the (kind, reason) the data stage must record there. The corrupted copies live in
temporary directories; nothing from the source data is committed.

    python -m tests.corrupt_oasst SOURCE.trees.jsonl   # prints the bad-input table
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import extract_threads, flatten_tree, parse_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import chain_tree_line  # noqa: E402


def clean_lines(lines: list[str], cfg: DataConfig) -> list[int]:
    """Indexes of lines whose tree yields a thread with nothing skipped (also no id shared with another
    line), so that one corruption shows alone."""
    trees = []
    for index, line in enumerate(lines):
        try:
            trees.append(json.loads(line) | {"_line": index + 1})
        except ValueError:
            pass
    skipped = []
    threads = extract_threads(trees, cfg, skipped)
    bad = {s["line"] for s in skipped}
    good = sorted({t["source_line"] for t in threads} - bad)
    return [line - 1 for line in good if json.loads(lines[line - 1])["prompt"].get("replies")]


def renamed(tree: dict, suffix: str) -> dict:
    """A copy of the tree with every id changed: the same conversation under new ids."""
    tree = copy.deepcopy(tree)
    tree["message_tree_id"] = f"{tree['message_tree_id']}{suffix}"
    stack = [(tree["prompt"], None)]
    while stack:
        node, parent = stack.pop()
        node["message_id"] += suffix
        node["parent_id"] = parent
        stack.extend((reply, node["message_id"]) for reply in node.get("replies", []))
    return tree


def best_leaf(root: dict) -> dict:
    node = root
    while node.get("replies"):
        node = min(node["replies"], key=lambda m: (m.get("rank") is None, m.get("rank") or 0))
    return node


# (case, what is done to the tree, expected kind, expected reason). Applied to distinct clean lines.
TREE_CASES = [
    ("malformed JSON", lambda t: json.dumps(t)[: len(json.dumps(t)) // 2], "invalid", "malformed_json"),
    ("JSON that is not an object", lambda t: "[1, 2, 3]", "invalid", "not_an_object"),
    ("unrecognised record (no prompt)", lambda t: {"foo": 1}, "invalid", "not_a_trees_record"),
    ("prompt of the wrong type", lambda t: t | {"prompt": "hello"}, "invalid", "missing_or_bad_prompt"),
    ("missing text", lambda t: _edit(t, lambda r: r.pop("text")), "invalid", "missing_or_bad_text"),
    ("role of the wrong type", lambda t: _edit(t, lambda r: r.update(role=5)), "invalid", "missing_or_bad_role"),
    ("unknown role", lambda t: _edit(t, lambda r: r.update(role="system")), "invalid", "unknown_role"),
    ("`deleted` as a string", lambda t: _edit(t, lambda r: r.update(deleted="false")), "invalid",
     "missing_or_bad_deleted"),
    ("`rank` as a string", lambda t: _edit(t, lambda r: r["replies"][0].update(rank="1")), "invalid",
     "missing_or_bad_rank"),
    ("reply naming another parent", lambda t: _edit(t, lambda r: r["replies"][0].update(parent_id="elsewhere")),
     "invalid", "parent_mismatch"),
    ("empty text", lambda t: _edit(t, lambda r: r.update(text="")), "invalid", "empty_text"),
    ("whitespace-only text", lambda t: _edit(t, lambda r: r.update(text=" \n\t ")), "invalid", "empty_text"),
    ("NUL byte in text (\\u0000)", lambda t: _edit(t, lambda r: r.update(text="a\x00b")), "invalid", "nul_byte"),
    ("raw NUL byte in the line", lambda t: json.dumps(t).replace('"text": "', '"text": "\x00', 1), "invalid",
     "malformed_json"),
    ("lone surrogate (\\ud800)", lambda t: _edit(t, lambda r: r.update(text="a\ud800b")), "invalid",
     "lone_surrogate"),
    ("invalid UTF-8 bytes", lambda t: b"\xff\xfe" + json.dumps(t).encode(), "invalid", "invalid_utf8"),
    ("roles that do not alternate", lambda t: _edit(t, lambda r: r.update(role="assistant")),
     "filtered", "roles_not_alternating"),
    ("thread ending on a prompter message",
     lambda t: _edit(t, lambda r: best_leaf(r).setdefault("replies", []).append(
         {**{k: v for k, v in best_leaf(r).items() if k != "replies"}, "message_id": "trailing-prompter",
          "parent_id": best_leaf(r)["message_id"], "role": "prompter", "text": "And then?", "replies": []})),
     "trimmed", "ends_on_prompter"),
    ("deleted message", lambda t: _edit(t, lambda r: r.update(deleted=True)), "filtered", "deleted"),
    ("unreviewed message", lambda t: _edit(t, lambda r: r.update(review_result=False)), "filtered", "not_reviewed"),
    ("synthetic message", lambda t: _edit(t, lambda r: r.update(synthetic=True)), "filtered", "synthetic"),
    ("tree not ready_for_export", lambda t: t | {"tree_state": "growing"}, "filtered", "tree_state"),
    ("text over data.max_chars", lambda t: _edit(t, lambda r: r.update(text="x" * 20000)), "filtered", "too_long"),
    ("thread over data.max_length tokens", lambda t: _edit(t, lambda r: r["replies"][0].update(
        text="y" * 5000)), "filtered", "first_reply_over_max_length"),
]


def _edit(tree: dict, change) -> dict:
    tree = copy.deepcopy(tree)
    change(tree["prompt"])
    return tree


def _line(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=True)).encode("utf-8", "surrogatepass")


def corrupt_trees(lines: list[str], cfg: DataConfig | None = None) -> tuple[list[bytes], list[dict]]:
    """Corrupt distinct clean lines, then append a duplicate-id tree, a duplicate conversation and a
    10,000-message chain. Returns (lines as bytes, cases with 1-based line numbers)."""
    cfg = cfg or DataConfig()
    out = [line.rstrip("\n").encode() for line in lines]
    good = clean_lines(lines, cfg)
    if len(good) < len(TREE_CASES) + 2:
        raise ValueError(f"only {len(good)} clean trees; need {len(TREE_CASES) + 2}")
    cases = []
    for (name, change, kind, reason), index in zip(TREE_CASES, good):
        out[index] = _line(change(json.loads(lines[index])))
        cases.append({"case": name, "line": index + 1, "kind": kind, "reason": reason})
    spare = [json.loads(lines[i]) for i in good[len(TREE_CASES):len(TREE_CASES) + 2]]
    # A new tree whose reply reuses an id already used in another tree.
    clash = renamed(spare[0], "-clash")
    clash["prompt"]["replies"][0]["message_id"] = spare[1]["prompt"]["message_id"]
    out.append(_line(clash))
    cases.append({"case": "duplicate message_id", "line": len(out), "kind": "invalid",
                  "reason": "duplicate_message_id"})
    out.append(_line(renamed(spare[1], "-copy")))
    cases.append({"case": "duplicate conversation", "line": len(out), "kind": "filtered",
                  "reason": "duplicate_conversation"})
    out.append(chain_tree_line(10_000).encode())
    cases.append({"case": "10,000-message chain", "line": len(out), "kind": "trimmed",
                  "reason": "truncated_at_turn_boundary"})
    return out, cases


def corrupt_messages(lines: list[str], cfg: DataConfig | None = None) -> tuple[list[bytes], list[dict]]:
    """The same data in the flat oasst1 layout, with the cases only that layout can have."""
    cfg = cfg or DataConfig()
    good = clean_lines(lines, cfg)
    flat, first_line = [], {}
    for index, line in enumerate(lines):
        tree = parse_json(line)
        first_line[index] = len(flat)
        for message in flatten_tree(tree["prompt"]):
            flat.append(message | {"message_tree_id": tree["message_tree_id"], "tree_state": tree["tree_state"]})
    out = [_line(m) for m in flat]
    cases = []

    def reply_of(index):  # the flat position of the first reply of tree `index`'s root
        return first_line[index] + 1

    a, b, c, d, e, f = good[:6]
    out[reply_of(a)] = _line(flat[reply_of(a)] | {"parent_id": "no-such-message"})
    cases.append({"case": "orphan (parent not found)", "line": reply_of(a) + 1, "kind": "invalid",
                  "reason": "orphan"})
    root_b = flat[first_line[b]]
    out[first_line[b]] = _line(root_b | {"parent_id": flat[reply_of(b)]["message_id"]})
    cases.append({"case": "cycle in parent_id", "line": first_line[b] + 1, "kind": "invalid", "reason": "cycle"})
    out.append(_line(flat[first_line[c]] | {"text": "a different text under a used id"}))
    cases.append({"case": "duplicate message_id", "line": len(out), "kind": "invalid",
                  "reason": "duplicate_message_id"})
    out[reply_of(d)] = _line({k: v for k, v in flat[reply_of(d)].items() if k != "parent_id"})
    cases.append({"case": "missing parent_id", "line": reply_of(d) + 1, "kind": "invalid",
                  "reason": "missing_or_bad_parent_id"})
    out[reply_of(e)] = _line(flat[reply_of(e)] | {"parent_id": 42})
    cases.append({"case": "parent_id of the wrong type", "line": reply_of(e) + 1, "kind": "invalid",
                  "reason": "missing_or_bad_parent_id"})
    out[reply_of(f)] = _line(json.dumps(flat[reply_of(f)])[:40])
    cases.append({"case": "malformed JSON", "line": reply_of(f) + 1, "kind": "invalid", "reason": "malformed_json"})
    from reliability_helpers import chain_messages
    start = len(out)
    out += [_line(m) for m in chain_messages(10_000)]
    cases.append({"case": "10,000-message chain", "line": start + 1, "kind": "trimmed",
                  "reason": "truncated_at_turn_boundary"})
    return out, cases


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def observed(quarantine: list[dict], case: dict) -> list[dict]:
    return [q for q in quarantine if q["line"] == case["line"]]


def table(cases: list[dict], quarantine: list[dict], layout: str) -> str:
    rows = [f"| {layout} | {c['case']} | {c['line']} | "
            + ", ".join(sorted({f"{q['kind']}: {q['reason']}" for q in observed(quarantine, c)})) + " |"
            for c in cases]
    return "\n".join(rows)


def main(source: str) -> None:
    """Build the data stage on corrupted copies of `source` (both layouts) and print what happened."""
    import tempfile

    from pipeline.config import load_recipe
    from pipeline.data import build_data
    from pipeline.import_base import import_base

    lines = Path(source).read_text().splitlines()
    print("| layout | case | line | recorded as |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for layout, make in (("trees", corrupt_trees), ("messages", corrupt_messages)):
            corrupted, cases = make(lines)
            path = write_lines(Path(tmp) / f"corrupt.{layout}.jsonl", corrupted)
            recipe = load_recipe(Path(__file__).parents[1] / "recipes/tiny.yaml",
                                 [f"--out_dir={tmp}/{layout}", f"--data.source={path}", "--data.max_length=1024"])
            import_base(recipe)
            out = build_data(recipe)
            quarantine = [json.loads(q) for q in (out / "quarantine.jsonl").read_text().splitlines()]
            print(table(cases, quarantine, layout))
            report = json.loads((out / "report.json").read_text())
            print(f"\n{layout}: {report['records_read']} records, invalid rate {report['invalid_record_rate']}, "
                  f"quarantined {report['quarantined']}, filtered {report['filtered']}, trimmed {report['trimmed']}\n",
                  file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
