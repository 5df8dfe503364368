from pathlib import Path

import pytest

from pipeline.config import Recipe, RecipeError, TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
PIPELINE_RECIPES = [p for p in RECIPES if "accelerate" not in p.relative_to(ROOT / "recipes").parts]
ACCELERATE_CONFIGS = [p for p in RECIPES if p not in PIPELINE_RECIPES]


def test_recipes_are_found():
    assert {p.stem for p in PIPELINE_RECIPES} >= {"tiny", "small"}


@pytest.mark.parametrize("path", PIPELINE_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem
    assert recipe.out == Path("runs") / path.stem


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).compute_environment


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_top_level_key_raises(tmp_path):
    with pytest.raises(RecipeError, match="unknown key.*'trian'"):
        load_recipe(write(tmp_path, "trian: {lora_r: 8}\n"))


def test_unknown_nested_key_raises(tmp_path):
    with pytest.raises(RecipeError, match=r"\.train: unknown key.*'lora_rank'"):
        load_recipe(write(tmp_path, "train: {lora_rank: 8}\n"))


def test_wrong_type_raises(tmp_path):
    with pytest.raises(RecipeError, match="train.lora_r: expected int"):
        load_recipe(write(tmp_path, "train: {lora_r: eight}\n"))


def test_defaults_come_from_the_dataclasses(tmp_path):
    recipe = load_recipe(write(tmp_path, "train: {lora_r: 4}\n"))
    assert recipe.train.lora_r == 4
    assert recipe.train.lora_alpha == TrainConfig().lora_alpha
    assert recipe.train.learning_rate == TrainConfig().learning_rate


def test_cli_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "train: {lora_r: 4}\n")
    recipe = load_recipe(path, ["--train.lora_r=8", "--train.learning_rate=1e-3", "--data.languages=[en, de]",
                                "--out_dir=/tmp/x"])
    assert (recipe.train.lora_r, recipe.train.learning_rate) == (8, 1e-3)
    assert recipe.data.languages == ["en", "de"]
    assert recipe.out == Path("/tmp/x")
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(path, ["--train.nope=1"])
    with pytest.raises(RecipeError, match="expected --section.key=value"):
        load_recipe(path, ["--train.lora_r"])
