"""Stage 4: fold the LoRA adapters into the base weights so plain transformers loads the result."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline import artifacts
from pipeline.config import Recipe

log = logging.getLogger(__name__)


def probe_batch(tokenizer, data_dir: Path, n: int = 2) -> torch.Tensor:
    from datasets import Dataset

    rows = Dataset.from_parquet(str(data_dir / "validation.parquet")).select_columns(["input_ids"]).to_list()[:n]
    width = min(len(r["input_ids"]) for r in rows)
    return torch.tensor([r["input_ids"][:width] for r in rows])


def merge(recipe: Recipe, overwrite: bool = False) -> Path:
    cfg = recipe.merge
    base_dir, data_dir, adapter_dir, out = (recipe.out / s for s in ("base", "data", "adapter", "merged"))
    inputs = {"merge": dataclasses.asdict(cfg), "base": artifacts.upstream(base_dir),
              "adapter": artifacts.upstream(adapter_dir)}
    if artifacts.begin(out, inputs, overwrite):
        log.info("merge: reusing %s", out)
        return out
    # Merge and check in fp32 so the check measures the merge, not rounding.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    saved_dtype = base.config.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    probe = probe_batch(tokenizer, data_dir)
    with torch.inference_mode():
        adapter_logits = adapted(input_ids=probe).logits
    merged = adapted.merge_and_unload().eval()
    with torch.inference_mode():
        gap = (merged(input_ids=probe).logits - adapter_logits).abs().max().item()
    if gap > cfg.logits_atol:
        raise ValueError(f"merged logits differ from the adapter model's by {gap:.2e} > merge.logits_atol")

    end_of_turn = json.loads((data_dir / "report.json").read_text())["end_of_turn_token"]
    stop_ids = [tokenizer.convert_tokens_to_ids(end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    merged.generation_config = GenerationConfig.from_model_config(merged.config)
    merged.generation_config.eos_token_id = stop_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.to(saved_dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {"max_abs_logit_gap_fp32": gap, "logits_atol": cfg.logits_atol, "dtype": str(saved_dtype),
               "eos_token_id": stop_ids}
    return artifacts.finish(out, "merge", inputs, recipe, metrics)
