"""Batched generation and teacher-forced scoring on tiny random models (fp32), against plain per-example runs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.config import EvalConfig, load_recipe
from pipeline.data import chat_template_for
from pipeline.evaluate import generate_replies, prefix_diff_masks, retokenize, turn_nlls
from pipeline.import_base import byte_tokenizer

GEMMA = (chat_template_for.__globals__["TEMPLATES"] / "gemma.jinja").read_text()
# SmolLM2-135M-Instruct's own template: no generation markers and a default system prompt.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Why is the sky blue? Explain it in detail, please."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "¿Qué hora es?"}],
    [{"role": "user", "content": "A much longer prompt " * 12}],
]


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` recipe's random Gemma-3-style model (sliding + full attention) and byte tokenizer, fp32."""
    random_config = load_recipe("recipes/tiny.yaml").base.random_config
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = GEMMA
    config = AutoConfig.for_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **random_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tokenizer


def one_at_a_time(model, tokenizer, conversation, stop_ids, max_new_tokens):
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
    return output[0, encoded["input_ids"].shape[1]:].tolist()


def test_batched_greedy_generation_equals_unbatched(tiny):
    model, tokenizer = tiny
    stop_ids = [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    cfg = EvalConfig(max_new_tokens=12, batch_size=3)  # 5 prompts -> a batch of 3 and one of 2, both left-padded
    replies = generate_replies(model, tokenizer, CONVERSATIONS, stop_ids, cfg)
    for conversation, reply in zip(CONVERSATIONS, replies):
        expected = one_at_a_time(model, tokenizer, conversation, stop_ids, 12)
        assert reply["new_tokens"] == len(expected) == 12
        assert reply["text"] == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert not reply["stopped"]


def test_generation_stops_at_a_stop_token_per_row(tiny):
    model, tokenizer = tiny
    # Make the token the second prompt's greedy reply emits at step 4 a stop token: that row must stop there,
    # exactly as one-prompt-at-a-time generation does, while the other rows run to the budget.
    free = one_at_a_time(model, tokenizer, CONVERSATIONS[1], [tokenizer.eos_token_id], 12)
    stop = free[4]
    expected = [one_at_a_time(model, tokenizer, c, [stop], 12) for c in CONVERSATIONS]
    replies = generate_replies(model, tokenizer, CONVERSATIONS, [stop], EvalConfig(max_new_tokens=12, batch_size=5))
    assert replies[1]["stopped"] and replies[1]["new_tokens"] == free.index(stop)
    for reply, tokens in zip(replies, expected):
        kept = tokens[: tokens.index(stop)] if stop in tokens else tokens
        assert (reply["stopped"], reply["new_tokens"]) == (stop in tokens, len(kept))


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    cfg = EvalConfig(max_new_tokens=8, batch_size=5, do_sample=True, temperature=1.0, seed=7)
    first = generate_replies(model, tokenizer, CONVERSATIONS, [tokenizer.eos_token_id], cfg)
    again = generate_replies(model, tokenizer, CONVERSATIONS, [tokenizer.eos_token_id], cfg)
    greedy = generate_replies(model, tokenizer, CONVERSATIONS, [tokenizer.eos_token_id],
                              EvalConfig(max_new_tokens=8, batch_size=5))
    assert first == again
    assert first != greedy


def test_turn_nlls_match_unpadded_per_example_loss(tiny):
    model, tokenizer = tiny
    conversations = [c + [{"role": "assistant", "content": f"Reply number {i}" * (i + 1)}]
                     for i, c in enumerate(CONVERSATIONS)]
    encoded = tokenizer.apply_chat_template(conversations, chat_template=GEMMA, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    rows = [{"input_ids": ids, "assistant_masks": mask}
            for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"])]
    # A small token budget forces several right-padded batches of mixed lengths.
    scores = turn_nlls(model, rows, tokenizer.pad_token_id, EvalConfig(batch_size=4, score_batch_tokens=400))
    for row, conversation, turns in zip(rows, conversations, scores):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.where(torch.tensor([row["assistant_masks"]]).bool(), ids, -100)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        expected = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        assert len(turns) == sum(m["role"] == "assistant" for m in conversation)
        assert sum(t[0] for t in turns) == pytest.approx(expected, rel=1e-4)
        assert sum(t[1] for t in turns) == sum(row["assistant_masks"])


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def test_prefix_diff_masks_equal_generation_marker_masks(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    markers = chat_template_for(tokenizer, "chatml")
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    conversation = CONVERSATIONS[2] + [{"role": "assistant", "content": "Green, or red."}]
    expected = tokenizer.apply_chat_template(conversation, chat_template=markers, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    found = prefix_diff_masks(tokenizer, markers, conversation, stop)
    assert found["input_ids"] == expected["input_ids"]
    assert found["assistant_masks"] == expected["assistant_masks"]


def test_reference_template_with_system_prompt_is_masked_by_prefix_diff(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    rows = [{"messages": CONVERSATIONS[2] + [{"role": "assistant", "content": "Green."}]}]
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    (row,), how = retokenize(tokenizer, SMOLLM2, rows, stop)
    assert how == "prefix diff"
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI")
    trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
    # both assistant turns with their end-of-turn token, not the newline after it
    assert tokenizer.decode(trained) == "Blue.<|im_end|>Green.<|im_end|>"

    (same,), how = retokenize(tokenizer, chat_template_for(tokenizer, "chatml"), rows, stop)
    assert how == "generation markers"
    assert tokenizer.decode([t for t, m in zip(same["input_ids"], same["assistant_masks"]) if m]) == \
        "Blue.<|im_end|>Green.<|im_end|>"
