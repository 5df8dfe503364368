import itertools
import json
from collections import Counter

import pytest

from pipeline.config import DataConfig
from pipeline.data import (
    all_threads,
    best_thread,
    chat_template_for,
    extract_threads,
    load_trees,
    split_by_tree,
    tokenize_threads,
    trees_from_messages,
)

_ids = itertools.count()


def msg(role, text, rank=None, replies=(), **extra):
    return {"message_id": f"m{next(_ids)}", "role": role, "text": text, "rank": rank, "lang": "en",
            "review_result": True, "deleted": False, "synthetic": False, "replies": list(replies), **extra}


def tree(root, state="ready_for_export"):
    return {"message_tree_id": root["message_id"], "tree_state": state, "prompt": root}


def texts(thread):
    return [m["text"] for m in thread]


def sample_tree():
    return msg("prompter", "Q1", replies=[
        msg("assistant", "A1-second", rank=1),
        msg("assistant", "A1-best", rank=0, replies=[
            msg("prompter", "Q2", replies=[msg("assistant", "A2-best", rank=0), msg("assistant", "A2-x", rank=2)]),
        ]),
        msg("assistant", "A1-unranked"),
    ])


def test_best_thread_follows_rank_zero_at_every_turn():
    assert texts(best_thread(sample_tree())) == ["Q1", "A1-best", "Q2", "A2-best"]


def test_all_threads_returns_every_root_to_leaf_path():
    paths = {tuple(texts(t)) for t in all_threads(sample_tree())}
    assert paths == {("Q1", "A1-second"), ("Q1", "A1-best", "Q2", "A2-best"), ("Q1", "A1-best", "Q2", "A2-x"),
                     ("Q1", "A1-unranked")}


def run_extract(trees, **cfg):
    skipped = []
    threads = extract_threads(trees, DataConfig(**cfg), skipped)
    quarantined = [s for s in skipped if s["kind"] == "invalid"]
    return threads, quarantined, Counter(s["reason"] for s in skipped if s["kind"] == "filtered")


def load(source):
    """(trees, invalid records, records read, layout)."""
    skipped = []
    trees, total, layout = load_trees(source, skipped)
    return trees, skipped, total, layout


def assemble(rows):
    skipped = []
    return trees_from_messages(rows, skipped), skipped


def conversations(threads):
    return [(t["tree_id"], t["messages"]) for t in threads]


def contents(thread):
    return [m["content"] for m in thread["messages"]]


def test_trailing_prompter_turn_is_trimmed():
    root = msg("prompter", "Q1", replies=[msg("assistant", "A1", rank=0, replies=[msg("prompter", "Q2")])])
    threads, _, _ = run_extract([tree(root)])
    assert [contents(t) for t in threads] == [["Q1", "A1"]]
    assert threads[0]["messages"][0]["role"] == "user"


def test_filters_prune_the_message_and_its_subtree_and_count_it():
    root = msg("prompter", "Q1", replies=[
        msg("assistant", "deleted", rank=0, deleted=True, replies=[msg("prompter", "under deleted")]),
        msg("assistant", "synthetic", rank=1, synthetic=True),
        msg("assistant", "german", rank=2, lang="de"),
        msg("assistant", "unreviewed", rank=3, review_result=False),
        msg("assistant", "kept", rank=4),
    ])
    threads, quarantined, filtered = run_extract([tree(root)], languages=["en"])
    assert [contents(t) for t in threads] == [["Q1", "kept"]]
    assert filtered == Counter(deleted=1, synthetic=1, language=1, not_reviewed=1)
    assert quarantined == []


def test_tree_state_filter_and_length_cap():
    halted = tree(msg("prompter", "Q", replies=[msg("assistant", "A", rank=0)]), state="halted_by_moderator")
    long = tree(msg("prompter", "Q", replies=[msg("assistant", "x" * 50, rank=0)]))
    threads, _, filtered = run_extract([halted, long], max_chars=20)
    assert threads == []
    assert filtered["tree_state"] == 1 and filtered["too_long"] == 1


def test_roles_must_alternate():
    root = msg("prompter", "Q1", replies=[msg("prompter", "Q again", replies=[msg("assistant", "A", rank=0)])])
    threads, _, filtered = run_extract([tree(root)])
    assert threads == [] and filtered["roles_not_alternating"] == 1


def test_duplicate_conversations_are_dropped_ignoring_case_and_spacing():
    a = tree(msg("prompter", "Hello  there", replies=[msg("assistant", "Hi!", rank=0)]))
    b = tree(msg("prompter", "hello there", replies=[msg("assistant", "hi!", rank=0)]))
    threads, _, filtered = run_extract([a, b])
    assert len(threads) == 1 and filtered["duplicate_conversation"] == 1


def test_split_is_by_tree_seeded_and_complete():
    threads = [{"tree_id": f"t{i // 3}", "messages": []} for i in range(90)]  # 30 trees, 3 threads each
    train, val = split_by_tree(threads, 0.2, seed=1)
    assert {t["tree_id"] for t in train}.isdisjoint({t["tree_id"] for t in val})
    assert len(train) + len(val) == 90 and len({t["tree_id"] for t in val}) == 6
    assert split_by_tree(threads, 0.2, seed=1) == (train, val)
    assert split_by_tree(threads, 0.2, seed=2)[1] != val


def flatten(trees):
    rows, stack = [], [(t["prompt"], None, t) for t in reversed(trees)]
    while stack:
        node, parent, t = stack.pop()
        rows.append({k: v for k, v in node.items() if k != "replies"} | {
            "parent_id": parent, "message_tree_id": t["message_tree_id"], "tree_state": t["tree_state"]})
        stack.extend((r, node["message_id"], t) for r in reversed(node["replies"]))
    return rows


def test_flat_messages_reassemble_into_the_same_threads():
    trees = [tree(sample_tree()), tree(msg("prompter", "Other", replies=[msg("assistant", "B", rank=0)]))]
    rebuilt, quarantined = assemble(list(enumerate(flatten(trees), start=1)))
    assert quarantined == []
    assert conversations(run_extract(rebuilt, threads="all")[0]) == conversations(run_extract(trees, threads="all")[0])


def test_orphans_and_cycles_are_quarantined():
    rows = [
        {"message_id": "r", "parent_id": None, "role": "prompter", "text": "Q"},
        {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "A"},
        {"message_id": "o", "parent_id": "missing", "role": "assistant", "text": "orphan"},
        {"message_id": "o2", "parent_id": "o", "role": "prompter", "text": "child of orphan"},
        {"message_id": "c1", "parent_id": "c2", "role": "prompter", "text": "cycle"},
        {"message_id": "c2", "parent_id": "c1", "role": "assistant", "text": "cycle"},
        {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "duplicate id"},
    ]
    trees, quarantined = assemble(list(enumerate(rows, start=1)))
    assert len(trees) == 1
    assert sorted((q["line"], q["reason"]) for q in quarantined) == [
        (3, "orphan"), (4, "orphan"), (5, "cycle"), (6, "cycle"), (7, "duplicate_message_id")]


def test_malformed_lines_are_quarantined_with_line_numbers(tmp_path):
    good = json.dumps(tree(msg("prompter", "Q", replies=[msg("assistant", "A", rank=0)])))
    path = tmp_path / "t.trees.jsonl"
    path.write_bytes(b"\n".join([good.encode(), b"{not json", b"\xff\xfe bad utf8", good.encode()]) + b"\n")
    trees, quarantined, total, layout = load(str(path))
    assert (len(trees), total, layout) == (2, 4, "trees")
    assert [(q["line"], q["reason"]) for q in quarantined] == [(2, "malformed_json"), (3, "invalid_utf8")]


# --------------------------------------------------------------------------- rendering


def render(tokenizer, conversations, max_length=10_000):
    template = chat_template_for(tokenizer, "gemma")
    threads = [{"tree_id": str(i), "lang": "en", "messages": m} for i, m in enumerate(conversations)]
    skipped = []
    rows = tokenize_threads(threads, tokenizer, template, max_length, skipped)
    return rows, Counter(s["reason"] for s in skipped)


def masked_spans(tokenizer, row):
    spans, current = [], []
    for token, bit in zip(row["input_ids"], row["assistant_masks"]):
        if bit:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


def test_mask_covers_exactly_assistant_content_and_end_of_turn_with_one_bos(byte_tokenizer):
    (row,), _ = render(byte_tokenizer, [CONVERSATION])
    assert masked_spans(byte_tokenizer, row) == ["It is 4.<end_of_turn>", "6, of course.<end_of_turn>"]
    assert row["input_ids"].count(byte_tokenizer.bos_token_id) == 1 and row["input_ids"][0] == byte_tokenizer.bos_token_id
    assert byte_tokenizer.decode(row["input_ids"]).startswith("<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n")


def test_long_threads_are_cut_after_a_whole_assistant_turn(byte_tokenizer):
    (full,), filtered = render(byte_tokenizer, [CONVERSATION])
    assert filtered["truncated_at_turn_boundary"] == 0
    first_turn_end = full["input_ids"].index(byte_tokenizer.convert_tokens_to_ids("<end_of_turn>"), 30) + 1
    (cut,), filtered = render(byte_tokenizer, [CONVERSATION], max_length=len(full["input_ids"]) - 1)
    assert masked_spans(byte_tokenizer, cut) == ["It is 4.<end_of_turn>"]
    assert cut["messages"] == CONVERSATION[:2] and len(cut["input_ids"]) <= first_turn_end + 1
    assert filtered["truncated_at_turn_boundary"] == 1
    rows, filtered = render(byte_tokenizer, [CONVERSATION], max_length=20)
    assert rows == [] and filtered["first_reply_over_max_length"] == 1


def test_auto_template_prefers_chatml_for_chatml_vocabularies():
    from pipeline.import_base import byte_tokenizer

    tokenizer = byte_tokenizer()
    assert "<start_of_turn>" in chat_template_for(tokenizer, "auto")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert "<|im_start|>" in chat_template_for(tokenizer, "auto")


# --------------------------------------------------------------------------- the real OpenAssistant files


def test_both_layouts_of_the_shared_sample_give_the_same_threads(shared_data, byte_tokenizer):
    by_layout = {}
    for name in ("oasst_en100.trees.jsonl", "oasst_en100.messages.jsonl"):
        trees, quarantined, total, layout = load(str(shared_data / name))
        threads, _, filtered = run_extract(trees, keep_synthetic=True, threads="all")
        by_layout[layout] = (len(trees), sorted(json.dumps(t["messages"]) for t in threads))
        assert quarantined == []
    assert by_layout["trees"][0] == by_layout["messages"][0] == 100
    assert by_layout["trees"][1] == by_layout["messages"][1]
    rows, _ = render(byte_tokenizer, [json.loads(m) for m in by_layout["trees"][1][:20]])
    assert rows and all(r["input_ids"].count(byte_tokenizer.bos_token_id) == 1 for r in rows)


def test_oasst2_sample_filters_states_and_languages(shared_data):
    trees, quarantined, total, layout = load(str(shared_data / "oasst2_sample551.trees.jsonl"))
    assert (len(trees), layout) == (551, "trees")
    threads, _, filtered = run_extract(trees, languages=["en"])
    assert filtered["tree_state"] == 551 - 96  # only ready_for_export trees survive
    assert threads and all(t["lang"] == "en" for t in threads)
    assert len({t["tree_id"] for t in threads}) == len(threads)  # best mode: one thread per tree


def test_gzipped_trees_export_and_flat_parquet_load(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    trees = [tree(msg("prompter", f"Q{i}", replies=[msg("assistant", f"A{i}", rank=0)])) for i in range(3)]
    gz = tmp_path / "t.trees.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.writelines(json.dumps(t) + "\n" for t in trees)
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{**m, "rank": m["rank"]} for m in flatten(trees)]), parquet)
    from_gz, _, _, layout_gz = load(str(gz))
    from_parquet, _, _, layout_pq = load(str(parquet))
    assert (layout_gz, layout_pq) == ("trees", "messages")
    assert conversations(run_extract(from_gz)[0]) == conversations(run_extract(from_parquet)[0])
    assert len(run_extract(from_gz)[0]) == 3
