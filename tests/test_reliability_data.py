"""Bad conversation data: every case is skipped, counted by reason and quarantined with its line;
systemic problems stop the stage with an error naming the file and the cause."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import DataConfig, load_recipe
from pipeline.data import (
    DataError,
    alternates,
    all_threads,
    best_thread,
    counts,
    extract_threads,
    flatten_tree,
    load_trees,
    prune_tree,
    tokenize_threads,
    trees_from_messages,
)
from pipeline.import_base import byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corrupt_oasst import corrupt_messages, corrupt_trees, observed, write_lines  # noqa: E402
from reliability_helpers import (  # noqa: E402
    ROOT,
    chain_messages,
    chain_tree_line,
    message,
    synthetic_trees,
    write_jsonl,
)

SHARED_SAMPLE = next((p for p in (ROOT.parent / "shared/data/oasst/oasst2_sample551.trees.jsonl",
                                  Path("/work/shared/data/oasst/oasst2_sample551.trees.jsonl")) if p.exists()), None)
GEMMA = (ROOT / "pipeline/templates/gemma.jinja").read_text()


def build(lines_or_path, tmp_path, *overrides):
    """The data stage, in-process, on a tiny random base (imported once per test session)."""
    from pipeline.data import build_data
    from pipeline.import_base import import_base

    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"--out_dir={tmp_path}/run", f"--data.source={lines_or_path}",
                                                      "--data.max_length=1024", *overrides])
    import_base(recipe)
    return build_data(recipe)


def read_quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- every case, both layouts


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["trees", "messages"])
@pytest.mark.parametrize("source", ["house_chats", "oasst2_sample551"])
def test_corrupted_copy_records_every_case(tmp_path, layout, source):
    path = ROOT / "data/house_chats.trees.jsonl" if source == "house_chats" else SHARED_SAMPLE
    if path is None:
        pytest.skip("shared OpenAssistant sample not present")
    make = corrupt_trees if layout == "trees" else corrupt_messages
    corrupted, cases = make(path.read_text().splitlines())
    out = build(write_lines(tmp_path / f"corrupt.{layout}.jsonl", corrupted), tmp_path)
    quarantine = read_quarantine(out)
    for case in cases:
        found = {(q["kind"], q["reason"]) for q in observed(quarantine, case)}
        assert (case["kind"], case["reason"]) in found, f"{case['case']} at line {case['line']}: {found}"
    # Counted in the report and the card exactly as quarantined.
    report = json.loads((out / "report.json").read_text())
    for kind, key in (("invalid", "quarantined"), ("filtered", "filtered"), ("trimmed", "trimmed")):
        assert report[key] == dict(Counter(q["reason"] for q in quarantine if q["kind"] == kind))
    card = (out / "README.md").read_text()
    for case in cases:
        assert f"| {case['reason']} | {report[{'invalid': 'quarantined'}.get(case['kind'], case['kind'])][case['reason']]} |" in card
    # Quarantined unreadable lines keep (a bounded piece of) their raw text for fixing.
    assert all(len(q.get("raw", "")) <= 2000 for q in quarantine)
    # Nothing bad reached the training rows.
    from datasets import Dataset

    rows = Dataset.from_parquet(str(out / "train.parquet")).to_list()
    for row in rows:
        assert alternates([{"role": "prompter" if m["role"] == "user" else "assistant"} for m in row["messages"]])
        assert row["messages"][-1]["role"] == "assistant"
        for m in row["messages"]:
            assert m["content"].strip() and "\x00" not in m["content"]


def test_negative_control_clean_data_skips_nothing_invalid(tmp_path):
    path = write_jsonl(tmp_path / "clean.jsonl", synthetic_trees(12))
    out = build(path, tmp_path)
    assert read_quarantine(out) == []
    assert json.loads((out / "report.json").read_text())["quarantined"] == {}


# --------------------------------------------------------------------------- systemic failures


def lines_file(tmp_path, lines, name="in.jsonl"):
    return write_lines(tmp_path / name, [line if isinstance(line, bytes) else line.encode() for line in lines])


def test_nothing_survives_names_file_and_cause(tmp_path):
    trees = synthetic_trees(4)
    for tree in trees:
        tree["tree_state"] = "growing"
    path = write_jsonl(tmp_path / "growing.jsonl", trees)
    with pytest.raises(DataError, match=r"growing\.jsonl: no conversation survived.*tree_state"):
        build(path, tmp_path)


def test_skip_rate_over_threshold_names_file_and_cause(tmp_path):
    good = [json.dumps(t) for t in synthetic_trees(4)]
    path = lines_file(tmp_path, good + ["{not json"] * 3)
    with pytest.raises(DataError, match=r"in\.jsonl: 43% of 7 records are invalid.*max_skip_rate=0\.2.*malformed_json"):
        build(path, tmp_path, "--data.max_skip_rate=0.2")
    # Negative control: the same file passes under a looser threshold, with the 3 lines quarantined.
    out = build(path, tmp_path, "--data.max_skip_rate=0.5")  # the failed build left no COMPLETE: rebuilt
    assert json.loads((out / "report.json").read_text())["quarantined"] == {"malformed_json": 3}


def test_unrecognised_layout_names_file(tmp_path):
    path = lines_file(tmp_path, ['{"question": "a", "answer": "b"}'] * 3, "qa.jsonl")
    with pytest.raises(DataError, match=r"qa\.jsonl: unrecognised layout"):
        load_trees(str(path), [])


def test_one_stray_first_line_does_not_decide_the_layout(tmp_path):
    path = lines_file(tmp_path, ['{"question": "a"}'] + [json.dumps(t) for t in synthetic_trees(3)])
    skipped = []
    trees, total, layout = load_trees(str(path), skipped)
    assert (layout, len(trees), total) == ("trees", 3, 4)
    assert [(s["line"], s["reason"]) for s in skipped] == [(1, "not_a_trees_record")]


def test_empty_or_unreadable_file_names_file(tmp_path):
    path = lines_file(tmp_path, [b"\xff\xfe", b"[1]"], "junk.jsonl")
    with pytest.raises(DataError, match=r"junk\.jsonl: no readable records"):
        load_trees(str(path), [])


def test_empty_validation_split_names_the_cause(tmp_path):
    trees = synthetic_trees(6)
    trees[4]["prompt"]["replies"][0]["text"] = "long " * 200  # tree0004 is the one held out with seed 0
    path = write_jsonl(tmp_path / "chats.jsonl", trees)
    with pytest.raises(DataError, match=r"chats\.jsonl: no validation example fits data\.max_length=200"):
        build(path, tmp_path, "--data.max_length=200", "--data.validation_fraction=0.1", "--data.seed=0")


def test_row_with_no_trainable_token_is_an_error():
    tokenizer = byte_tokenizer()
    no_generation = GEMMA.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    thread = {"tree_id": "t", "source_line": 7, "messages": [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="marks no assistant tokens"):
        tokenize_threads([thread], tokenizer, no_generation, 64, [])
    # Negative control: the real template trains the reply.
    rows = tokenize_threads([thread], tokenizer, GEMMA, 64, [])
    assert sum(rows[0]["assistant_masks"]) > 0


# --------------------------------------------------------------------------- truncation


def test_truncation_cuts_at_turn_boundaries_or_drops_counted():
    tokenizer = byte_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    turns = [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 30},
             {"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "b" * 30}]
    thread = {"tree_id": "t", "source_line": 3, "messages": turns}
    full = tokenize_threads([thread], tokenizer, GEMMA, 10_000, [])[0]
    first_end = full["assistant_masks"].index(1) + 31  # 30 reply bytes + <end_of_turn>
    for max_length in range(first_end - 2, len(full["input_ids"]) + 2):
        skipped = []
        rows = tokenize_threads([thread], tokenizer, GEMMA, max_length, skipped)
        if max_length < first_end:
            assert rows == [] and [s["reason"] for s in skipped] == ["first_reply_over_max_length"]
            continue
        (row,) = rows
        trained = [i for i, bit in enumerate(row["assistant_masks"]) if bit]
        # The example ends on a trained end-of-turn token: never mid-reply.
        assert row["input_ids"][trained[-1]] == eot and trained[-1] == len(row["input_ids"]) - 1
        assert len(row["input_ids"]) <= max_length
        expect_cut = len(row["input_ids"]) < len(full["input_ids"])
        assert [s["reason"] for s in skipped] == (["truncated_at_turn_boundary"] if expect_cut else [])
        assert len(row["messages"]) == (2 if len(row["input_ids"]) == first_end else 4)


# --------------------------------------------------------------------------- deep chains


@pytest.mark.parametrize("layout", ["trees", "messages"])
def test_10000_deep_chain_does_not_overflow(tmp_path, layout):
    depth = 10_000
    if layout == "trees":
        path = lines_file(tmp_path, [chain_tree_line(depth)])
    else:
        path = write_jsonl(tmp_path / "chain.jsonl", chain_messages(depth))
    start = time.perf_counter()
    skipped = []
    trees, total, found = load_trees(str(path), skipped)
    assert found == layout and skipped == []
    for threads in ("best", "all"):
        (thread,) = extract_threads(trees, DataConfig(threads=threads), skipped)
        assert len(thread["messages"]) == depth and skipped == []
    assert time.perf_counter() - start < 20


def test_too_deep_json_is_quarantined_not_a_crash(tmp_path):
    path = lines_file(tmp_path, ["[" * 300_000 + "]" * 300_000] + [json.dumps(t) for t in synthetic_trees(2)])
    skipped = []
    trees, _, _ = load_trees(str(path), skipped)
    assert len(trees) == 2 and [(s["line"], s["reason"]) for s in skipped] == [(1, "too_deep")]


# --------------------------------------------------------------------------- properties


@st.composite
def random_tree(draw, max_messages=25):
    """A random message tree with unique ids; roles, ranks and texts drawn freely."""
    n = draw(st.integers(1, max_messages))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    nodes = []
    for i, parent in enumerate(parents):
        node = message(f"m{i}", None if parent is None else f"m{parent}", draw(st.sampled_from(["prompter",
                       "assistant"])), draw(st.text(min_size=1, max_size=12).filter(lambda t: t.strip())),
                       rank=draw(st.one_of(st.none(), st.integers(0, 3))))
        node["replies"] = []
        nodes.append(node)
        if parent is not None:
            nodes[parent]["replies"].append(node)
    return nodes[0]


def strip_lines(root):
    stack = [root]
    while stack:
        node = stack.pop()
        node.pop("_line", None)
        stack.extend(node["replies"])
    return root


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(random_tree())
def test_flatten_then_reassemble_is_identity(root):
    flat = flatten_tree(root)
    assert len(flat) == len({m["message_id"] for m in flat})
    skipped = []
    (tree,) = trees_from_messages([(i + 1, m) for i, m in enumerate(flat)], skipped)
    assert skipped == [] and strip_lines(tree["prompt"]) == root


@PROPERTY
@given(random_tree(), st.sampled_from(["best", "all"]))
def test_every_thread_alternates_and_ends_on_assistant(root, mode):
    cfg = DataConfig(threads=mode, tree_states=[], require_review=False)
    skipped = []
    threads = extract_threads([{"message_tree_id": "t", "prompt": root, "_line": 1}], cfg, skipped)
    for thread in threads:
        roles = [m["role"] for m in thread["messages"]]
        assert roles[-1] == "assistant" and len(roles) >= 2
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert len({tuple(m["content"] for m in t["messages"]) for t in threads}) == len(threads)
    # Every path of the pruned tree is either extracted or skipped with a reason.
    pruned = prune_tree({"prompt": root}, cfg, [])
    thread_level = [s for s in skipped if s["reason"] in ("no_assistant_reply", "roles_not_alternating",
                                                           "duplicate_conversation")]
    paths = 0 if pruned is None else len(all_threads(pruned)) if mode == "all" else 1
    assert len(threads) + len(thread_level) == paths


@PROPERTY
@given(random_tree())
def test_best_thread_follows_lowest_rank(root):
    thread = best_thread(root)
    for parent, child in zip(thread, thread[1:]):
        ranked = [r["rank"] for r in parent["replies"] if r["rank"] is not None]
        if ranked:
            assert child["rank"] == min(ranked)
    assert not thread[-1]["replies"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(
                               st.sampled_from(["message_id", "parent_id", "text", "role", "replies", "rank",
                                                "deleted", "prompt", "tree_state", "message_tree_id", "lang",
                                                "review_result", "synthetic", "x"]), children, max_size=6),
                           max_leaves=20)


@PROPERTY
@given(st.lists(st.one_of(json_values.map(json.dumps), st.binary(max_size=40)), min_size=1, max_size=8))
def test_no_input_crashes_the_loader(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
                                for line in lines))
    skipped = []
    try:
        trees, _, _ = load_trees(str(path), skipped)
    except DataError:
        return  # a systemic error with a message is an allowed outcome; a crash is not
    threads = extract_threads(trees, DataConfig(tree_states=[], require_review=False), skipped)
    for thread in threads:
        assert thread["messages"][-1]["role"] == "assistant"
    assert all({"line", "kind", "reason"} <= set(s) for s in skipped)
    assert counts(skipped, "invalid") is not None
