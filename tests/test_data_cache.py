"""The data stage's content-addressed cache: reused across run directories, invalidated by what matters."""

import json
import shutil

import pytest

from pipeline.config import load_recipe
from pipeline.data import build_data
from pipeline.import_base import import_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A completed `tiny` base stage (random weights, byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("cache-base")
    recipe = load_recipe("recipes/tiny.yaml", [f"--out_dir={root / 'run'}", f"--base.cache_dir={root / 'models'}"])
    return import_base(recipe)


def build(tmp_path, base, run: str, *overrides, base_dir=None):
    out = tmp_path / run
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "base").exists():
        shutil.copytree(base_dir or base, out / "base")
    recipe = load_recipe("recipes/tiny.yaml", [f"--out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}",
                                               *overrides])
    data = build_data(recipe)
    return data, json.loads((data / "metrics.json").read_text())


def test_second_build_elsewhere_is_a_cache_hit_with_the_same_files(tmp_path, base):
    first, report = build(tmp_path, base, "a")
    assert report["cache_hit"] is False
    again, hit = build(tmp_path, base, "b", "--data.num_proc=2")  # num_proc does not change the output
    assert hit["cache_hit"] is True
    for name in ("train.parquet", "validation.parquet", "chat_template.jinja", "quarantine.jsonl"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
        assert (again / name).stat().st_ino == (first / name).stat().st_ino, name  # linked, not copied
    assert {k: v for k, v in hit.items() if k not in ("cache_hit", "seconds")} == \
           {k: v for k, v in report.items() if k not in ("cache_hit", "seconds")}
    assert "SFT data built for `tiny`" in (again / "README.md").read_text()
    # The run directory is self-describing as before: provenance records the data settings, not the cache.
    assert "cache_dir" not in json.loads((again / "provenance.json").read_text())["inputs"]["data"]


@pytest.mark.parametrize("change", ["setting", "template", "tokenizer", "source"])
def test_cache_is_invalidated_by_settings_template_tokenizer_and_source(tmp_path, base, change):
    _, first = build(tmp_path, base, "a")
    assert first["cache_hit"] is False
    overrides, base_dir = [], None
    if change == "setting":
        overrides = ["--data.max_length=1536"]
    elif change == "template":
        overrides = ["--data.chat_template=chatml"]
    elif change == "tokenizer":
        base_dir = tmp_path / "other-base"
        shutil.copytree(base, base_dir)
        config = json.loads((base_dir / "tokenizer_config.json").read_text())
        config["model_max_length"] = 4096  # any byte of any tokenizer file
        (base_dir / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        source = tmp_path / "chats.trees.jsonl"
        lines = open("data/house_chats.trees.jsonl").read().splitlines()
        source.write_text("\n".join(lines[:-1]) + "\n")
        overrides = [f"--data.source={source}"]
    _, second = build(tmp_path, base, "b", *overrides, base_dir=base_dir)
    assert second["cache_hit"] is False
    # ...and that new build is cached in turn.
    _, third = build(tmp_path, base, "c", *overrides, base_dir=base_dir)
    assert third["cache_hit"] is True


def test_empty_cache_dir_disables_the_cache(tmp_path, base):
    build(tmp_path, base, "a", "--data.cache_dir=")
    _, again = build(tmp_path, base, "b", "--data.cache_dir=")
    assert again["cache_hit"] is False
