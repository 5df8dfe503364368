"""Every YAML file under recipes/ loads with the loader it is written for."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from pipeline.config import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipes/accelerate/ holds `accelerate launch --config_file` configs, not pipeline recipes.
ACCELERATE_CONFIGS = RECIPES / "accelerate"


def is_accelerate_config(path: Path) -> bool:
    return ACCELERATE_CONFIGS in path.parents


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_loads(path):
    if is_accelerate_config(path):
        assert load_config_from_file(str(path)).num_processes >= 1
    else:
        assert load_recipe(path).name == path.stem
