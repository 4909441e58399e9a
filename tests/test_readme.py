"""Keep the README from rotting: its recipe table matches the schema, and every `lfw ...` and
`make ...` command it shows exists."""

from __future__ import annotations

import re

from conftest import ROOT
from wrapper.cli import COMMANDS
from wrapper.recipe import recipe_table

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_recipe_table_matches_schema():
    table = README.split("<!-- recipe-table:start -->\n")[1].split("\n<!-- recipe-table:end -->")[0]
    assert table == recipe_table(), "regenerate with: python -m wrapper.recipe"


def test_every_lfw_command_in_readme_exists():
    used = set(re.findall(r"`lfw ([a-z][a-z-]+)", README)) | set(re.findall(r"^\$ lfw ([a-z][a-z-]+)", README, re.M))
    assert used, "no lfw commands found"
    assert used <= set(COMMANDS), used - set(COMMANDS)


def test_every_lfw_command_is_in_the_readme_table():
    rows = set(re.findall(r"^\| `lfw ([a-z][a-z-]+)", README, re.M))
    assert set(COMMANDS) <= rows, set(COMMANDS) - rows


def test_every_make_target_in_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    used = set(re.findall(r"`make ([a-z-]+)", README)) | set(re.findall(r"^make ([a-z-]+)", README, re.M))
    assert {"finetune", "test"} <= used
    assert used <= targets, used - targets


def test_readme_recipes_exist():
    for name in re.findall(r"recipes/([\w.-]+\.yaml)", README):
        assert (ROOT / "recipes" / name).is_file(), name
