"""Small, pure evaluation metrics: plain functions on lists of strings, numbers and booleans.

Word-level metrics (distinct-2, the repeated 4-gram loop) split on Unicode word characters, so
they work for any language that separates words with spaces; for Chinese and Japanese a whole
run of characters counts as one word, which understates both. ROUGE-L goes through the
`evaluate` library with a metric script shipped in this repository (`hf_metrics/rouge_l`), so it
loads with no Hub access.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

ROUGE_L_SCRIPT = Path(__file__).parent / "hf_metrics" / "rouge_l"
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def mean(values: list[float]) -> float | None:
    """Arithmetic mean; None for no values, so an empty set never reads as a real 0."""
    return sum(values) / len(values) if values else None


def stop_rate(stopped: list[bool]) -> float | None:
    """Share of replies that ended with an end-of-turn token before the token budget ran out."""
    return mean([float(s) for s in stopped])


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, pooled over the replies."""
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def has_ngram_loop(text: str, n: int = 4, min_repeats: int = 3) -> bool:
    """True when some word n-gram occurs `min_repeats` times: the degenerate loop of greedy decoding.

    Two occurrences are common in fluent text ("one of the most"), three of the same 4-gram rarely are.
    """
    ws = words(text)
    counts = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    return any(c >= min_repeats for c in counts.values())


def loop_rate(texts: list[str], n: int = 4, min_repeats: int = 3) -> float | None:
    """Share of replies with a repeated word n-gram loop (see `has_ngram_loop`)."""
    return mean([float(has_ngram_loop(t, n, min_repeats)) for t in texts])


@functools.cache
def _rouge_metric():
    import evaluate

    # A local directory holding `rouge_l.py` loads without touching the Hub (works with HF_HUB_OFFLINE=1).
    return evaluate.load(str(ROUGE_L_SCRIPT))


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference, via `evaluate` + `rouge_score`."""
    if not predictions:
        return []
    return _rouge_metric().compute(predictions=predictions, references=references)["rougeL_per_item"]


def bootstrap_interval(values: list[float], weights: list[float] | None = None, resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of sum(values) / sum(weights), resampling items with replacement.

    With weights = token counts and values = per-example summed NLL this is the token-weighted mean
    NLL with examples (not tokens) as the resampled unit, since tokens of one example are correlated.
    """
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    denominators = w[picks].sum(axis=1)
    stats = v[picks].sum(axis=1) / np.where(denominators == 0, np.nan, denominators)
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def wilson_interval(successes: float, total: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (ties counted as half a success by the caller)."""
    if total == 0:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------- language guess
#
# A deliberately small offline heuristic, good enough to tell "answered in the prompt's language"
# from "switched to English". Non-Latin scripts decide by script; Latin-script text by counting
# frequent function words. Limits: it knows only the languages below; Cyrillic other than
# Ukrainian reads as Russian, Arabic script as Arabic, Han without kana as Chinese; texts with fewer
# than two function-word hits (short replies, code, lists of names) come back "unknown", and
# closely related languages (es/pt/ca/gl, da/no/sv) can be confused on short texts.

SCRIPTS = [  # (language, first code point, last code point)
    ("ru", 0x0400, 0x04FF), ("el", 0x0370, 0x03FF), ("he", 0x0590, 0x05FF), ("ar", 0x0600, 0x06FF),
    ("hi", 0x0900, 0x097F), ("th", 0x0E00, 0x0E7F), ("ko", 0xAC00, 0xD7AF), ("ja", 0x3040, 0x30FF),
    ("zh", 0x4E00, 0x9FFF),
]
STOPWORDS = {
    "en": "the and is are of to in that it you for with this be not have was what on can your".split(),
    "de": "der die das und ist nicht ich sie es ein eine zu den mit sich auch auf für wie von".split(),
    "es": "el la los las de que y en es un una por para con no se lo como del más pero".split(),
    "fr": "le la les de des et est un une que qui pour pas dans ce vous sur avec sont au".split(),
    "it": "il lo la gli le di che e è un una per non sono con del della come questo anche".split(),
    "pt": "o os as de que e é um uma para não com do da em se mais como por você".split(),
    "ca": "el la els les de que i és un una per amb no es del al com més però també".split(),
    "nl": "de het een en is van dat niet ik je voor met zijn op ook maar wat te".split(),
    "pl": "i w nie się na jest to że z do jak co ale o tak są dla być".split(),
}
STOPWORDS = {lang: frozenset(vocabulary) for lang, vocabulary in STOPWORDS.items()}
SUPPORTED_LANGUAGES = sorted({s[0] for s in SCRIPTS} | set(STOPWORDS) | {"uk"})


def guess_language(text: str) -> str:
    """ISO 639-1 code of the text's language, or "unknown" (see the limits above)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "unknown"
    by_script = Counter()
    for c in letters:
        code = ord(c)
        by_script[next((lang for lang, lo, hi in SCRIPTS if lo <= code <= hi), "latin")] += 1
    if by_script["ja"]:
        # Japanese mixes kana with Han characters; any kana at all rules out Chinese.
        by_script["ja"] += by_script.pop("zh", 0)
    script, count = by_script.most_common(1)[0]
    if script != "latin" and count >= len(letters) / 2:
        if script == "ru" and re.search(r"[іїєґІЇЄҐ]", text):
            return "uk"
        return script
    tokens = words(text)
    hits = Counter({lang: sum(t in vocabulary for t in tokens) for lang, vocabulary in STOPWORDS.items()})
    (best, best_hits), (_, second_hits) = hits.most_common(2)
    if best_hits < 2 or best_hits == second_hits:
        return "unknown"
    return best


def language_match(prompts: list[str], replies: list[str]) -> tuple[float | None, int]:
    """(share of replies in the prompt's language, pairs it was decidable for).

    Pairs where either side guesses "unknown" are left out rather than counted as a mismatch;
    an empty reply counts as a mismatch, since not answering is not answering in the right language.
    """
    decided = []
    for prompt, reply in zip(prompts, replies):
        asked = guess_language(prompt)
        if asked == "unknown":
            continue
        answered = guess_language(reply) if reply.strip() else "none"
        if answered == "unknown":
            continue
        decided.append(float(asked == answered))
    return mean(decided), len(decided)
