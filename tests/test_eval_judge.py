"""The judge client against a local server speaking the OpenAI chat-completions wire format."""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pipeline import judge
from pipeline.config import JudgeConfig


class FakeJudge(BaseHTTPRequestHandler):
    """Prefers the reply that contains "good"; misbehaves on cue words in the user's question."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        self.server.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply_a = prompt.split("[Reply A]\n", 1)[1].split("\n\n[Reply B]", 1)[0]
        reply_b = prompt.split("[Reply B]\n", 1)[1]
        if "FLAKY" in prompt and self.server.failures_left:
            self.server.failures_left -= 1
            return self.answer(503, b'{"error": "overloaded"}')
        if "GARBAGE" in prompt:
            return self.answer(200, b"<html>not json</html>")
        if "MALFORMED" in prompt:
            content = "Both replies have merit; I would rather not pick one."
        elif "BOTH" in prompt:
            content = "At first [[A]], on reflection [[B]]."
        elif ("good" in reply_a) == ("good" in reply_b.split("\n\nWhich reply")[0]):
            content = "They are equally good. [[C]]"
        else:
            content = "A short rationale. [[A]]" if "good" in reply_a else "[[ B ]]"
        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content}}]}
        self.answer(200, json.dumps(payload).encode())

    def answer(self, status, data: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def judge_server(max_requests: int = 200):
    """A judge on 127.0.0.1 that serves at most `max_requests` requests, so a runaway client cannot hang a test."""
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    server.seen, server.failures_left, server.timeout = [], 1, 0.2

    def serve():
        while len(server.seen) < max_requests and not stop.is_set():
            server.handle_request()

    stop = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.server_close()


@pytest.mark.parametrize("answer, verdict", [
    ("Reasoning first. [[A]]", "A"), ("[[B]]", "B"), ("tie: [[C]]", "C"), ("[[ A ]] and again [[A]]", "A"),
    ("[[A]] no wait [[B]]", "invalid"), ("A is better", "invalid"), ("", "invalid"), (None, "invalid"),
])
def test_parse_verdict(answer, verdict):
    assert judge.parse_verdict(answer) == verdict


def test_compare_asks_both_orders_and_scores_for_the_first_model(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekret")
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    with judge_server() as (server, url):
        cfg = JudgeConfig(base_url=url, model="judge-1", api_key_env="TEST_JUDGE_KEY", timeout=5, retries=0)
        result = judge.compare(cfg, conversations, ["a good reply"] * 3, ["a poor reply"] * 3, resamples=200)
        seen = list(server.seen)
    assert len(seen) == 6
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sekret" for r in seen)
    assert all(r["body"]["model"] == "judge-1" and r["body"]["temperature"] == 0 for r in seen)
    # each question once with the first model's reply as A, once as B
    firsts = [r["body"]["messages"][-1]["content"].split("[Reply A]\n")[1].startswith("a good") for r in seen]
    assert firsts == [True, False] * 3
    assert (result["win"], result["loss"], result["tie"], result["invalid"], result["error"]) == (6, 0, 0, 0, 0)
    assert result["win_rate"] == 1.0 and result["win_rate_ci95"] == (1.0, 1.0)
    assert result["order_consistency"] == 1.0


def test_ties_losses_and_win_rate_interval():
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    first = ["good one", "good two", "poor three", "good four"]
    second = ["poor", "good too", "good", "poor"]
    with judge_server() as (_, url):
        result = judge.compare(JudgeConfig(base_url=url, model="m", timeout=5, retries=0), conversations, first,
                               second, resamples=500)
    # q0 and q3 won twice, q1 tied twice, q2 lost twice -> (4 + 0.5 * 2) / 8
    assert (result["win"], result["tie"], result["loss"]) == (4, 2, 2)
    assert result["win_rate"] == pytest.approx(5 / 8)
    low, high = result["win_rate_ci95"]
    assert 0 <= low < 5 / 8 < high <= 1
    assert result["win_rate_wilson95"][0] < 5 / 8 < result["win_rate_wilson95"][1]


def test_malformed_answers_and_broken_responses_are_counted_not_raised():
    conversations = [[{"role": "user", "content": c}] for c in ("MALFORMED", "BOTH", "GARBAGE", "fine", "FLAKY")]
    with judge_server() as (server, url):
        cfg = JudgeConfig(base_url=url, model="m", timeout=5, retries=1)
        result = judge.compare(cfg, conversations, ["good"] * 5, ["poor"] * 5, resamples=100)
        requests = len(server.seen)
    # MALFORMED and BOTH: 2 invalid verdicts each; GARBAGE: 2 errors (no retry for a bad body);
    # "fine" and FLAKY (one 503, retried) both count as wins.
    assert (result["invalid"], result["error"], result["win"], result["loss"]) == (4, 2, 4, 0)
    assert requests == 11
    assert result["verdicts"] == 4 and result["win_rate"] == 1.0


def test_unreachable_judge_is_an_error_per_request():
    with judge_server() as (_, url):
        pass  # closed again: nothing listens on that port any more
    cfg = JudgeConfig(base_url=url, model="m", timeout=1, retries=0)
    result = judge.compare(cfg, [[{"role": "user", "content": "q"}]], ["a"], ["b"])
    assert result["error"] == 2 and result["win_rate"] is None and result["win_rate_ci95"] is None
