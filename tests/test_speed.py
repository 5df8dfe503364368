"""The training fast paths (pipeline/speed.py) compute what the plain paths compute, and the bench runs."""

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline import speed
from pipeline.config import load_recipe
from pipeline.data import build_data
from pipeline.import_base import import_base
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())["base"]["random_config"]


def tiny_model(attn: str, seed: int = 0):
    speed.register_packed_attention()
    config = AutoConfig.for_model(**TINY, vocab_size=262, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def packed_inputs(docs: list[torch.Tensor]) -> dict:
    """What TRL's padding-free collator hands the model: one row, restarted positions, boundaries."""
    lengths = torch.tensor([len(d) for d in docs])
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return {"input_ids": torch.cat(docs)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}


def test_packed_batch_gives_each_document_the_logits_it_has_alone():
    # 300 > the sliding window (128): the per-document path must apply the window too.
    torch.manual_seed(1)
    docs = [torch.randint(6, 262, (n,)) for n in (7, 300, 1, 45)]
    packed, plain = tiny_model(speed.PACKED_ATTENTION), tiny_model("sdpa")
    with torch.no_grad():
        logits = packed(**packed_inputs(docs), use_cache=False).logits[0]
        alone = [plain(input_ids=d[None], use_cache=False).logits[0] for d in docs]
        # transformers' own packed path (a block-diagonal mask from the restarted position_ids; training
        # runs without a cache, which would turn the detection off) agrees as well
        dense = plain(**{k: v for k, v in packed_inputs(docs).items() if not k.startswith(("cu_", "max_"))},
                      use_cache=False).logits[0]
    torch.testing.assert_close(logits, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=1e-5)


def test_packed_attention_falls_back_to_sdpa_for_padded_batches():
    ids = torch.randint(6, 262, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        a = tiny_model(speed.PACKED_ATTENTION)(input_ids=ids, attention_mask=mask).logits
        b = tiny_model("sdpa")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_compact_cross_entropy_matches_log_softmax_and_its_gradient(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight, targets = torch.randn(300, 16, dtype=torch.float64), torch.randint(0, 300, (50,))
    log_probs, entropy, is_top1 = speed.CompactLinearCrossEntropy.apply(hidden, weight, targets, softcap, 7)
    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = logits.log_softmax(-1)
    expected = reference.gather(1, targets[:, None]).squeeze(1)
    # The logits are accumulated in fp32, whatever the input dtype.
    torch.testing.assert_close(log_probs.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), -(reference.exp() * reference).sum(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    weights = torch.randn(50, dtype=torch.float64)
    (grad,) = torch.autograd.grad((log_probs * weights).sum(), hidden)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), hidden)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_compact_cross_entropy_trains_the_rows_peft_trains_in_place(softcap):
    """`trainable_token_indices` rows (a base model's unseen turn tokens): the head uses their trained values
    and returns their gradient, the rest of the head stays frozen."""
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight, targets = torch.randn(300, 16, dtype=torch.float64), torch.randint(0, 300, (50,))
    rows = torch.tensor([5, 299, 17])
    targets[:10] = 299  # some positions whose target is a trained row, the rest only see it in the softmax
    values = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    log_probs, _, _ = speed.CompactLinearCrossEntropy.apply(hidden, weight, targets, softcap, 7, rows, values)
    logits = hidden @ weight.index_copy(0, rows, values).T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs.double(), expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(50, dtype=torch.float64)
    grads = torch.autograd.grad((log_probs * weights).sum(), (hidden, values))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (hidden, values))
    assert expected_grads[1].abs().min() > 0
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_mfu_counts_the_lm_head_once_when_turn_tokens_train():
    """PEFT wraps a tied head for `trainable_token_indices`; its inner Linear is still the head, not body."""
    from peft import LoraConfig, get_peft_model

    from pipeline import bench

    terms = []
    for tokens in (None, [4, 5]):
        lora = LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=tokens, task_type="CAUSAL_LM")
        terms.append(bench.flop_terms(types.SimpleNamespace(model=get_peft_model(tiny_model("sdpa"), lora))))
    plain, with_tokens = terms
    assert with_tokens["n_body"] == plain["n_body"] and with_tokens["vocab"] == plain["vocab"] == 262
    assert with_tokens["n_lora"] == plain["n_lora"] + 2 * plain["d"]


# --------------------------------------------------------------------------- real training runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`tiny` base and data, built once; each training run gets its own directory beside them."""
    root = tmp_path_factory.mktemp("speed")
    recipe = load_recipe("recipes/tiny.yaml", [f"--out_dir={root / 'src'}", f"--data.cache_dir={root / 'cache'}"])
    import_base(recipe)
    build_data(recipe)
    return root


def losses(root: Path, name: str, *overrides) -> list[float]:
    out = root / name
    if (out / "adapter" / "COMPLETE").exists():
        history = json.loads((out / "adapter" / "trainer_state.json").read_text())["log_history"]
        return [e["loss"] for e in history if "loss" in e]
    for stage in ("base", "data"):
        shutil.copytree(root / "src" / stage, out / stage, dirs_exist_ok=True)
    # One packed row of up to 2048 tokens per step keeps 50 steps to seconds.
    recipe = load_recipe("recipes/tiny.yaml", [f"--out_dir={out}", "--train.max_steps=50", "--train.logging_steps=1",
                                               "--train.batch_size=1", "--train.micro_batch_size=1",
                                               "--train.threads=1", *overrides])
    adapter = train(recipe)
    history = json.loads((adapter / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e]


PLAIN = ["--train.attn_implementation=sdpa", "--train.lm_head=trl", "--train.dtype=float32"]


@pytest.mark.slow
def test_loss_curve_of_the_fast_paths_matches_the_plain_paths(tiny_run):
    """50 steps, same data order and seed. fp32 on both sides: the fast attention and LM head change
    only the order of floating-point sums, so every step's loss agrees to 1e-5 relative (observed
    2e-7 on the 2-core dev machine)."""
    plain = losses(tiny_run, "plain", *PLAIN)
    fast = losses(tiny_run, "fast", "--train.dtype=float32")  # attn_implementation and lm_head: auto
    assert len(plain) == len(fast) == 50
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)
    assert fast[-1] < fast[0] - 0.2  # and it learns


@pytest.mark.slow
@pytest.mark.skipif(not speed.native_cpu_bf16() and not torch.cuda.is_available(), reason="bf16 is not the default")
def test_loss_curve_in_bf16_stays_close_to_fp32(tiny_run):
    """The recipe default where bf16 is native: bf16 weights and autocast. Each step's loss stays
    within 1e-3 relative of the fp32 plain path over 50 steps (observed 4e-5)."""
    plain = losses(tiny_run, "plain", *PLAIN)  # reused from the test above when it ran
    fast = losses(tiny_run, "fast16")  # every fast path, dtype auto = bfloat16
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_bench_last_line_on_tiny(tiny_run, tmp_path):
    last = r"ratio=\d+\.\d+ tokens_per_s=\d+\.\d+ baseline_tokens_per_s=\d+\.\d+ mfu=\d+\.\d+"
    result = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--recipe", "recipes/tiny.yaml",
                             f"--out_dir={tiny_run / 'src'}", "--steps", "2"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert re.fullmatch(last, result.stdout.strip().splitlines()[-1])
    assert "[trl-defaults]" in result.stdout and "[recipe]" in result.stdout
    # What a GPU box gets: pre-tokenized data and a config.json, no tokenizer and no weights.
    shutil.copy(tiny_run / "src" / "data" / "train.parquet", tmp_path / "train.parquet")
    shutil.copy(tiny_run / "src" / "base" / "config.json", tmp_path / "config.json")
    result = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--recipe", "recipes/tiny.yaml",
                             f"--out_dir={tmp_path / 'none'}", "--data", str(tmp_path / "train.parquet"),
                             "--model-config", str(tmp_path / "config.json"), "--steps", "2", "--skip-baseline"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert re.fullmatch(r"ratio=nan tokens_per_s=\d+\.\d+ baseline_tokens_per_s=nan mfu=\d+\.\d+",
                        result.stdout.strip().splitlines()[-1])
