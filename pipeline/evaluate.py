"""Stage 5: compare the base model with the tuned assistant on held-out conversations."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import artifacts
from pipeline.config import Recipe
from pipeline.train import compute_dtype

log = logging.getLogger(__name__)


def model_path(name: str, recipe: Recipe) -> Path:
    """`base`, `tuned` (merged weights), or any local model directory."""
    if name == "base":
        return recipe.out / "base"
    if name == "tuned":
        return recipe.out / "merged"
    return Path(name)


def load_for_eval(path: Path, template: str, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


@torch.inference_mode()
def assistant_nll(model, rows: list[dict], pad_id: int, batch_size: int) -> dict:
    """Mean negative log-likelihood per trained (assistant) token, teacher-forced."""
    total, count, per_example = 0.0, 0, []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            trained = torch.tensor(r["assistant_masks"], dtype=torch.bool)
            labels[i, :n] = torch.where(trained, ids[i, :n], -100)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        valid = targets != -100
        total += nll[valid].sum().item()
        count += valid.sum().item()
        per_example += (nll.sum(1) / valid.sum(1).clamp(min=1)).tolist()
    return {"assistant_nll": total / max(count, 1), "tokens": count}


@torch.inference_mode()
def generate_replies(model, tokenizer, conversations: list[list[dict]], stop_ids: list[int],
                     max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy, batched, left-padded generation with the KV cache."""
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    results = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="generate", leave=False):
        chunk = conversations[start:start + batch_size]
        encoded = tokenizer.apply_chat_template(chunk, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, padding=True, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids, pad_token_id=pad_id)
        for row in output[:, encoded["input_ids"].shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
            kept = row if stop is None else row[:stop]
            results.append({"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                            "stopped": stop is not None, "new_tokens": len(kept)})
    return results


def stop_token_ids(tokenizer, data_dir: Path) -> list[int]:
    end_of_turn = json.loads((data_dir / "report.json").read_text())["end_of_turn_token"]
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def evaluate(recipe: Recipe, overwrite: bool = False) -> Path:
    cfg = recipe.eval
    data_dir, out = recipe.out / "data", recipe.out / "eval"
    paths = {name: model_path(name, recipe) for name in cfg.models}
    inputs = {"eval": dataclasses.asdict(cfg), "data": artifacts.upstream(data_dir),
              "models": {name: artifacts.upstream(p) if (p / artifacts.COMPLETE).exists() else str(p)
                         for name, p in paths.items()}}
    if artifacts.begin(out, inputs, overwrite):
        log.info("eval: reusing %s", out)
        return out
    template = (data_dir / "chat_template.jinja").read_text()
    rows = Dataset.from_parquet(str(data_dir / "validation.parquet")).to_list()
    prompts = [r["messages"][:-1] for r in rows[: cfg.max_prompts]]
    references = [r["messages"][-1]["content"] for r in rows[: cfg.max_prompts]]
    dtype = compute_dtype("auto")
    metrics, samples = {}, {}
    for name, path in paths.items():
        start = time.perf_counter()
        model, tokenizer = load_for_eval(path, template, dtype)
        stops = stop_token_ids(tokenizer, data_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        scores = assistant_nll(model, rows, pad_id, cfg.batch_size)
        replies = generate_replies(model, tokenizer, prompts, stops, cfg.max_new_tokens, cfg.batch_size)
        samples[name] = replies
        metrics[name] = {
            **scores,
            "stop_rate": sum(r["stopped"] for r in replies) / max(len(replies), 1),
            "mean_new_tokens": sum(r["new_tokens"] for r in replies) / max(len(replies), 1),
            "seconds": round(time.perf_counter() - start, 2),
        }
        log.info("eval %s: %s", name, metrics[name])
        del model
    with open(out / "generations.jsonl", "w") as handle:
        for i, prompt in enumerate(prompts):
            handle.write(json.dumps({"prompt": prompt, "reference": references[i],
                                     **{name: samples[name][i] for name in samples}}, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report(recipe, metrics, prompts, references, samples))
    return artifacts.finish(out, "eval", inputs, recipe, metrics)


def report(recipe: Recipe, metrics: dict, prompts, references, samples) -> str:
    names = list(metrics)
    lines = [f"# Evaluation: {recipe.name}", "", "| model | assistant NLL | stop rate | mean new tokens |",
             "| --- | --- | --- | --- |"]
    for name in names:
        m = metrics[name]
        lines.append(f"| {name} | {m['assistant_nll']:.4f} | {m['stop_rate']:.2f} | {m['mean_new_tokens']:.1f} |")
    lines += ["", "## Samples", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### Prompt {i + 1}", "", "> " + prompt[-1]["content"].replace("\n", "\n> "), ""]
        lines += ["| " + " | ".join(["reference", *names]) + " |", "|" + " --- |" * (len(names) + 1)]
        cells = [references[i], *(samples[n][i]["text"] for n in names)]
        lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |", ""]
    return "\n".join(lines)
