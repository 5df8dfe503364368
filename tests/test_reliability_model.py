"""Training-correctness properties on tiny random models with the in-process byte tokenizer.

Each test asserts real values and, where it makes sense, a negative control showing the check
would fail if the property broke.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from pipeline.config import BaseConfig, TrainConfig, load_recipe
from pipeline.data import end_of_turn_id, tokenize_threads
from pipeline.import_base import byte_tokenizer, random_model
from pipeline.train import attention_implementation, trainable_token_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import ROOT, sentence  # noqa: E402

TEMPLATES = {name: (ROOT / f"pipeline/templates/{name}.jinja").read_text() for name in ("gemma", "chatml")}
TINY = load_recipe(ROOT / "recipes/tiny.yaml").base


def tiny_model(attn: str = "sdpa", seed: int = 0, dtype=torch.float32):
    tokenizer = byte_tokenizer()
    model = random_model(BaseConfig(source="random", random_config=TINY.random_config, seed=seed), tokenizer)
    model.config._attn_implementation = attn  # noqa: SLF001 -- the switch transformers itself uses
    return model.to(dtype).eval(), tokenizer


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.choice([1, 2])
        out.append([m for _ in range(turns) for m in ({"role": "user", "content": sentence(rng, 1, 6)},
                                                         {"role": "assistant", "content": sentence(rng, 1, 10)})])
    return out


def tokenized(tokenizer, template: str, n: int, seed: int = 0, max_length: int = 512) -> list[dict]:
    threads = [{"tree_id": str(i), "messages": m} for i, m in enumerate(conversations(n, seed))]
    return tokenize_threads(threads, tokenizer, template, max_length, [])


def sft_trainer(model, tokenizer, rows, tmp_path, **overrides):
    tokenizer.chat_template = TEMPLATES["gemma"]
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, packing=False,
                max_length=512, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True,
                bf16=False)  # TRL's default is bf16 autocast, also on CPU; the pipeline sets it from train.dtype
    args.update(overrides)
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "assistant_masks")} for r in rows])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tokenizer,
                      peft_config=lora)


# --------------------------------------------------------------------------- end of turn


def eos_is_end_of_turn_tokenizer():
    """Like instruction-tuned Gemma/Qwen tokenizers: eos is the end-of-turn token and pad == eos."""
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = "<end_of_turn>"
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_end_of_turn_is_the_last_trained_label(tmp_path, packing, pad_is_eos):
    tokenizer = eos_is_end_of_turn_tokenizer() if pad_is_eos else byte_tokenizer()
    eot = end_of_turn_id(tokenizer, TEMPLATES["gemma"])
    assert eot == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert (tokenizer.pad_token_id == eot) == pad_is_eos
    rows = tokenized(tokenizer, TEMPLATES["gemma"], 6)
    model, _ = tiny_model()
    trainer = sft_trainer(model, tokenizer, rows, tmp_path, packing=packing, packing_strategy="bfd",
                          per_device_train_batch_size=6)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    labels, ids = batch["labels"], batch["input_ids"]
    # Split rows back into sequences: by position_ids restarts when packed, else one row each.
    sequences = []
    for r in range(labels.shape[0]):
        starts = ((batch["position_ids"][r] == 0).nonzero().flatten().tolist() if "position_ids" in batch
                  else [0])
        bounds = starts + [labels.shape[1]]
        sequences += [(labels[r, a:b], ids[r, a:b]) for a, b in zip(bounds, bounds[1:])]
    assert len(sequences) >= 6
    ends = 0
    for seq_labels, seq_ids in sequences:
        trained = (seq_labels != -100).nonzero().flatten()
        if len(trained) == 0:
            continue  # trailing padding
        assert seq_labels[trained[-1]].item() == eot
        # Every assistant span ends on a trained end-of-turn token, not only the last one.
        spans_end = [i for i in trained.tolist() if i + 1 == len(seq_labels) or seq_labels[i + 1] == -100]
        assert all(seq_labels[i].item() == eot for i in spans_end)
        ends += len(spans_end)
    assert ends >= 6
    # Negative control: the classic "mask every pad id" collator bug drops exactly these tokens when pad == eos.
    naive = labels.clone()
    naive[ids == tokenizer.pad_token_id] = -100
    assert (naive == eot).any() != pad_is_eos


# --------------------------------------------------------------------------- prompt prefix


def prompt_is_prefix(tokenizer, template: str, messages: list[dict]) -> bool:
    prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                         return_dict=True)["input_ids"]
    return full[: len(prompt)] == prompt and len(full) > len(prompt)


@pytest.mark.parametrize("name", ["gemma", "chatml"])
def test_prompt_tokens_are_a_prefix_of_prompt_plus_answer(name):
    tokenizer = byte_tokenizer()
    for messages in conversations(20, seed=1) + [[{"role": "user", "content": "  padded  "},
                                                  {"role": "assistant", "content": "\nreply\n"}]]:
        assert prompt_is_prefix(tokenizer, TEMPLATES[name], messages), messages
    # Negative control: a generation prompt that differs from the rendered turn header is caught.
    broken = TEMPLATES["gemma"].replace("{{- '<start_of_turn>model\\n' -}}\n{%- endif -%}",
                                        "{{- '<start_of_turn>model ' -}}\n{%- endif -%}")
    assert broken != TEMPLATES["gemma"]
    assert not prompt_is_prefix(tokenizer, broken, conversations(1)[0])


# --------------------------------------------------------------------------- gradient accumulation


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    tokenizer = byte_tokenizer()
    rows = tokenized(tokenizer, TEMPLATES["gemma"], 8, seed=3)
    trained = sorted(sum(r["assistant_masks"]) for r in rows)
    assert trained[-1] > 2 * trained[0]  # variable length, so per-micro-batch means would weigh rows unequally
    results = {}
    for micro, accumulation in ((4, 1), (1, 4)):
        model, tok = tiny_model()
        # SGD: the update is proportional to the gradient (Adam's first step is not), so a wrong loss scale shows.
        trainer = sft_trainer(model, tok, rows, tmp_path / f"{micro}", per_device_train_batch_size=micro,
                              gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                              max_grad_norm=0.0, max_steps=2)
        start = lora_state(trainer.model)
        trainer.train()
        results[micro] = lora_state(trainer.model)
    # fp32 on CPU: the layouts differ only by summation order. (Under TRL's default bf16 autocast they differ by
    # ~3e-3, padding rounding, which is why the helper sets bf16=False as the pipeline does on CPU.)
    delta = {n: results[1][n] - start[n] for n in start}
    reference = {n: results[4][n] - start[n] for n in start}
    gap = torch.cat([(delta[n] - reference[n]).flatten() for n in start]).norm()
    size = torch.cat([reference[n].flatten() for n in start]).norm()
    assert size > 0 and gap / size < 1e-5, f"relative update gap {gap / size:.2e}"


def test_negative_control_naive_micro_batch_mean_differs():
    """Averaging per-micro-batch means (what breaks without num_items_in_batch) gives another gradient."""
    tokenizer = byte_tokenizer()
    rows = tokenized(tokenizer, TEMPLATES["gemma"], 4, seed=3)
    model, _ = tiny_model()
    weight = model.get_input_embeddings().weight

    def grad(loss):
        model.zero_grad()
        loss.backward()
        return weight.grad.clone()

    def token_losses(row):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.where(torch.tensor([row["assistant_masks"]]) == 1, ids, -100)
        logits = model(input_ids=ids).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")

    total = sum(sum(r["assistant_masks"][1:]) for r in rows)
    exact = grad(sum(token_losses(r) for r in rows) / total)
    naive = grad(sum(token_losses(r) / sum(r["assistant_masks"][1:]) for r in rows) / len(rows))
    assert (exact - naive).norm() / exact.norm() > 5e-2


# --------------------------------------------------------------------------- packing isolation


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_sees_only_itself(attn):
    """Padding-free packing: no attention mask, position_ids restarting at 0 per document; transformers then
    builds a block-diagonal mask. use_cache=False as in training (TRL sets it): with a KV cache present,
    transformers does not look for packed sequences."""
    model, tokenizer = tiny_model(attn)
    a = tokenizer("First document, about the sky.")["input_ids"]
    b = tokenizer("Second one, about rivers and seas.")["input_ids"]
    packed_ids = torch.tensor([a + b])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        restarted = torch.tensor([list(range(len(a))) + list(range(len(b)))])
        packed = model(input_ids=packed_ids, position_ids=restarted, use_cache=False).logits[0, len(a):]
        continued = model(input_ids=packed_ids, position_ids=torch.arange(len(a) + len(b))[None],
                          use_cache=False).logits[0, len(a):]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Negative control: without restarted positions, document A leaks into B.
    assert (continued - alone).abs().max() > 1e-3


def test_trl_packed_loss_equals_separate_documents(tmp_path):
    """Through TRL's packing (bfd, padding-free collator, compute_loss): the loss of a packed row is the
    token-weighted loss of its documents computed one by one."""
    tokenizer = byte_tokenizer()
    rows = tokenized(tokenizer, TEMPLATES["gemma"], 6)
    model, _ = tiny_model()
    trainer = sft_trainer(model, tokenizer, rows, tmp_path, packing=True, packing_strategy="bfd")
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    assert "attention_mask" not in batch or bool(batch["attention_mask"].all())
    lengths = row["seq_lengths"]
    assert len(lengths) >= 2  # really packed
    assert [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] == [
        sum(lengths[:k]) for k in range(len(lengths))]
    trainer.model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(trainer.model, dict(batch)).item()
        total, count, offset = 0.0, 0, 0
        for length in lengths:
            ids = batch["input_ids"][:, offset:offset + length]
            labels = batch["labels"][:, offset:offset + length]
            n = int((labels[:, 1:] != -100).sum())
            total += trainer.model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
            offset += length
        # Negative control: the same packed row with positions running on across documents.
        leaked = dict(batch) | {"position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        leaked_loss = trainer.compute_loss(trainer.model, leaked).item()
    assert packed == pytest.approx(total / count, rel=1e-5)
    assert abs(leaked_loss - packed) > 1e-4


# --------------------------------------------------------------------------- LoRA trains only LoRA


def test_lora_trains_only_lora(tmp_path):
    tokenizer = byte_tokenizer()
    rows = tokenized(tokenizer, TEMPLATES["gemma"], 8)
    model, _ = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = sft_trainer(model, tokenizer, rows, tmp_path, max_steps=3, learning_rate=1e-2)
    before = lora_state(trainer.model)
    trainer.train()
    after = lora_state(trainer.model)
    assert before and set(before) == set(after)
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"{name} did not change"
    peft_model = trainer.model
    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(param, base[original]), f"base weight {original} changed"
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(after)


# --------------------------------------------------------------------------- merge


# Tolerances on logits of magnitude ~0.6: fp32 merges agree to ~1e-6 (limit 1e-5); bf16 merged weights round each
# product to 8 mantissa bits, measured 0.011-0.024 over three seeds (limit 0.05).
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_merge_equivalence(dtype, atol):
    model, tokenizer = tiny_model(dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    adapted = get_peft_model(model, lora).eval()
    ids = torch.tensor([tokenizer("Merge check: the sky is blue because")["input_ids"]])
    with torch.no_grad():
        reference = adapted(input_ids=ids).logits.float()  # fp32 adapter model
        merged = adapted.to(dtype).merge_and_unload().eval()
        out = merged(input_ids=ids).logits.float()
    scale = reference.abs().max().item()
    gap = (out - reference).abs().max().item()
    assert gap <= atol * max(scale, 1.0), f"{dtype}: merged logits off by {gap} (scale {scale})"
    assert scale > 0.1  # not trivially zero logits
    changed = [n for n, p in merged.named_parameters() if n in base and not torch.equal(p.float(), base[n])]
    assert any("proj" in n for n in changed)  # merged weights differ from the base's
    assert not any("lora_" in n for n, _ in merged.named_parameters())


# --------------------------------------------------------------------------- generation


def test_batched_greedy_generation_equals_unbatched():
    model, tokenizer = tiny_model("sdpa")
    tokenizer.padding_side = "left"
    prompts = [[{"role": "user", "content": c}] for c in ("Hi", "Why is the sky blue in the day?", "Tell me.")]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def encode(batch):
        return tokenizer.apply_chat_template(batch, chat_template=TEMPLATES["gemma"], add_generation_prompt=True,
                                             tokenize=True, return_dict=True, padding=True, return_tensors="pt")

    with torch.no_grad():
        batch = encode(prompts)
        batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
        for i, prompt in enumerate(prompts):
            single = encode([prompt])
            alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1]:]
            assert batched[i].tolist() == alone.tolist(), i
    assert batch["attention_mask"].min() == 0  # the batch really was padded


# --------------------------------------------------------------------------- attention implementation


def test_eager_and_sdpa_agree_on_a_padded_batch():
    texts = ["short", "a considerably longer piece of text to force padding"]
    outputs = {}
    for attn in ("eager", "sdpa"):
        model, tokenizer = tiny_model(attn)
        tokenizer.padding_side = "right"
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            outputs[attn] = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert not mask.all()
    torch.testing.assert_close(outputs["sdpa"][mask], outputs["eager"][mask], rtol=1e-4, atol=1e-5)


def test_attention_implementation_is_supported_per_architecture():
    assert attention_implementation("auto", "gemma3_text") == "sdpa"
    assert attention_implementation("auto", "llama") == "sdpa"
    # Gemma 2 soft-caps attention logits, which sdpa cannot: eager.
    assert attention_implementation("auto", "gemma2") == "eager"
    assert attention_implementation("eager", "gemma3_text") == "eager"  # an explicit choice wins
    for model_type in ("gemma3_text", "gemma2", "llama", "qwen2"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        import transformers

        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        chosen = attention_implementation("auto", model_type)
        assert chosen == "eager" or cls._supports_sdpa


def test_trainable_tokens_are_the_special_tokens_written_in_the_template():
    tokenizer = byte_tokenizer()  # <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>, then bytes
    tokenizer.chat_template = TEMPLATES["gemma"]
    assert trainable_token_ids(TrainConfig(), tokenizer) == [4, 5]  # not <bos>, which every row trains as input
    tokenizer.chat_template = TEMPLATES["chatml"]  # its markers are not tokens of this tokenizer: nothing to train
    assert trainable_token_ids(TrainConfig(), tokenizer) == []
    assert trainable_token_ids(TrainConfig(trainable_tokens=["<end_of_turn>"]), tokenizer) == [5]
    assert trainable_token_ids(TrainConfig(trainable_tokens=[]), tokenizer) == []
    with pytest.raises(ValueError, match="not tokens of this tokenizer"):
        trainable_token_ids(TrainConfig(trainable_tokens=["<|im_end|>"]), tokenizer)
