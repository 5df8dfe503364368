"""Eval metric functions on hand-made inputs with known answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import metrics
from pipeline.config import EvalConfig
from pipeline.evaluate import generation_items, token_batches

ROOT = Path(__file__).resolve().parents[1]


def test_rouge_l_known_values():
    scores = metrics.rouge_l(
        ["the cat sat on the mat", "the cat sat on the mat", "completely different words", "Größe über alles"],
        ["the cat sat on the mat", "the cat on the mat", "the cat sat on the mat", "größe über nichts"],
    )
    # identical; LCS 5 of 6 and 5 -> P = 5/6, R = 1, F = 10/11; nothing shared; 2 of 3 words, umlauts kept.
    assert scores == pytest.approx([1.0, 10 / 11, 0.0, 2 / 3])


def test_rouge_l_matches_rouge_score_on_ascii():
    from rouge_score import rouge_scorer

    pairs = [("a quick brown fox jumps", "the quick fox jumped over"), ("one two three four", "four three two one")]
    reference_impl = rouge_scorer.RougeScorer(["rougeL"])
    expected = [reference_impl.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    assert metrics.rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(expected)


def test_rouge_l_loads_offline_with_an_empty_hub_cache(tmp_path):
    # A fresh HF_HOME proves nothing comes from an earlier download; the offline flags forbid a new one.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    code = "from pipeline.metrics import rouge_l; print(rouge_l(['a b c d'], ['a b x d'])[0])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(0.75)


def test_distinct_2_pools_bigrams_over_replies():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 unique of 5
    assert metrics.distinct_n(["a b a b", "A b c"], 2) == pytest.approx(3 / 5)
    assert metrics.distinct_n(["one two three"], 2) == 1.0
    assert metrics.distinct_n(["single", ""], 2) is None


def test_repeated_4gram_loop():
    assert metrics.has_ngram_loop("I think that I think that I think that I think that")
    assert not metrics.has_ngram_loop("one of the most, and one of the most")  # twice is fluent text
    assert metrics.loop_rate(["la la la la la la la la", "a b c d e f", "x y z"]) == pytest.approx(1 / 3)


def test_stop_rate_and_mean():
    assert metrics.stop_rate([True, False, True, True]) == 0.75
    assert metrics.stop_rate([]) is None
    assert metrics.mean([1, 2, 6]) == 3


def test_bootstrap_interval_constant_data_has_zero_width():
    assert metrics.bootstrap_interval([2.5] * 20, seed=1) == (2.5, 2.5)


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = [float(x) for x in range(1, 101)]
    low, high = metrics.bootstrap_interval(values, resamples=2000, seed=3)
    assert low < 50.5 < high
    # the standard error of the mean is about 2.9 here, so a 95% interval is about +-5.7 wide
    assert 8 < high - low < 15
    assert metrics.bootstrap_interval(values, resamples=2000, seed=3) == (low, high)
    assert metrics.bootstrap_interval(values, resamples=2000, seed=4) != (low, high)


def test_bootstrap_interval_weighted_is_a_ratio_of_sums():
    # every item has NLL sum = 2 x tokens, so every resample's ratio is exactly 2
    low, high = metrics.bootstrap_interval([2.0, 10.0, 40.0], [1, 5, 20], seed=0)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert metrics.bootstrap_interval([]) is None


def test_wilson_interval_known_value():
    low, high = metrics.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert metrics.wilson_interval(10, 10)[1] == 1.0
    assert metrics.wilson_interval(0, 0) is None


@pytest.mark.parametrize("text, language", [
    ("What is the capital of France, and why is it there?", "en"),
    ("Wie funktioniert eine Wärmepumpe? Ich habe keine Ahnung, was das ist.", "de"),
    ("¿Cuáles son tres consejos para aprender a programar en una semana?", "es"),
    ("Je ne sais pas pourquoi le ciel est bleu, pouvez-vous me le dire?", "fr"),
    ("Привет, как дела? Что ты делаешь сегодня?", "ru"),
    ("Привіт! Що ти робиш сьогодні? Це їжак.", "uk"),
    ("你好，今天天气怎么样？", "zh"),
    ("こんにちは、今日はいい天気ですね。", "ja"),
    ("ok", "unknown"),
    ("12345 !!!", "unknown"),
])
def test_guess_language(text, language):
    assert metrics.guess_language(text) == language


def test_language_match_skips_undecidable_pairs_and_counts_empty_replies():
    prompts = ["Why is the sky blue and what is the reason for that?", "Warum ist der Himmel blau und nicht grün?",
               "ok", "What is the best way to learn a new language?"]
    replies = ["The sky is blue because of the way that air scatters light.",
               "The sky is blue because of the scattering of light in the air.", "Sure, I can do that for you.", ""]
    share, decided = metrics.language_match(prompts, replies)
    # en->en matches, de->en does not, "ok" is undecidable, an empty reply to an English prompt does not match
    assert (share, decided) == (pytest.approx(1 / 3), 3)


def test_token_batches_respect_rows_and_token_budget():
    assert token_batches([10, 10, 10, 10, 10], max_rows=2, max_tokens=1000) == [[0, 1], [2, 3], [4]]
    # sorted ascending lengths: 3 rows x 30 = 90 > 80, so the third row starts a new batch
    assert token_batches([20, 25, 30, 100], max_rows=8, max_tokens=80) == [[0, 1], [2], [3]]


def test_generation_items_put_showcase_first_and_read_prompt_files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    cfg = EvalConfig(max_prompts=3, showcase_prompts=["show me", "q0"])
    items = generation_items(cfg, rows)
    assert [i["messages"][-1]["content"] for i in items] == ["show me", "q0", "q1", "q2"]  # q0 deduplicated
    assert [i["reference"] for i in items] == [None, None, "a1", "a2"]

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("\n".join(json.dumps(p) for p in ["first?", "zweite?", "third?"]) + "\n")
    items = generation_items(EvalConfig(prompts=str(prompt_file), max_prompts=2, showcase_prompts=["show me"]), rows)
    assert [(i["source"], i["messages"][-1]["content"], i["reference"]) for i in items] == [
        ("showcase", "show me", None), ("prompts.jsonl", "first?", None), ("prompts.jsonl", "zweite?", None)]
