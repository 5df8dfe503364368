"""The eval report: files exist and parse, from synthetic results and from an end-to-end `tiny` run."""

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.config import MONOPSONY_PROMPT, load_recipe
from pipeline.import_base import byte_tokenizer
from pipeline.report import write_report
from test_eval_generation import SMOLLM2
from test_eval_judge import judge_server

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data/oasst/oasst_en100.trees.jsonl"


class TagBalance(HTMLParser):
    """Collects embedded images and checks that every opened element is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parse_html(path: Path) -> TagBalance:
    parser = TagBalance()
    parser.feed(path.read_text())
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def assert_png(data: bytes):
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def synthetic_results(names):
    base = {"assistant_nll": 2.0, "assistant_nll_ci95": [1.9, 2.1], "perplexity": math.e ** 2,
            "perplexity_ci95": [6.7, 8.2], "bits_per_byte": 1.2, "bits_per_byte_ci95": [1.1, 1.3], "examples": 3,
            "tokens": 90, "by_turn": {}, "by_language": {}, "prompts": 2, "stop_rate": 0.5, "mean_new_tokens": 10.0,
            "mean_words": 7.0, "distinct_2": 0.8, "loop_rate_4gram": 0.0, "rouge_l": 0.2, "rouge_l_ci95": [0.1, 0.3],
            "rouge_l_prompts": 1, "language_match": 1.0, "language_match_prompts": 2,
            "generated_tokens_per_second": 5.0}
    return {name: dict(base) for name in names}


def test_report_without_a_judge_says_so_and_fakes_nothing(tmp_path):
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    results = synthetic_results(["base", "tuned"])
    results["tuned"]["judge"] = {"configured": False, "model": "", "anchor": "tuned", "vs": {}}
    items = [{"source": "showcase", "messages": [{"role": "user", "content": "Is <b>this</b> escaped?"}],
              "reference": None},
             {"source": "validation", "messages": [{"role": "user", "content": "q"}], "reference": "r"}]
    replies = {n: [{"text": "a & b", "stopped": True, "new_tokens": 3}, {"text": "x", "stopped": False,
                                                                          "new_tokens": 16}] for n in results}
    files = write_report(tmp_path, recipe, results, items, replies, tmp_path / "missing_trainer_state.json")
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "No judge configured" in md and "No judge configured" in page
    assert "preference" not in files and not (tmp_path / "preference.png").exists()
    assert "loss" not in files  # no trainer state, no loss plot rather than an empty one
    assert "Is &lt;b&gt;this&lt;/b&gt; escaped?" in page and "a &amp; b" in page
    parser = parse_html(tmp_path / "report.html")
    assert len(parser.images) == 2
    assert "| bits per reply byte (teacher-forced) | 1.200 [1.100, 1.300] | 1.200 [1.100, 1.300] |" in md


def reference_model(path: Path) -> Path:
    """A random Llama with a ChatML byte tokenizer and SmolLM2's template: a stand-in reference model."""
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = SMOLLM2
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m pipeline sft` on the tiny recipe with a reference model and a local judge."""
    if not (ROOT / DATA).is_file():
        pytest.skip(f"{DATA} is not beside this checkout")
    tmp = tmp_path_factory.mktemp("eval_e2e")
    reference = reference_model(tmp / "reference")
    with judge_server(max_requests=100) as (server, url):
        command = [sys.executable, "-m", "pipeline", "sft", "--recipe", "recipes/tiny.yaml", f"--out_dir={tmp / 'run'}",
                   f"--data.source={DATA}", "--train.max_steps=4", "--train.batch_size=2",
                   "--train.micro_batch_size=2", f"--eval.models=[base, tuned, {reference}]",
                   f"--eval.judge.base_url={url}", "--eval.judge.model=fake-judge", "--eval.judge.retries=0"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        requests = len(server.seen)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "run" / "eval", str(reference), requests


@pytest.mark.slow
def test_tiny_run_metrics_json(tiny_run):
    out, reference, requests = tiny_run
    results = json.loads((out / "metrics.json").read_text())
    assert list(results) == ["base", "tuned", reference]
    for name, m in results.items():
        for key in ("assistant_nll", "perplexity", "bits_per_byte"):
            assert math.isfinite(m[key]) and m[key] > 0
            low, high = m[f"{key}_ci95"]
            assert low <= m[key] <= high
        assert m["prompts"] == 12 and 0 <= m["stop_rate"] <= 1
        assert m["rouge_l_prompts"] == 8 and set(m["by_turn"]) >= {"1"} and set(m["by_language"]) == {"en"}
    # four steps at a high learning rate fit the tiny model to the data: held-out NLL drops
    assert results["tuned"]["assistant_nll"] < results["base"]["assistant_nll"]
    assert results["base"]["tokens"] == results["tuned"]["tokens"]
    assert results["base"]["stop_tokens"] == ["<end_of_turn>", "<eos>"]
    assert results[reference]["nll_masking"] == "prefix diff"
    assert results[reference]["stop_tokens"] == ["<|im_end|>"]
    judged = results["tuned"]["judge"]
    assert judged["configured"] and set(judged["vs"]) == {"base", reference}
    # 12 prompts x 2 orders x 2 opponents, every answer a valid verdict
    assert requests == 48 and all(v["verdicts"] == 24 and v["error"] == 0 for v in judged["vs"].values())


@pytest.mark.slow
def test_tiny_run_report_files(tiny_run):
    out, reference, _ = tiny_run
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["loss_curve.png", "metric_bars.png", "preference.png", "reply_lengths.png"]
    for name in pngs:
        assert_png((out / name).read_bytes())
    parser = parse_html(out / "report.html")
    embedded = [src for src in parser.images if src.startswith("data:image/png;base64,")]
    assert len(embedded) == len(parser.images) == 4
    for src in embedded:
        assert_png(base64.b64decode(src.split(",", 1)[1]))
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert MONOPSONY_PROMPT.replace("'", "&#x27;") in page and MONOPSONY_PROMPT in md
    assert page.count('<section class="sample">') == 12 and len(re.findall(r"^### \d+\. ", md, re.M)) == 12
    assert "No judge configured" not in md and "fake-judge" in md
    for name in pngs:
        assert f"]({name})" in md
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 12 and all({"base", "tuned", reference} <= set(g) for g in generations)
    assert generations[0]["messages"][0]["content"] == MONOPSONY_PROMPT
