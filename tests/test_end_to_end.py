"""`tiny` through every stage via the real CLI, then the merged export in plain transformers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"COMPLETE", "metrics.json", "provenance.json", "recipe.yaml"}
TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}
EXPECTED = {
    "base": COMMON | TOKENIZER | {"config.json", "generation_config.json", "model.safetensors", "source.json"},
    "data": COMMON | {"README.md", "chat_template.jinja", "quarantine.jsonl", "report.json", "train.parquet",
                      "validation.parquet"},
    "adapter": COMMON | TOKENIZER | {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                     "chat_template.jinja", "trainer_state.json"},
    "merged": COMMON | TOKENIZER | {"chat_template.jinja", "config.json", "generation_config.json",
                                    "model.safetensors"},
    "eval": COMMON | {"generations.jsonl", "report.md", "report.html", "loss_curve.png", "metric_bars.png",
                      "reply_lengths.png"},
}

pytestmark = pytest.mark.slow


def cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cli("sft", "--recipe", "recipes/tiny.yaml", f"--out_dir={out}")
    return out


def test_every_stage_writes_exactly_its_files(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(EXPECTED)
    for stage, files in EXPECTED.items():
        assert {p.name for p in (run_dir / stage).iterdir()} == files, stage


def test_later_stages_record_what_they_were_built_from(run_dir):
    def provenance(stage):
        return json.loads((run_dir / stage / "provenance.json").read_text())

    assert provenance("adapter")["inputs"]["data"]["fingerprint"] == provenance("data")["fingerprint"]
    assert provenance("merged")["inputs"]["adapter"]["fingerprint"] == provenance("adapter")["fingerprint"]
    assert provenance("eval")["inputs"]["models"]["tuned"]["fingerprint"] == provenance("merged")["fingerprint"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"base", "tuned"} and metrics["tuned"]["assistant_nll"] < metrics["base"]["assistant_nll"]


def test_rerun_reuses_and_a_changed_recipe_is_refused(run_dir):
    marker = run_dir / "adapter" / "COMPLETE"
    before = marker.stat().st_mtime_ns
    result = cli("sft", "--recipe", "recipes/tiny.yaml", f"--out_dir={run_dir}")
    assert result.stdout.count("->") == 5 and "reusing" in result.stderr
    assert marker.stat().st_mtime_ns == before
    refused = cli("eval", "--recipe", "recipes/tiny.yaml", f"--out_dir={run_dir}", "--eval.max_new_tokens=4",
                  check=False)
    assert refused.returncode != 0 and "eval.max_new_tokens: 16 -> 4" in refused.stderr


def test_merged_model_loads_without_peft_and_matches_the_adapter_model(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    input_ids = [[2, 5, 60, 70, 80, 90, 100, 6, 110, 120]]
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.modules["peft"] = None  # any import of peft now fails
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(run_dir / "merged")!r}, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained({str(run_dir / "merged")!r})
        assert "<end_of_turn>" in tokenizer.chat_template
        logits = model(input_ids=torch.tensor({input_ids})).logits
        print(json.dumps({{"logits": logits[0].tolist(), "eos": model.generation_config.eos_token_id}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    exported = json.loads(result.stdout.strip().splitlines()[-1])
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        expected = adapted(input_ids=torch.tensor(input_ids)).logits[0]
    torch.testing.assert_close(torch.tensor(exported["logits"]), expected, atol=1e-4, rtol=1e-4)
    end_of_turn = 5  # byte_tokenizer: <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>
    assert end_of_turn in exported["eos"]
    with adapted.disable_adapter(), torch.no_grad():
        untuned = adapted(input_ids=torch.tensor(input_ids)).logits[0]
    assert (untuned - expected).abs().max() > 1e-3  # the adapter changed something


def test_the_turn_tokens_train_with_the_adapters_and_no_other_embedding_row(run_dir):
    """A base model's turn tokens are untrained; `train.trainable_tokens: template` trains exactly their rows
    (tied to the LM head), and the merge writes them into the exported embedding."""
    from safetensors.torch import load_file

    key = "model.embed_tokens.weight"
    base = load_file(run_dir / "base" / "model.safetensors")[key]
    merged = load_file(run_dir / "merged" / "model.safetensors")[key]
    changed = (base != merged).any(-1).nonzero().flatten().tolist()
    assert changed == [4, 5]  # byte_tokenizer: <start_of_turn> <end_of_turn>
    config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True)  # so the LM head's rows are the trained ones too
