"""Stage 3: LoRA adapters trained with TRL's SFTTrainer on the tokenized splits."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from pipeline import artifacts, checkpoints, distributed, speed
from pipeline.config import Recipe, TrainConfig

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["input_ids", "assistant_masks"]


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are emulated on CPUs without AVX-512 BF16 (or AMX), so fp32 is faster there; with
        # them bf16 runs ~2.5x the fp32 matmul rate (bench.py).
        return torch.bfloat16 if torch.cuda.is_available() or speed.native_cpu_bf16() else torch.float32
    return getattr(torch, name)


def attention_implementation(choice: str, model_type: str, packing: bool = False) -> str:
    if choice == speed.PACKED_ATTENTION:
        return speed.register_packed_attention()
    if choice != "auto":
        return choice
    # Architectures whose attention sdpa cannot express (Gemma 2's logit soft-capping, attention
    # sinks) declare `_supports_sdpa = False` and get eager.
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    # sdpa handles Gemma 3's sliding windows. Packed (padding-free) batches get per-document attention
    # instead of sdpa over one dense block-diagonal mask: flash-attention's varlen kernel where it is
    # installed (CUDA), else speed.py's per-document sdpa.
    if packing:
        return "flash_attention_2" if speed.flash_attention_available() else speed.register_packed_attention()
    return "sdpa"


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro batch, gradient accumulation) that make up the recipe's global batch.

    The micro batch is the largest divisor of the per-process share that fits micro_batch_size, so
    a recipe trains on the same global batch whatever the number of processes.
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} (the global batch) is not divisible by the "
                         f"{world_size} processes of this launch; use a multiple of {world_size}")
    share = cfg.batch_size // world_size
    micro = max(d for d in range(1, min(cfg.micro_batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


def load_split(data_dir: Path, split: str) -> Dataset:
    return Dataset.from_parquet(str(data_dir / f"{split}.parquet")).select_columns(TRAIN_COLUMNS)


def trainable_token_ids(cfg: TrainConfig, tokenizer) -> list[int]:
    """Ids of the tokens `train.trainable_tokens` names; `tokenizer` carries the training chat template."""
    if cfg.trainable_tokens == "template":
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        # BOS is written as a variable and trained as every row's first input; pad never reaches the loss.
        names = [t.content for t in tokenizer.added_tokens_decoder.values()
                 if t.special and t.content in template and t.content not in (tokenizer.bos_token, tokenizer.pad_token)]
    elif isinstance(cfg.trainable_tokens, list):
        names = cfg.trainable_tokens
    else:
        raise ValueError(f"train.trainable_tokens={cfg.trainable_tokens!r}: expected `template` or a list of tokens")
    vocab = tokenizer.get_vocab()
    unknown = [name for name in names if name not in vocab]
    if unknown:
        raise ValueError(f"train.trainable_tokens: {unknown} are not tokens of this tokenizer")
    return sorted({vocab[name] for name in names})


def lora_config(cfg: TrainConfig, tokenizer) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM",
                      trainable_token_indices=trainable_token_ids(cfg, tokenizer) or None)


def use_fast_paths(trainer: SFTTrainer, cfg: TrainConfig) -> None:
    """The LM head (`train.lm_head`) and CPU threads (`train.threads`) the recipe asks for; see speed.py.

    TRL scores every position with its fused LM head on devices without Triton, in (4096 x 32768)
    fp32 tiles it recomputes in backward; the compact head scores only the loss positions and is
    2-4x faster on CPU and a fraction of the memory. On CUDA TRL's Triton head already compacts.
    """
    torch.set_num_threads(speed.resolve_threads(cfg.threads))
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    expose_head_bias(model)
    head = lm_head_choice(cfg)
    if head == "compact":
        if not speed.add_compact_lm_head(model):
            log.warning("train.lm_head=compact does not cover this model (logit scale, bias or trainable head); "
                        "keeping TRL's fused head")
    elif head != "trl":
        raise ValueError(f"train.lm_head={cfg.lm_head!r}: expected auto, compact or trl")


def lm_head_choice(cfg: TrainConfig) -> str:
    return cfg.lm_head if cfg.lm_head != "auto" else ("trl" if torch.cuda.is_available() else "compact")


def expose_head_bias(model) -> None:
    """Let TRL's fused head read `lm_head.bias` through PEFT's trainable-token wrapper.

    With `trainable_token_indices` on a tied model PEFT wraps the LM head in a `TrainableTokensWrapper`, which
    forwards `.weight` (with the trained rows) but not `.bias`; TRL 1.16 reads both (peft 0.21.2).
    """
    head = model.get_output_embeddings()
    if hasattr(head, "token_adapter") and "bias" not in vars(head) and getattr(head.original_module, "bias", None) is None:
        head.bias = None


def load_model(path: Path, dtype: torch.dtype, attn: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def sft_config(cfg: TrainConfig, recipe: Recipe, output_dir: Path, world_size: int, dtype: torch.dtype) -> SFTConfig:
    micro, accumulation = batch_layout(cfg, world_size)
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        packing=cfg.packing,
        packing_strategy="bfd",
        max_length=recipe.data.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        # Exact resume: skip the batches already trained and restore the RNG states (the default, pinned here).
        ignore_data_skip=False,
        # Log a NaN/inf loss as it is (the default replaces it with an average), so StopOnNonFinite sees it.
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataset_num_proc=recipe.data.num_proc if recipe.data.num_proc > 1 else None,
        use_cpu=not torch.cuda.is_available(),
        # Every LoRA weight takes part in every forward; DDP's search for unused ones (its default
        # for a PEFT model) is an extra autograd traversal per step.
        ddp_find_unused_parameters=False,
    )


def train(recipe: Recipe, overwrite: bool = False) -> Path:
    cfg = recipe.train
    base_dir, data_dir, out = recipe.out / "base", recipe.out / "data", recipe.out / "adapter"
    # `resume` says how to get there, not what is trained, so it is not part of the fingerprint.
    inputs = {"train": dataclasses.asdict(cfg) | {"resume": None}, "max_length": recipe.data.max_length,
              "base": artifacts.upstream(base_dir), "data": artifacts.upstream(data_dir)}
    if distributed.begin(out, inputs, overwrite, keep_partial=cfg.resume):
        log.info("train: reusing %s", out)
        return out
    dtype = compute_dtype(cfg.dtype)
    group = distributed.state()
    if group.is_main_process:
        checkpoints.check_same_run(out / "checkpoints", inputs, cfg.resume)
    # Before the model is loaded: under ZeRO-3 from_pretrained partitions the weights only once
    # SFTConfig has registered the DeepSpeed config.
    args = sft_config(cfg, recipe, out / "checkpoints", world_size=group.num_processes, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = (data_dir / "chat_template.jinja").read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_type = AutoConfig.from_pretrained(base_dir).model_type
    model = load_model(base_dir, dtype, attention_implementation(cfg.attn_implementation, model_type, cfg.packing))
    train_set = load_split(data_dir, "train")
    lora = lora_config(cfg, tokenizer)
    if group.is_main_process:
        log.info("train: %d process(es) x %d sequences x %d accumulation steps = global batch %d",
                 group.num_processes, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                 cfg.batch_size)
    interrupt = checkpoints.Interrupt()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                         peft_config=lora, callbacks=reliability_callbacks(interrupt))
    use_fast_paths(trainer, cfg)
    # Counted before training wraps (FSDP) or partitions (ZeRO-3) the parameters.
    trainable = trainer.model.get_nb_trainable_parameters()[0]
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_point(out, group) if cfg.resume else None)
    seconds = time.perf_counter() - start
    stop_if_interrupted(trainer, interrupt, out)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training loss is not finite: {losses[-5:]}")
    # Every process calls save_model (FSDP and ZeRO-3 gather the shards); only the main one writes.
    trainer.save_model(str(out))
    if not group.is_main_process:
        return out
    # save_model also pickles the TrainingArguments; recipe.yaml and provenance record the run.
    (out / "training_args.bin").unlink(missing_ok=True)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    # Checkpoints only serve a resume; a finished stage keeps the final adapter alone.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    trained_tokens = int(sum(sum(m) for m in train_set["assistant_masks"]))
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0],
        "last_logged_loss": losses[-1],
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen or None,
        "trained_tokens_per_epoch": trained_tokens,
        "trainable_parameters": trainable,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "global_batch": cfg.batch_size,
        "processes": group.num_processes,
        "per_device_batch": args.per_device_train_batch_size,
        "gradient_accumulation": args.gradient_accumulation_steps,
    }
    return artifacts.finish(out, "train", inputs, recipe, metrics)


def resume_point(out: Path, group) -> str | None:
    """The newest complete checkpoint; the main process cleans partial ones up while the others wait."""
    with group.main_process_first():
        if group.is_main_process:
            return checkpoints.resume_point(out / "checkpoints")
    return checkpoints.resume_point(out / "checkpoints")


def reliability_callbacks(interrupt: checkpoints.Interrupt) -> list:
    """Checkpoint-and-stop on SIGTERM/SIGINT, completeness markers, and a stop on non-finite loss."""
    return [interrupt, checkpoints.MarkComplete(), checkpoints.StopOnNonFinite()]


def stop_if_interrupted(trainer, interrupt: checkpoints.Interrupt, out: Path) -> None:
    """A run stopped by a signal leaves its checkpoint and no COMPLETE marker on the stage."""
    if interrupt.received is not None and trainer.state.global_step < trainer.state.max_steps:
        raise checkpoints.TrainingInterrupted(
            f"training interrupted by {signal.Signals(interrupt.received).name} at step "
            f"{trainer.state.global_step} of {trainer.state.max_steps}; checkpoint saved under "
            f"{out / 'checkpoints'}; rerun with --train.resume=true to continue", interrupt.received)
