"""Eval generation speed: the pipeline's batched generation vs unbatched `generate`, one prompt at a time.

    python benchmarks/generation.py --model /tmp/small/base --prompts 100 --max-new-tokens 128

Both runs decode greedily with the same prompts, template and stop tokens in the same process.
The last line is the ratio (unbatched seconds / batched seconds). `--unbatched-prompts K` times
the slow path on the first K prompts only and scales it to all prompts (it states so), for
when the full unbatched run would take too long on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.data import chat_template_for, end_of_turn_id  # noqa: E402
from pipeline.evaluate import generate_replies, load_for_eval  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[2] / "shared/data/oasst/oasst_prompt_lottery_en250.jsonl"


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


@torch.inference_mode()
def unbatched(model, tokenizer, conversations, stop_ids, max_new_tokens) -> tuple[float, list[int]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    lengths, start = [], time.perf_counter()
    for conversation in conversations:
        encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=pad_id)
        lengths.append(output.shape[1] - encoded["input_ids"].shape[1])
    return time.perf_counter() - start, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (e.g. /tmp/small/base or runs/small/merged)")
    parser.add_argument("--prompts", type=int, default=100, help="number of prompts")
    parser.add_argument("--prompt-file", default=str(PROMPTS), help="JSONL, one JSON string per line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--template", default="auto", help="chat template: auto, gemma, chatml or a .jinja path")
    parser.add_argument("--unbatched-prompts", type=int, default=0,
                        help="time unbatched generation on this many prompts and scale to --prompts (0: all)")
    args = parser.parse_args()

    torch.manual_seed(0)
    lines = [json.loads(line) for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": p}] for p in lines[: args.prompts]]
    model, tokenizer = load_for_eval(Path(args.model), torch.float32)
    tokenizer.chat_template = chat_template_for(tokenizer, args.template)
    stop_ids = [end_of_turn_id(tokenizer, tokenizer.chat_template)]
    if tokenizer.eos_token_id not in stop_ids and tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"model {args.model}; {len(conversations)} prompts x {args.max_new_tokens} new tokens; "
          f"torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; load avg {load_avg()}", flush=True)

    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, conversations, stop_ids, cfg, desc="batched")
    batched_s = time.perf_counter() - start
    batched_tokens = sum(r["new_tokens"] + r["stopped"] for r in replies)
    print(f"batched (batch {args.batch_size}, sorted by length, left padding, KV cache): {batched_s:.1f} s, "
          f"{batched_tokens} tokens, {batched_tokens / batched_s:.1f} tok/s; load avg {load_avg()}", flush=True)

    timed = conversations[: args.unbatched_prompts or len(conversations)]
    seconds, lengths = unbatched(model, tokenizer, timed, stop_ids, args.max_new_tokens)
    unbatched_s = seconds * len(conversations) / len(timed)
    scaled = f" (timed on {len(timed)} prompts, scaled x{len(conversations) / len(timed):.2f})" \
        if len(timed) < len(conversations) else ""
    print(f"unbatched (one prompt per generate call): {unbatched_s:.1f} s{scaled}, {sum(lengths)} tokens, "
          f"{sum(lengths) / seconds:.1f} tok/s; load avg {load_avg()}", flush=True)
    print(f"speedup {unbatched_s / batched_s:.2f}x (unbatched {unbatched_s:.1f} s / batched {batched_s:.1f} s)")


if __name__ == "__main__":
    main()
