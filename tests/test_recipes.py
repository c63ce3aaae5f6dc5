"""YAML recipes: nested aliases ("billion laughs") are refused quickly with a short error, and no
error message prints a whole value."""

from __future__ import annotations

import time

import pytest

from vitkit.cli.main import main
from vitkit.errors import ConfigError
from vitkit.train.config import TrainConfig, read_config_file


def _laughs(levels: int, key: str = "dim") -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"{key}: *a{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 30])
def test_billion_laughs_recipe_gives_a_short_error_quickly(tmp_path, capsys, levels):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_laughs(levels))
    assert recipe.stat().st_size < 2000
    t0 = time.monotonic()
    assert main(["train", "--config", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 5
    assert "expands to more than" in err and "bomb.yaml" in err and len(err) < 400, err[:500]


def test_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("a: &a [*a]\nepochs: 1\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        read_config_file(recipe)


def test_ordinary_recipe_with_an_alias_still_loads(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("base: &lr 0.001\nlr: *lr\nbetas: [0.9, 0.95]\n")
    assert read_config_file(recipe) == {"base": 0.001, "lr": 0.001, "betas": [0.9, 0.95]}


@pytest.mark.parametrize("field,value", [("dim", list(range(200_000))), ("dataset", "x" * 100_000),
                                         ("betas", [[0] * 100_000] * 3), ("out", {"k": "v" * 100_000})])
def test_coercion_errors_never_print_a_whole_value(field, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert len(str(e.value)) < 300 and field in str(e.value), str(e.value)[:400]
