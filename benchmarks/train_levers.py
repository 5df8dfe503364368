"""One training lever at a time: forward + backward throughput of one micro-step, all in one process.

    python benchmarks/train_levers.py --recipe recipes/small.yaml --out_dir=/tmp/small [--reps 2]

Starts from the recipe's configuration as `pipeline.train` builds it and changes one thing per row
(the LM head, attention, dtype, gradient checkpointing, rows per micro-step, threads, LoRA dropout),
plus a micro-step shaped like TRL's defaults (8 padded sequences). Every row runs on the same packed
rows (or the same 8 sequences), rows interleaved and repeated, so drifting load from other jobs hits
them alike; the best repetition counts. No optimizer step: it is a rounding error next to these.
`python -m pipeline bench` measures whole configurations end to end; this says where the gain is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `pipeline`

import torch  # noqa: E402

from pipeline import bench, speed, train  # noqa: E402
from pipeline.config import load_recipe  # noqa: E402

# name -> changes from the recipe's configuration
LEVERS = {
    "recipe (all fast paths)": {},
    "LM head: TRL fused (all positions)": {"head": "trl"},
    "attention: sdpa, dense block-diagonal mask": {"attn": "sdpa"},
    "weights fp32 + bf16 autocast": {"weights": torch.float32},
    "fp32, no autocast": {"weights": torch.float32, "autocast": False},
    "gradient checkpointing on": {"checkpointing": True},
    "1 packed row per micro-step": {"rows": 1},
    "4 packed rows per micro-step": {"rows": 4},
    "8 packed rows per micro-step": {"rows": 8},
    "2 threads": {"threads": 2},
    "LoRA dropout 0 (not a speed setting)": {"dropout": 0.0},
    "TRL-default micro-step (8 padded seqs, ckpt, fp32+autocast, TRL head, sdpa)":
        {"padded": True, "head": "trl", "attn": "sdpa", "weights": torch.float32, "checkpointing": True,
         "threads": None},
}


@dataclasses.dataclass
class Setup:
    trainer: object
    model: object  # the patched causal LM inside PEFT
    trl_forward: object
    compact_forward: object


def build(recipe, model_dir, data, tokenizer, weights: torch.dtype, dropout: float, work: Path) -> Setup:
    from trl import SFTTrainer

    cfg = dataclasses.replace(recipe.train, lora_dropout=dropout)
    args = train.sft_config(cfg, recipe, work, world_size=1, dtype=weights)
    model = train.load_model(model_dir, weights, speed.register_packed_attention())
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=train.lora_config(cfg, tokenizer))
    causal = trainer.model.get_base_model()
    train.expose_head_bias(causal)
    trl_forward = causal.forward
    speed.add_compact_lm_head(causal)
    trainer.model.train()
    return Setup(trainer, causal, trl_forward, causal.forward)


def padded_batch(data, tokenizer, n: int = 8, seed: int = 0):
    """n random examples padded to the longest, labels masked to assistant tokens (TRL's collator)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [data[i] for i in random.Random(seed).sample(range(len(data)), n)]
    examples = [{"input_ids": r["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]} for r in rows]
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)


def micro_step(setup: Setup, batch, lever: dict, default_threads: int, recipe_threads: int) -> tuple[float, float]:
    model = setup.model
    model.forward = setup.trl_forward if lever.get("head") == "trl" else setup.compact_forward
    model.set_attn_implementation(lever.get("attn", speed.PACKED_ATTENTION))
    threads = lever.get("threads", recipe_threads)
    torch.set_num_threads(default_threads if threads is None else threads)
    peft = setup.trainer.model
    if lever.get("checkpointing"):
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if lever.get("autocast", True) else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        loss = setup.trainer.compute_loss(peft, dict(batch))
    loss.backward()
    seconds = time.perf_counter() - start
    peft.zero_grad(set_to_none=True)
    if lever.get("checkpointing"):
        peft.gradient_checkpointing_disable()
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return tokens / seconds, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/small.yaml")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per micro-step in the recipe row")
    parser.add_argument("--levers", help="comma-separated substrings of the lever names to run")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--model-config")
    parser.add_argument("--data")
    args, overrides = parser.parse_known_args()
    if torch.cuda.is_available():
        raise SystemExit("CPU levers only; on CUDA run `python -m pipeline bench` with recipe overrides")
    recipe = load_recipe(args.recipe, overrides)
    default_threads = torch.get_num_threads()
    recipe_threads = speed.resolve_threads(recipe.train.threads)
    work = Path(tempfile.mkdtemp(prefix="sft-levers-"))
    model_dir, tokenizer = bench.prepare_model(recipe, args, work)
    data = bench.load_data(recipe, args)
    levers = {k: v for k, v in LEVERS.items()
              if not args.levers or any(s in k for s in args.levers.split(",")) or not v}
    setups = {}
    for lever in levers.values():
        key = (lever.get("weights", torch.bfloat16), lever.get("dropout", recipe.train.lora_dropout))
        if key not in setups:
            setups[key] = build(recipe, model_dir, data, tokenizer, *key, work=work / str(len(setups)))
    first = next(iter(setups.values())).trainer
    packed = first.train_dataset
    batches = {rows: first.data_collator([packed[i] for i in range(rows)]) for rows in (1, 2, 4, 8)}
    padded = padded_batch(data, tokenizer)
    print(f"{os.cpu_count()} CPUs, torch default {default_threads} threads, recipe threads {recipe_threads} "
          f"(load average {os.getloadavg()[0]:.1f}); packed rows of {recipe.data.max_length}: "
          + ", ".join(f"{r} rows = {b['input_ids'].numel()} tokens" for r, b in batches.items())
          + f"; 8 padded sequences = {int(padded['attention_mask'].sum())} real of {padded['input_ids'].numel()}",
          flush=True)
    best: dict[str, float] = {}
    for rep in range(args.reps):
        for name, lever in levers.items():
            setup = setups[(lever.get("weights", torch.bfloat16), lever.get("dropout", recipe.train.lora_dropout))]
            batch = padded if lever.get("padded") else batches[lever.get("rows", args.rows)]
            tokens_per_s, loss = micro_step(setup, batch, lever, default_threads, recipe_threads)
            best[name] = max(best.get(name, 0.0), tokens_per_s)
            print(f"rep {rep}  {name:80s} {tokens_per_s:8.1f} tokens/s  loss {loss:.4f}", flush=True)
    reference = best["recipe (all fast paths)"]
    print("\n| lever (one change from the recipe) | tokens/s (fwd+bwd, best of reps) | vs recipe |\n| --- | --- | --- |")
    for name, value in best.items():
        print(f"| {name} | {value:.1f} | {value / reference:.2f}x |")


if __name__ == "__main__":
    main()
