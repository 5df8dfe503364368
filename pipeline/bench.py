"""Training throughput: TRL's defaults against the recipe's configuration, in one process.

    python -m pipeline bench --recipe recipes/small.yaml [--steps N] [--random-init]
    python -m pipeline bench --recipe recipes/small-gpu.yaml --data .bench/train.parquet \\
        --model-config .bench/config.json --steps 20        # no tokenizer, no weights: random init

Both configurations train the same model (LoRA from the recipe) on the same pre-tokenized data for the
same number of optimizer steps, one after the other in this process:

1. `trl-defaults`: `SFTConfig()` as TRL ships it (gradient checkpointing, no packing, 8 padded sequences
   per device, max_length 1024, bf16 autocast where available) with the model loaded by TRL from a path
   (float32 weights). The `assistant_masks` column still applies, so the loss is the same objective.
2. `recipe`: what `pipeline.train` builds for the recipe (packing, dtype, attention, LM head, threads).

For each: real (non-pad) tokens per second after `--warmup` steps, MFU and peak memory. MFU counts
useful FLOPs per token, F = 4 N_body + 4 d V rho + 3 A + 6 N_lora (frozen non-embedding linears forward
and input-gradient; the LM head on the fraction rho of positions in the loss; attention forward A per
token, causal within each document and sliding window; LoRA forward and both gradients), divided by a
matmul peak: measured here on CPU (in the dtype the configuration multiplies in, with its threads), the
H100 dense bf16 peak (989 TFLOP/s) on CUDA. Peak memory is CUDA's max allocated, or on CPU the peak RSS
above what the process held before the configuration was built. The last line is

    ratio=<recipe/baseline tokens/s> tokens_per_s=<recipe> baseline_tokens_per_s=<baseline> mfu=<recipe MFU>
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipeline import speed, train
from pipeline.config import Recipe, load_recipe
from pipeline.data import chat_template_for

log = logging.getLogger(__name__)

H100_BF16_DENSE = 989e12  # FLOP/s, dense (no sparsity), SXM
TRAIN_COLUMNS = train.TRAIN_COLUMNS


@dataclasses.dataclass
class Result:
    name: str
    describe: str
    tokens_per_s: float
    mfu: float
    peak: float
    peak_label: str
    memory_gib: float
    memory_label: str
    loss: float
    steps: int
    tokens: int
    seconds: float
    threads: int


# --------------------------------------------------------------------------- inputs


def prepare_model(recipe: Recipe, args, work: Path) -> tuple[Path, object]:
    """A model directory that `from_pretrained` reads, and a tokenizer for the trainer's pad id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = recipe.out / "base"
    if args.model_config or args.random_init:
        source = Path(args.model_config) if args.model_config else base / "config.json"
        if not source.exists():
            raise FileNotFoundError(f"{source}: no model config (run import-base, or pass --model-config)")
        config = AutoConfig.from_pretrained(source.parent if source.is_file() else source)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model_dir = work / "model"
        model.save_pretrained(model_dir)  # speed does not depend on the weights; the loading path is train's
        del model
    else:
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"{base}: run import-base first, or pass --random-init / --model-config")
        model_dir = base
    tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").exists() else base
    if (tokenizer_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        # The data is tokenized already: the trainer only needs a pad id, which is masked out anyway.
        from pipeline.import_base import byte_tokenizer

        tokenizer = byte_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The data stage's template: it names the turn tokens that train beside the adapters.
    tokenizer.chat_template = chat_template_for(tokenizer, recipe.data.chat_template)
    if not (model_dir / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(model_dir)  # TRL loads the baseline's tokenizer next to its weights
    return model_dir, tokenizer


def load_data(recipe: Recipe, args):
    from datasets import Dataset

    path = Path(args.data) if args.data else recipe.out / "data" / "train.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run the data stage first, or pass --data <parquet with {TRAIN_COLUMNS}>")
    return Dataset.from_parquet(str(path)).select_columns(TRAIN_COLUMNS)


# --------------------------------------------------------------------------- the two configurations


def baseline_trainer(model_dir: Path, data, tokenizer, recipe: Recipe, steps: int, out: Path):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=not torch.cuda.is_available(), seed=recipe.train.seed)
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=train.lora_config(recipe.train, tokenizer))
    model = trainer.model.get_base_model()
    train.expose_head_bias(model)
    describe = (f"TRL defaults: {args.per_device_train_batch_size} padded sequences per step, max_length "
                f"{args.max_length}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
                f"{dtype_name(model.dtype)} weights{' + bf16 autocast' if args.bf16 else ''}, "
                f"attention {model.config._attn_implementation}, TRL fused LM head")
    return trainer, describe


def recipe_trainer(model_dir: Path, data, tokenizer, recipe: Recipe, steps: int, out: Path):
    """The trainer `pipeline.train.train` builds, with bench-only step count, logging and no saving."""
    from trl import SFTTrainer

    cfg = recipe.train
    dtype = train.compute_dtype(cfg.dtype)
    args = train.sft_config(cfg, recipe, out, world_size=1, dtype=dtype)
    args = dataclasses.replace(args, max_steps=steps, logging_steps=1, save_strategy="no")
    model = train.load_model(model_dir, dtype, train.attention_implementation(cfg.attn_implementation, "",
                                                                              cfg.packing))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=train.lora_config(cfg, tokenizer))
    train.use_fast_paths(trainer, cfg)
    micro, accumulation = train.batch_layout(cfg, 1)
    layout = (f"packed rows of {recipe.data.max_length} tokens, {micro} per micro-step x {accumulation}"
              if cfg.packing else f"{micro} padded sequences per micro-step x {accumulation}")
    describe = (f"recipe {recipe.name}: {layout}, gradient checkpointing "
                f"{'on' if cfg.gradient_checkpointing else 'off'}, {dtype_name(dtype)} weights"
                f"{' + bf16 autocast' if args.bf16 else ''}, attention {model.config._attn_implementation}, "
                f"LM head {train.lm_head_choice(cfg)}")
    return trainer, describe


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- measuring


class BatchStats:
    """Wraps the trainer's collator: real tokens, loss positions and document lengths of every batch."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(1).tolist()
        elif "cu_seq_lens_q" in batch:
            lengths = batch["cu_seq_lens_q"].diff().tolist()
        else:
            lengths = [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
        self.batches.append({"tokens": int(sum(lengths)), "lengths": [int(n) for n in lengths if n > 0],
                             "loss_positions": int((batch["labels"][:, 1:] != -100).sum())})
        return batch


def step_marks():
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        """(time, batches collated so far) at the end of every optimizer step."""

        def __init__(self):
            self.marks: list[tuple[float, int]] = []
            self.stats: BatchStats | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), len(self.stats.batches)))

    return Marks()


class PeakMemory:
    """CUDA max allocated, or the peak RSS of this process above its level at start (sampled)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process = psutil.Process()
            self.start = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
            self.start = 0
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def gib(self) -> float:
        return (self.peak - self.start) / 2**30

    @property
    def label(self) -> str:
        return "CUDA max allocated" if self.cuda else "CPU max RSS delta"


def matmul_peak(dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s the MFU is relative to: the H100 bf16 dense peak on CUDA, a measured matmul rate on CPU."""
    if torch.cuda.is_available():
        return H100_BF16_DENSE, "H100 bf16 dense peak 989 TFLOP/s"
    n, best = 2048, float("inf")
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    peak = 2 * n**3 / best
    return peak, (f"measured {dtype_name(dtype)} {n}^3 matmul, {torch.get_num_threads()} thread(s): "
                  f"{peak / 1e9:.1f} GFLOP/s")


def flop_terms(trainer) -> dict:
    """Per-token and per-document FLOP coefficients of the model being trained."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    # PEFT's trainable-token wrapper holds the real head inside it; counted there it would pass for a body layer.
    head = getattr(head, "original_module", head)
    n_body = sum(m.weight.numel() for name, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = base.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    windows = [window if t == "sliding_attention" and window else None for t in layer_types]
    return {"n_body": n_body, "n_lora": n_lora, "d": head.weight.shape[1], "vocab": head.weight.shape[0],
            "attn": 4 * heads * head_dim, "windows": windows}


def attended_keys(length: int, window: int | None) -> int:
    """Keys all queries of a causal document attend to, within a sliding window if any."""
    if window is None or length <= window:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def useful_flops(batches: list[dict], terms: dict) -> float:
    total = 0.0
    for b in batches:
        attention = sum(terms["attn"] * attended_keys(n, w) for n in b["lengths"] for w in terms["windows"])
        total += (b["tokens"] * (4 * terms["n_body"] + 6 * terms["n_lora"])
                  + b["loss_positions"] * 4 * terms["d"] * terms["vocab"] + 3 * attention)
    return total


def measure(name: str, build, model_dir, data, tokenizer, recipe, steps: int, warmup: int, threads: int,
            work: Path) -> Result:
    torch.set_num_threads(threads)
    out = work / name
    with PeakMemory() as memory:
        trainer, describe = build(model_dir, data, tokenizer, recipe, steps, out)
        threads = torch.get_num_threads()  # the recipe may set its own (train.threads)
        print(f"[{name}] {describe}", flush=True)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for quiet in (PrinterCallback, ProgressCallback):  # per-step log lines; the figures are printed below
            trainer.remove_callback(quiet)
        stats = BatchStats(trainer.data_collator)
        trainer.data_collator = stats
        marks = step_marks()
        marks.stats = stats
        trainer.add_callback(marks)
        trainer.train()
    compute = torch.bfloat16 if (trainer.args.bf16 or trainer.model.dtype == torch.bfloat16) else torch.float32
    peak, peak_label = matmul_peak(compute)
    (t0, n0), (t1, n1) = marks.marks[warmup - 1], marks.marks[-1]  # the clock starts at a step's end
    measured = stats.batches[n0:n1]
    seconds = t1 - t0
    tokens = sum(b["tokens"] for b in measured)
    flops = useful_flops(measured, flop_terms(trainer))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = Result(name=name, describe=describe, tokens_per_s=tokens / seconds, mfu=flops / seconds / peak,
                    peak=peak, peak_label=peak_label, memory_gib=memory.gib, memory_label=memory.label,
                    loss=sum(losses) / max(1, len(losses)), steps=len(marks.marks) - warmup, tokens=tokens,
                    seconds=seconds, threads=threads)
    rho = sum(b["loss_positions"] for b in measured) / max(1, tokens)
    print(f"[{name}] {result.steps} steps after {warmup} warm-up: {tokens} real tokens in {seconds:.1f}s = "
          f"{result.tokens_per_s:.1f} tokens/s; MFU {100 * result.mfu:.1f}% of {peak_label} "
          f"(rho={rho:.2f}); peak memory {result.memory_gib:.2f} GiB ({memory.label}); "
          f"mean loss {result.loss:.4f}; {threads} thread(s)", flush=True)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the figures")
    parser.add_argument("--random-init", action="store_true", help="random weights from the base's config.json")
    parser.add_argument("--model-config", help="config.json to build a random model from (no base needed)")
    parser.add_argument("--data", help="pre-tokenized parquet (input_ids, assistant_masks); default OUT/data")
    parser.add_argument("--skip-baseline", action="store_true", help="measure the recipe alone (no ratio)")
    parser.add_argument("--same-threads", action="store_true",
                        help="run the baseline with the recipe's thread count instead of torch's default")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args, overrides = parser.parse_known_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps (the clock starts when the warm-up steps end)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, overrides)
    default_threads = torch.get_num_threads()
    # Decided once, before anything runs here, so that the baseline's own load does not count.
    recipe.train.threads = speed.resolve_threads(recipe.train.threads)
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    try:
        model_dir, tokenizer = prepare_model(recipe, args, work)
        data = load_data(recipe, args)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        print(f"bench: {device}; model {json.loads((model_dir / 'config.json').read_text())['architectures'][0]}"
              f"{' (random init)' if args.random_init or args.model_config else ''}; data {len(data)} examples, "
              f"{sum(len(x) for x in data['input_ids'])} tokens; {args.steps} steps each, {args.warmup} warm-up",
              flush=True)
        common = dict(model_dir=model_dir, data=data, tokenizer=tokenizer, recipe=recipe, steps=args.steps,
                      warmup=args.warmup, work=work)
        baseline = None
        if not args.skip_baseline:
            baseline = measure("trl-defaults", baseline_trainer,
                               threads=recipe.train.threads if args.same_threads else default_threads, **common)
        result = measure("recipe", recipe_trainer, threads=recipe.train.threads, **common)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base_tps = baseline.tokens_per_s if baseline else float("nan")
    print(f"ratio={result.tokens_per_s / base_tps:.2f} tokens_per_s={result.tokens_per_s:.1f} "
          f"baseline_tokens_per_s={base_tps:.1f} mfu={result.mfu:.3f}", flush=True)


if __name__ == "__main__":
    main()
