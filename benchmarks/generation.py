"""Eval generation speed: the pipeline's batched generation vs unbatched `generate`, one prompt at a time.

    python benchmarks/generation.py --model /tmp/small/base --prompts 100 --max-new-tokens 128

Both decode greedily with the same prompts, template and stop tokens in one process. On a shared
machine the load from other jobs swings timings by several times within minutes, so the two are
interleaved: prompts are sorted and cut into batches as `eval` does; each batch is generated
batched, then its prompts one at a time. `--unbatched-per-batch K` times only K evenly spaced
prompts of each batch one at a time and scales that to the batch (it says so). The last line is
the ratio unbatched seconds / batched seconds.
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
def one_prompt(model, tokenizer, conversation, stop_ids, max_new_tokens) -> list[int]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                            pad_token_id=pad_id)
    return output[0, encoded["input_ids"].shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (e.g. /tmp/small/base or runs/small/merged)")
    parser.add_argument("--prompts", type=int, default=100, help="number of prompts")
    parser.add_argument("--prompt-file", default=str(PROMPTS), help="JSONL, one JSON string per line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--template", default="auto", help="chat template: auto, gemma, chatml or a .jinja path")
    parser.add_argument("--unbatched-per-batch", type=int, default=0,
                        help="time this many prompts of each batch one at a time and scale to the batch (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [json.loads(line) for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    model, tokenizer = load_for_eval(Path(args.model), torch.float32)
    tokenizer.chat_template = chat_template_for(tokenizer, args.template)
    stop_ids = [end_of_turn_id(tokenizer, tokenizer.chat_template)]
    if tokenizer.eos_token_id not in stop_ids and tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    conversations = [[{"role": "user", "content": p}] for p in lines[: args.prompts]]
    # The same longest-first order and batches that generate_replies makes over the whole set.
    length = {id(c): len(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]) for c in conversations}
    ordered = sorted(conversations, key=lambda c: -length[id(c)])
    batches = [ordered[i:i + args.batch_size] for i in range(0, len(ordered), args.batch_size)]
    print(f"model {args.model}; {len(conversations)} prompts x {args.max_new_tokens} new tokens; batch "
          f"{args.batch_size}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
          f"load avg {load_avg()}", flush=True)

    # Warm-up: the first calls pay one-off costs (kernel selection, allocator growth) that neither side should.
    generate_replies(model, tokenizer, ordered[-2:], stop_ids, EvalConfig(max_new_tokens=2), desc="warm-up")
    one_prompt(model, tokenizer, ordered[-1], stop_ids, 2)

    # CPU time next to wall time: with --threads 1 it barely moves with other jobs' load, while wall time
    # on a shared 2-core machine can swing several times within minutes.
    batched_s = unbatched_s = batched_cpu = unbatched_cpu = 0.0
    batched_tokens = unbatched_tokens = timed = same = 0
    for number, batch in enumerate(batches, start=1):
        start, cpu = time.perf_counter(), time.process_time()
        replies = generate_replies(model, tokenizer, batch, stop_ids, cfg, desc=f"batch {number}/{len(batches)}")
        batched_s += time.perf_counter() - start
        batched_cpu += time.process_time() - cpu
        batched_tokens += sum(r["new_tokens"] + r["stopped"] for r in replies)
        k = args.unbatched_per_batch or len(batch)
        picks = sorted({round(i * (len(batch) - 1) / max(k - 1, 1)) for i in range(min(k, len(batch)))})
        start, cpu = time.perf_counter(), time.process_time()
        for i in picks:
            tokens = one_prompt(model, tokenizer, batch[i], stop_ids, args.max_new_tokens)
            unbatched_tokens += len(tokens)
            kept = next((tokens[:j] for j, t in enumerate(tokens) if t in stop_ids), tokens)
            same += tokenizer.decode(kept, skip_special_tokens=True).strip() == replies[i]["text"]
        unbatched_s += (time.perf_counter() - start) * len(batch) / len(picks)
        unbatched_cpu += (time.process_time() - cpu) * len(batch) / len(picks)
        timed += len(picks)
        print(f"batch {number}: batched {batched_s:.1f} s, unbatched {unbatched_s:.1f} s so far; "
              f"load avg {load_avg()}", flush=True)
    scaled = f" (timed on {timed} of {len(conversations)} prompts, scaled per batch)" \
        if timed < len(conversations) else ""
    print(f"batched (sorted by length, left padding, KV cache): {batched_s:.1f} s, {batched_tokens} tokens, "
          f"{batched_tokens / batched_s:.1f} tok/s")
    print(f"unbatched (one prompt per generate call): {unbatched_s:.1f} s{scaled}, "
          f"{unbatched_tokens * len(conversations) / timed:.0f} tokens, "
          f"{unbatched_tokens * len(conversations) / timed / unbatched_s:.1f} tok/s")
    print(f"greedy replies identical batched vs unbatched: {same}/{timed}")
    print(f"CPU time: batched {batched_cpu:.1f} s, unbatched {unbatched_cpu:.1f} s, "
          f"ratio {unbatched_cpu / batched_cpu:.2f}x (threads {torch.get_num_threads()})")
    print(f"speedup {unbatched_s / batched_s:.2f}x (unbatched {unbatched_s:.1f} s / batched {batched_s:.1f} s, "
          f"batch {args.batch_size}, load avg {load_avg()})")


if __name__ == "__main__":
    main()
