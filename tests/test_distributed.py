"""Training under `accelerate launch`: the shipped configs, clear launch errors, and a real
two-process (gloo, CPU) run of `tiny` that must train exactly like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from pipeline.config import TrainConfig, load_recipe
from pipeline.data import chat_template_for, extract_threads, load_trees, tokenize_parallel, tokenize_threads
from pipeline.import_base import byte_tokenizer
from pipeline.train import batch_layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# Short and dropout-free: both runs then see the same numbers, and the only difference left is
# the order in which floats are summed (micro batches of 4 in one process, 2 + 2 across two).
# fp32: `train.dtype: auto` is bf16 on CPUs with AVX512-BF16, where summation order shows at 1e-3.
OVERRIDES = ["--train.max_steps=3", "--train.lora_dropout=0", "--train.dtype=float32", "--eval.max_prompts=1",
             "--eval.max_new_tokens=4"]
# Observed: max |difference| 6e-8 on adapter weights of magnitude ~0.1 after 3 steps.
ATOL, RTOL = 1e-5, 1e-4


def launch(config: str, *args: str, launch_args: tuple = (), env: dict | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/<config>.yaml -m pipeline <args>` from the repo."""
    env = os.environ | {"PYTHONPATH": str(REPO)} | (env or {})
    return subprocess.run([str(ACCELERATE), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
                           *launch_args, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """The whole pipeline under a two-process launch, every Python-level write under OUT audited."""
    root = tmp_path_factory.mktemp("two_processes")
    out, audit = root / "run", root / "audit"
    audit.mkdir()
    result = launch("cpu-2proc", "sft", "--recipe", "recipes/tiny.yaml", f"--out_dir={out}", *OVERRIDES,
                    env={"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "audit")]),
                         "AUDIT_WRITES_UNDER": str(out), "AUDIT_WRITES_LOG": str(audit)})
    assert result.returncode == 0, result.stderr[-4000:]
    writes = {}
    for path in audit.glob("*.json"):
        writes.setdefault(path.name.split("-")[0], []).extend(json.loads(path.read_text())["writes"])
    return {"out": out, "writes": writes, "log": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same recipe and seed in this one process, with the same global batch."""
    from pipeline.data import build_data
    from pipeline.import_base import import_base
    from pipeline.train import train

    out = tmp_path_factory.mktemp("one_process") / "run"
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"--out_dir={out}", *OVERRIDES])
    import_base(recipe)
    build_data(recipe)
    train(recipe)
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(two_processes, one_process):
    two, one = (json.loads((run / "adapter" / "metrics.json").read_text()) for run in (two_processes["out"], one_process))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["global_batch"] == one["global_batch"] == 4
    assert (two["per_device_batch"], two["gradient_accumulation"]) == (2, 1)
    assert (one["per_device_batch"], one["gradient_accumulation"]) == (4, 1)
    assert two["steps"] == one["steps"] == 3
    a = load_file(two_processes["out"] / "adapter" / "adapter_model.safetensors")
    b = load_file(one_process / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=name)
    # Training moved the adapters (LoRA B starts at zero), so the agreement is not trivial.
    assert all(a[name].abs().max() > 1e-4 for name in a if "lora_B" in name)
    # Same examples in each global batch: the logged losses agree step by step.
    losses = [[e["loss"] for e in json.loads((run / "adapter" / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for run in (two_processes["out"], one_process)]
    assert losses[0] and losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.slow
def test_only_rank_zero_writes(two_processes):
    writes, out = two_processes["writes"], two_processes["out"]
    assert set(writes) == {"launcher", "0", "1"}, writes.keys()
    assert writes["1"] == [] and writes["launcher"] == []
    written = {Path(path).relative_to(out).as_posix() for _, path in writes["0"]}
    # Rank 0 built every stage (the audit sees its writes), merge and eval included, once.
    for stage in ("base", "data", "adapter", "merged", "eval"):
        assert f"{stage}/provenance.json" in written and (out / stage / "COMPLETE").exists()
    log = two_processes["log"]
    assert [line.split(" -> ")[0] for line in log.splitlines() if " -> " in line and line.startswith("[")] == \
        ["[import-base]", "[data]", "[train]", "[merge]", "[eval]"]


@pytest.mark.slow
def test_logs_name_processes_and_global_batch(two_processes):
    assert "2 process(es) x 2 sequences x 1 accumulation steps = global batch 4" in two_processes["log"]


def test_accelerate_configs_are_complete_and_lora_ready():
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert {"single-gpu", "multi-gpu", "fsdp", "deepspeed-zero3", "cpu-2proc"} <= names
    for path in CONFIGS.glob("*.yaml"):
        config = load_config_from_file(str(path))
        assert config.mixed_precision == "no", f"{path.name}: precision belongs to the recipe (train.dtype)"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_use_orig_params"] and not fsdp["fsdp_cpu_ram_efficient_loading"]
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    cpu = load_config_from_file(str(CONFIGS / "cpu-2proc.yaml"))
    assert cpu.use_cpu and cpu.num_processes == 2


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("batch_size, micro", [(8, 8), (8, 4), (16, 4), (24, 16), (64, 8)])
def test_batch_layout_keeps_the_global_batch(batch_size, micro, world):
    cfg = TrainConfig(batch_size=batch_size, micro_batch_size=micro)
    if batch_size % world:
        pytest.skip("covered by the error test")
    per_device, accumulation = batch_layout(cfg, world)
    assert per_device * accumulation * world == batch_size
    assert 1 <= per_device <= micro


def test_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size=8 .* not divisible by the 3 processes"):
        batch_layout(TrainConfig(batch_size=8), 3)


@pytest.mark.slow
def test_launch_that_cannot_split_the_global_batch_fails_before_any_stage(tmp_path):
    result = launch("cpu-2proc", "sft", "--recipe", "recipes/tiny.yaml", f"--out_dir={tmp_path}",
                    "--train.batch_size=3", timeout=300)
    assert result.returncode != 0
    assert "train.batch_size=3 (the global batch) is not divisible by the 2 processes" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(bool(__import__("importlib").util.find_spec("deepspeed")), reason="DeepSpeed is installed")
def test_deepspeed_config_without_deepspeed_is_a_clear_error():
    result = launch("deepspeed-zero3", "train", "--recipe", "recipes/tiny.yaml", timeout=120)
    assert result.returncode != 0
    assert "DeepSpeed is not installed" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_fsdp_on_cpu_is_a_clear_error(tmp_path):
    result = launch("fsdp", "train", "--recipe", "recipes/tiny.yaml", f"--out_dir={tmp_path}",
                    launch_args=("--num_processes", "1"), timeout=300)
    assert result.returncode != 0
    assert "LaunchError: this accelerate config uses FSDP" in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may run before the launch is refused"


def test_parallel_tokenization_matches_one_process():
    tokenizer = byte_tokenizer()
    template = chat_template_for(tokenizer, "gemma")
    skipped = []
    trees, _, _ = load_trees(str(REPO / "data" / "house_chats.trees.jsonl"), skipped)
    threads = extract_threads(trees, load_recipe(REPO / "recipes" / "tiny.yaml").data, skipped)
    one, two = [], []  # the skipped/trimmed entries, in order
    rows = tokenize_threads(threads, tokenizer, template, 1024, one)
    assert tokenize_parallel(threads, tokenizer, template, 1024, two, num_proc=2) == rows
    assert one == two and rows
