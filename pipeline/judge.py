"""Pairwise preference from an LLM judge behind any OpenAI-compatible chat-completions endpoint.

Every pair of replies is judged twice, once in each order, because judges favour one position;
a verdict only counts for a model when it survives the swap in expectation. The HTTP client is
the standard library's urllib, so no SDK decides timeouts or retries behind our back. A judge
answer without a clear verdict is counted as invalid, a failed request as an error; neither
stops the evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request

from tqdm.auto import tqdm

from pipeline.config import JudgeConfig
from pipeline.metrics import bootstrap_interval, wilson_interval

log = logging.getLogger(__name__)

SYSTEM = (
    "You are an impartial judge of chat assistants. Compare two replies to the same conversation. "
    "Judge helpfulness, correctness, relevance, depth and whether the reply is in the user's language. "
    "Ignore the order in which the replies are shown and their length as such. After at most a short "
    "explanation, give your final verdict in exactly this format: [[A]] if reply A is better, [[B]] if "
    "reply B is better, [[C]] for a tie."
)
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def judge_prompt(conversation: list[dict], reply_a: str, reply_b: str) -> str:
    turns = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in conversation)
    return (f"[Conversation]\n{turns}\n\n[Reply A]\n{reply_a or '(empty reply)'}\n\n"
            f"[Reply B]\n{reply_b or '(empty reply)'}\n\nWhich reply is better? End with [[A]], [[B]] or [[C]].")


def parse_verdict(answer: str) -> str:
    """`A`, `B`, `C` (tie) or `invalid`: an answer naming no verdict, or two different ones, is invalid."""
    found = set(VERDICT.findall(answer or ""))
    return found.pop() if len(found) == 1 else "invalid"


def chat_completion(cfg: JudgeConfig, messages: list[dict]) -> str:
    """The judge's answer text; raises on transport errors and on a reply not in the OpenAI wire format."""
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                       "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    request = urllib.request.Request(cfg.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers,
                                     method="POST")
    for attempt in range(cfg.retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise ValueError(f"judge answer content is {type(content).__name__}, not text")
            return content
        except urllib.error.HTTPError as error:
            # 4xx (bad key, unknown model) will not improve on retry; 5xx and 429 might.
            if attempt == cfg.retries or (error.code < 500 and error.code != 429):
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == cfg.retries:
                raise
        time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def ask(cfg: JudgeConfig, conversation: list[dict], reply_a: str, reply_b: str) -> dict:
    """{"verdict": A|B|C|invalid|error, "answer" or "error": text}; never raises for the judge's faults."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": judge_prompt(conversation, reply_a, reply_b)}]
    try:
        answer = chat_completion(cfg, messages)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        # urllib errors are OSErrors; a non-JSON body or an unexpected shape lands in the others.
        return {"verdict": "error", "error": f"{type(error).__name__}: {error}"[:300]}
    return {"verdict": parse_verdict(answer), "answer": answer[-500:]}


def score_for_first(verdict: str, first_is_a: bool) -> float | None:
    """What one verdict gives the first model of the pair: 1 win, 0.5 tie, 0 loss, None when it did not count."""
    if verdict == "C":
        return 0.5
    if verdict in ("A", "B"):
        return float((verdict == "A") == first_is_a)
    return None


def compare(cfg: JudgeConfig, conversations: list[list[dict]], first: list[str], second: list[str],
            resamples: int = 1000, seed: int = 0, desc: str = "judge") -> dict:
    """Judge `first` against `second` on every conversation in both orders and summarise for `first`."""
    per_prompt, counts, consistent, both_valid = [], {"win": 0, "tie": 0, "loss": 0, "invalid": 0, "error": 0}, 0, 0
    judgements = []
    for conversation, x, y in tqdm(list(zip(conversations, first, second)), desc=desc, leave=False):
        forward = ask(cfg, conversation, x, y)
        swapped = ask(cfg, conversation, y, x)
        scores = [score_for_first(forward["verdict"], True), score_for_first(swapped["verdict"], False)]
        for judgement, score in zip((forward, swapped), scores):
            if score is None:
                counts[judgement["verdict"]] += 1
            else:
                counts["win" if score == 1 else "tie" if score == 0.5 else "loss"] += 1
        valid = [s for s in scores if s is not None]
        if valid:
            per_prompt.append(sum(valid) / len(valid))
        if len(valid) == 2:
            both_valid += 1
            consistent += scores[0] == scores[1]
        judgements.append({"forward": forward, "swapped": swapped})
    counted = counts["win"] + counts["tie"] + counts["loss"]
    win_rate = (counts["win"] + 0.5 * counts["tie"]) / counted if counted else None
    return {
        "win_rate": win_rate,
        # Prompts are the independent unit (the two orders of one prompt are correlated), so resample prompts.
        "win_rate_ci95": bootstrap_interval(per_prompt, resamples=resamples, seed=seed),
        "win_rate_wilson95": wilson_interval(counts["win"] + 0.5 * counts["tie"], counted),
        **counts,
        "verdicts": counted,
        "prompts": len(conversations),
        "order_consistency": consistent / both_valid if both_valid else None,
        "judgements": judgements,
    }
