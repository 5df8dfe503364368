"""Stage 5: what fine-tuning bought. Base vs tuned (vs reference models), in numbers and pictures.

Every model sees the same held-out data, each rendered with the chat template it is served with:
base and tuned with the run's template (OUT/data/chat_template.jinja), a reference model with its
own tokenizer's template. Two kinds of evidence:

* teacher-forced: NLL of the reference assistant tokens of the validation conversations, with
  bootstrap intervals, split by turn and by language;
* generated: replies to held-out prompts (plus fixed showcase prompts), scored for stopping,
  length, repetition, ROUGE-L against the reference reply and language match, and optionally
  judged pairwise by an LLM judge.

The report (metrics.json, report.md, self-contained report.html, PNG plots) goes to OUT/eval/.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import artifacts, judge, metrics, report
from pipeline.config import BaseConfig, EvalConfig, Recipe
from pipeline.data import chat_template_for, end_of_turn_id
from pipeline.import_base import cached_import
from pipeline.train import compute_dtype

log = logging.getLogger(__name__)

RUN_MODELS = ("base", "tuned")


# --------------------------------------------------------------------------- models and templates


def model_path(name: str, recipe: Recipe) -> Path:
    """`base`, `tuned` (merged weights), a local model directory, or any base source via the import cache."""
    if name == "base":
        return recipe.out / "base"
    if name == "tuned":
        return recipe.out / "merged"
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return local
    return cached_import(BaseConfig(source=name))


def model_identity(name: str, path: Path) -> dict | str:
    """What the eval fingerprint records about a model: a stage's fingerprint, or where the weights are."""
    if name in RUN_MODELS:
        return artifacts.upstream(path)
    return {"source": name, "path": str(path)}


def serving_template(name: str, tokenizer, data_dir: Path) -> str:
    if name in RUN_MODELS:
        return (data_dir / "chat_template.jinja").read_text()
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return own or chat_template_for(tokenizer, "auto")


def stop_ids_for(name: str, tokenizer, model, template: str, data_dir: Path) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token first, then the model's EOS ids."""
    if name in RUN_MODELS:
        end_of_turn = json.loads((data_dir / "report.json").read_text())["end_of_turn_token"]
        ids = [tokenizer.convert_tokens_to_ids(end_of_turn)]
    else:
        # The reference's own template may not mark generations; the marker template for its special
        # tokens names the end-of-turn token. It counts only if it is one added token (not a plain-text
        # piece of a template that does not fit this vocabulary) and the serving template uses it.
        candidate = end_of_turn_id(tokenizer, chat_template_for(tokenizer, "auto"))
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], chat_template=template,
                                                 tokenize=False)
        added = tokenizer.added_tokens_decoder
        ids = [candidate] if candidate in added and added[candidate].content in rendered else []
    eos = model.generation_config.eos_token_id
    for token in [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def load_for_eval(path: Path, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


# --------------------------------------------------------------------------- teacher-forced scoring


def render_ids(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prefix_diff_masks(tokenizer, template: str, messages: list[dict], stop_ids: list[int]) -> dict:
    """input_ids and assistant mask for a template without `{% generation %}` markers.

    The tokens a model must produce for an assistant turn are what rendering the conversation up to
    that turn adds to rendering it up to the previous turn plus the generation prompt, cut after the
    first stop token (what follows it, such as ChatML's newline, is template glue never generated).
    """
    full = render_ids(tokenizer, template, messages)
    mask = [0] * len(full)
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_ids(tokenizer, template, messages[:j], add_generation_prompt=True)
        upto = render_ids(tokenizer, template, messages[: j + 1])
        if upto[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise ValueError("the chat template does not render conversations prefix-consistently, so assistant "
                             "tokens cannot be located; give the model a template with {% generation %} markers")
        end = next((i + 1 for i in range(len(prompt), len(upto)) if upto[i] in stop_ids), len(upto))
        mask[len(prompt):end] = [1] * (end - len(prompt))
    return {"input_ids": full, "assistant_masks": mask}


def retokenize(tokenizer, template: str, rows: list[dict], stop_ids: list[int]) -> tuple[list[dict], str]:
    """Validation conversations re-tokenized for a model with its own template: (rows, how masks were found)."""
    conversations = [r["messages"] for r in rows]
    markers = chat_template_for(tokenizer, "auto")
    same = all(tokenizer.apply_chat_template(c, chat_template=template, tokenize=False)
               == tokenizer.apply_chat_template(c, chat_template=markers, tokenize=False) for c in conversations)
    if same:
        encoded = tokenizer.apply_chat_template(conversations, chat_template=markers, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        return [r | {"input_ids": ids, "assistant_masks": mask}
                for r, ids, mask in zip(rows, encoded["input_ids"], encoded["assistant_masks"])], "generation markers"
    # e.g. SmolLM2's template adds a default system prompt that the marker template does not.
    return [r | prefix_diff_masks(tokenizer, template, r["messages"], stop_ids) for r in rows], "prefix diff"


def token_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within max_tokens (one row always fits)."""
    batches, current, longest = [], [], 0
    for i, length in enumerate(lengths):
        if current and (len(current) == max_rows or max(longest, length) * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    return batches + [current] if current else batches


@torch.inference_mode()
def turn_nlls(model, rows: list[dict], pad_id: int, cfg: EvalConfig, desc: str = "score") -> list[list[tuple]]:
    """Per example, per assistant turn: (summed NLL in nats, trained tokens), teacher-forced."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    lengths = [len(rows[i]["input_ids"]) for i in order]
    results: list = [None] * len(rows)
    for batch in tqdm(token_batches(lengths, cfg.batch_size, cfg.score_batch_tokens), desc=desc, leave=False):
        chosen = [rows[order[i]] for i in batch]
        width = max(len(r["input_ids"]) for r in chosen)
        ids = torch.full((len(chosen), width), pad_id)
        attention = torch.zeros((len(chosen), width), dtype=torch.long)
        turn = torch.full((len(chosen), width), -1)
        for b, r in enumerate(chosen):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            attention[b, :n] = 1
            mask = torch.tensor(r["assistant_masks"], dtype=torch.long)
            starts = torch.cat([mask[:1], (mask[1:] > mask[:-1]).long()])
            turn[b, :n] = torch.where(mask.bool(), starts.cumsum(0) - 1, -1)
        # Only positions that predict a trained token need logits: with a 262k vocabulary the full
        # logits tensor would dominate memory, so ask the model for just those positions.
        keep = torch.nonzero((turn[:, 1:] >= 0).any(0)).flatten()
        if not len(keep):
            for i in batch:
                results[order[i]] = []
            continue
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits.float()
        targets, target_turn = ids[:, keep + 1], turn[:, keep + 1]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        for b, i in enumerate(batch):
            turns = int(target_turn[b].max()) + 1
            results[order[i]] = [(nll[b][target_turn[b] == t].sum().item(), int((target_turn[b] == t).sum()))
                                 for t in range(turns)]
    return results


def assistant_bytes(row: dict) -> list[int]:
    """UTF-8 bytes of each assistant turn's text: a tokenizer-independent unit for comparing models."""
    return [len(m["content"].strip().encode()) for m in row["messages"] if m["role"] == "assistant"]


def nll_summary(turns: list[list[tuple]], cfg: EvalConfig) -> dict:
    """Token-weighted mean NLL, perplexity and bits per byte, each with a bootstrap interval over examples.

    Perplexity per token is only comparable between models that share a tokenizer; bits per byte
    (total NLL over the UTF-8 bytes of the reference replies) is comparable across tokenizers.
    """
    nll = [sum(t[0] for t in example) for example in turns]
    tokens = [sum(t[1] for t in example) for example in turns]
    nbytes = [sum(t[2] for t in example) for example in turns]
    if not sum(tokens):
        return {"examples": len(turns), "tokens": 0}
    mean_nll = sum(nll) / sum(tokens)
    ci = metrics.bootstrap_interval(nll, tokens, cfg.bootstrap_resamples, seed=cfg.seed)
    bits = [x / math.log(2) for x in nll]
    bpb_ci = metrics.bootstrap_interval(bits, nbytes, cfg.bootstrap_resamples, seed=cfg.seed)
    return {
        "assistant_nll": mean_nll,
        "assistant_nll_ci95": ci,
        "perplexity": math.exp(mean_nll),
        "perplexity_ci95": [math.exp(ci[0]), math.exp(ci[1])],
        "bits_per_byte": sum(bits) / max(sum(nbytes), 1),
        "bits_per_byte_ci95": bpb_ci,
        "examples": len(turns),
        "tokens": sum(tokens),
    }


def teacher_forced(rows: list[dict], turns: list[list[tuple]], cfg: EvalConfig) -> dict:
    """Overall, by assistant turn (1 = first reply) and by conversation language."""
    with_bytes = [[(*t, b) for t, b in zip(example, assistant_bytes(row))] for row, example in zip(rows, turns)]
    depth = max((len(x) for x in with_bytes), default=0)
    by_turn = {str(k + 1): nll_summary([[x[k]] for x in with_bytes if len(x) > k], cfg) for k in range(depth)}
    languages = sorted({r.get("lang", "unknown") for r in rows})
    by_language = {lang: nll_summary([x for r, x in zip(rows, with_bytes) if r.get("lang", "unknown") == lang], cfg)
                   for lang in languages}
    return nll_summary(with_bytes, cfg) | {"by_turn": by_turn, "by_language": by_language}


# --------------------------------------------------------------------------- generation


def next_tokens(logits: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    # Plain temperature sampling: no top-k/top-p, so the temperature is the only knob.
    probabilities = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    return torch.multinomial(probabilities, 1).squeeze(-1)


@torch.inference_mode()
def decode_batch(model, ids: torch.Tensor, attention: torch.Tensor, stop_ids: list[int],
                 cfg: EvalConfig) -> list[list[int]]:
    """New tokens for each left-padded row, stop token included, decoded with the KV cache.

    Unlike `generate`, which keeps computing finished rows until the whole batch is done, a row
    leaves the batch (and the cache) as soon as it emits a stop token, so one long reply does not
    make every short one pay for its length.
    """
    # Left padding: positions count real tokens only, as `generate` computes them.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, live = out.past_key_values, torch.arange(len(ids))
    stops = torch.tensor(stop_ids)
    replies: list[list[int]] = [[] for _ in range(len(ids))]
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(out.logits[:, -1], cfg)
        for row, token in zip(live.tolist(), tokens.tolist()):
            replies[row].append(token)
        running = ~torch.isin(tokens, stops)
        if step == cfg.max_new_tokens - 1 or not running.any():
            break
        if not running.all():
            keep = running.nonzero().flatten()
            cache.batch_select_indices(keep)
            live, tokens, attention, positions = live[keep], tokens[keep], attention[keep], positions[keep]
        attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions, past_key_values=cache,
                    use_cache=True)
    return replies


@torch.inference_mode()
def generate_replies(model, tokenizer, conversations: list[list[dict]], stop_ids: list[int], cfg: EvalConfig,
                     desc: str = "generate") -> list[dict]:
    """Batched generation with left padding and the KV cache; replies come back in input order.

    Prompts are sorted by length so each batch pads little; the longest batch goes first, so the
    progress bar's estimate errs long and memory peaks at once rather than at the end.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    results: list = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention[b, width - len(prompts[i]):] = 1
            for i, row in zip(batch, decode_batch(model, ids, attention, stop_ids, cfg)):
                stopped = bool(row) and row[-1] in stop_ids
                kept = row[:-1] if stopped else row
                results[i] = {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                              "stopped": stopped, "new_tokens": len(kept)}
            bar.update(len(batch))
    return results


def read_prompt_file(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                prompt = json.loads(line)
                if not isinstance(prompt, str):
                    raise ValueError(f"{path}:{number}: expected a JSON string per line, got {type(prompt).__name__}")
                prompts.append(prompt)
    return prompts


def generation_items(cfg: EvalConfig, rows: list[dict]) -> list[dict]:
    """Showcase prompts first, then validation conversations (context up to the last reply) or the prompt file."""
    items = [{"source": "showcase", "messages": [{"role": "user", "content": p}], "reference": None}
             for p in cfg.showcase_prompts]
    if cfg.prompts:
        items += [{"source": Path(cfg.prompts).name, "messages": [{"role": "user", "content": p}], "reference": None}
                  for p in read_prompt_file(cfg.prompts)[: cfg.max_prompts]]
    else:
        items += [{"source": "validation", "messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]}
                  for r in rows[: cfg.max_prompts]]
    seen, unique = set(), []
    for item in items:
        key = json.dumps(item["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def generation_metrics(items: list[dict], replies: list[dict], cfg: EvalConfig) -> dict:
    texts = [r["text"] for r in replies]
    scored = [(r["text"], item["reference"]) for item, r in zip(items, replies) if item["reference"]]
    rouge = metrics.rouge_l([p for p, _ in scored], [ref for _, ref in scored])
    match, decided = metrics.language_match([item["messages"][-1]["content"] for item in items], texts)
    return {
        "prompts": len(replies),
        "stop_rate": metrics.stop_rate([r["stopped"] for r in replies]),
        "mean_new_tokens": metrics.mean([r["new_tokens"] for r in replies]),
        "mean_words": metrics.mean([len(metrics.words(t)) for t in texts]),
        "distinct_2": metrics.distinct_n(texts, 2),
        "loop_rate_4gram": metrics.loop_rate(texts, 4),
        "rouge_l": metrics.mean(rouge),
        "rouge_l_ci95": metrics.bootstrap_interval(rouge, resamples=cfg.bootstrap_resamples, seed=cfg.seed),
        "rouge_l_prompts": len(rouge),
        "language_match": match,
        "language_match_prompts": decided,
    }


# --------------------------------------------------------------------------- stage


def evaluate_model(name: str, path: Path, recipe: Recipe, rows: list[dict], items: list[dict]) -> tuple[dict, list]:
    cfg, data_dir = recipe.eval, recipe.out / "data"
    model, tokenizer = load_for_eval(path, compute_dtype("auto"))
    template = serving_template(name, tokenizer, data_dir)
    tokenizer.chat_template = template
    stops = stop_ids_for(name, tokenizer, model, template, data_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # base and tuned score exactly the tokens tuned was trained on; a reference re-renders the same turns.
    scored_rows, masking = (rows, "generation markers") if name in RUN_MODELS else \
        retokenize(tokenizer, template, rows, stops)
    start = time.perf_counter()
    result = teacher_forced(rows, turn_nlls(model, scored_rows, pad_id, cfg, desc=f"score {name}"), cfg)
    scoring_seconds = time.perf_counter() - start
    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, [item["messages"] for item in items], stops, cfg,
                               desc=f"generate {name}")
    generation_seconds = time.perf_counter() - start
    result |= generation_metrics(items, replies, cfg) | {
        "path": str(path),
        "template": "run template (OUT/data/chat_template.jinja)" if name in RUN_MODELS else "own tokenizer template",
        "nll_masking": masking,
        "stop_tokens": tokenizer.convert_ids_to_tokens(stops),
        "scoring_seconds": round(scoring_seconds, 2),
        "generation_seconds": round(generation_seconds, 2),
        "generated_tokens_per_second": round(sum(r["new_tokens"] for r in replies) / generation_seconds, 2),
    }
    del model
    gc.collect()
    return result, replies


def preference(cfg: EvalConfig, items: list[dict], replies: dict[str, list[dict]]) -> tuple[dict, list]:
    """Judge the tuned model (else the first) against every other model; (summary, per-prompt judgements)."""
    anchor = "tuned" if "tuned" in replies else next(iter(replies))
    summary = {"configured": bool(cfg.judge.base_url), "model": cfg.judge.model, "anchor": anchor, "vs": {}}
    if not cfg.judge.base_url:
        return summary, []
    records, conversations = [], [item["messages"] for item in items]
    for other in replies:
        if other == anchor:
            continue
        result = judge.compare(cfg.judge, conversations, [r["text"] for r in replies[anchor]],
                               [r["text"] for r in replies[other]], cfg.bootstrap_resamples, cfg.seed,
                               desc=f"judge {anchor} vs {other}")
        records += [{"anchor": anchor, "other": other, "prompt": i, **j}
                    for i, j in enumerate(result.pop("judgements"))]
        summary["vs"][other] = result
    return summary, records


def evaluate(recipe: Recipe, overwrite: bool = False) -> Path:
    cfg = recipe.eval
    data_dir, out = recipe.out / "data", recipe.out / "eval"
    paths = {name: model_path(name, recipe) for name in cfg.models}
    inputs = {"eval": dataclasses.asdict(cfg), "data": artifacts.upstream(data_dir),
              "models": {name: model_identity(name, p) for name, p in paths.items()}}
    if cfg.prompts:
        inputs["prompts"] = artifacts.fingerprint({"text": Path(cfg.prompts).read_text()})
    if artifacts.begin(out, inputs, overwrite):
        log.info("eval: reusing %s", out)
        return out
    rows = Dataset.from_parquet(str(data_dir / "validation.parquet")).to_list()
    items = generation_items(cfg, rows)
    results, replies = {}, {}
    default_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads or default_threads)
        for name, path in paths.items():
            results[name], replies[name] = evaluate_model(name, path, recipe, rows, items)
            log.info("eval %s: nll %.4f, stop rate %.2f, %d prompts", name,
                     results[name].get("assistant_nll", float("nan")), results[name]["stop_rate"], len(items))
    finally:
        torch.set_num_threads(default_threads)
    judged, judgements = preference(cfg, items, replies)
    results[judged["anchor"]]["judge"] = judged
    with open(out / "generations.jsonl", "w") as handle:
        for i, item in enumerate(items):
            handle.write(json.dumps(item | {name: replies[name][i] for name in replies}, ensure_ascii=False) + "\n")
    if judgements:
        with open(out / "judgements.jsonl", "w") as handle:
            handle.writelines(json.dumps(j, ensure_ascii=False) + "\n" for j in judgements)
    report.write_report(out, recipe, results, items, replies, recipe.out / "adapter" / "trainer_state.json")
    return artifacts.finish(out, "eval", inputs, recipe, results)
