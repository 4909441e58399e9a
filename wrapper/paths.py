"""Where lfw's own data lives (templates, recipes) and where it writes (runs, cache)."""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    # In a wheel, templates/ and recipes/ are packaged as wrapper/_data/<name>;
    # in a source checkout (editable install) they sit beside wrapper/.
    for candidate in (_HERE / "_data" / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lfw's {name}/ folder is missing: reinstall lfw")


TEMPLATES = _data_dir("templates")
RECIPES = _data_dir("recipes")
LF_KEYS_FILE = TEMPLATES / "llamafactory_keys.json"
BUILTIN_DATASETS = {"identity", "general"}
DEFAULT_RECIPE = RECIPES / "demo.yaml"


def runs_root() -> Path:
    """runs/ under the current directory, or LFW_RUNS."""
    return Path(os.environ.get("LFW_RUNS", "runs")).absolute()


def cache_root() -> Path:
    """Model cache: LFW_CACHE, else ~/.cache/lfw."""
    return Path(os.environ.get("LFW_CACHE", Path.home() / ".cache" / "lfw")).expanduser().absolute()
