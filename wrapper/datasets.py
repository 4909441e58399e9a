"""Datasets named by a recipe: the built-in identity set and user files (alpaca or sharegpt,
json or jsonl), checked and described so that render can write dataset_info.json."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from wrapper.paths import BUILTIN_DATASETS, TEMPLATES
from wrapper.recipe import RecipeError

IDENTITY_TEMPLATE = TEMPLATES / "identity.json.j2"
# lfw's own everyday questions with plain answers (English, Chinese): mixed in with the identity set,
# they keep the new name for questions about the model, not for "what is the capital of ...?"
GENERAL_FILE = TEMPLATES / "general.json"
_SYSTEM_DIRS = ("/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/lib", "/usr", "/var/lib", "/var/log")


@dataclass
class DatasetSpec:
    name: str                 # key in dataset_info.json
    source: str | None        # user file (absolute), None for a built-in set (identity, general)
    formatting: str           # alpaca | sharegpt
    messages_key: str | None  # sharegpt: "conversations" or "messages"
    tags: dict | None         # sharegpt role/content tag names
    n_samples: int
    est_tokens_max: int       # rough token count of the longest sample (utf-8 bytes / 3)
    est_tokens_mean: int

    @property
    def file_name(self) -> str:
        return f"{self.name}.json"


def _est_tokens(row) -> int:
    return len(json.dumps(row, ensure_ascii=False).encode()) // 3 + 24


def identity_rows() -> list[dict]:
    return json.loads(IDENTITY_TEMPLATE.read_text(encoding="utf-8"))


def general_rows() -> list[dict]:
    return json.loads(GENERAL_FILE.read_text(encoding="utf-8"))


BUILTIN_ROWS = {"identity": identity_rows, "general": general_rows}
assert set(BUILTIN_ROWS) == BUILTIN_DATASETS  # paths.py names them for the recipe schema


def resolve_datasets(names: list[str], recipe_dir: Path) -> list[DatasetSpec]:
    specs: list[DatasetSpec] = []
    used: set[str] = set()
    for entry in names:
        if entry in BUILTIN_ROWS:
            rows = BUILTIN_ROWS[entry]()
            lens = [_est_tokens(r) + 8 for r in rows]
            specs.append(DatasetSpec(entry, None, "alpaca", None, None, len(rows), max(lens), sum(lens) // len(lens)))
            used.add(entry)
            continue
        path = _safe_path(entry, recipe_dir)
        rows = _read_rows(path, entry)
        fmt, key, tags = _detect_format(rows, entry)
        name = _unique(re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_") or "data", used)
        used.add(name)
        lens = [_est_tokens(r) for r in rows]
        specs.append(DatasetSpec(name, str(path), fmt, key, tags, len(rows), max(lens), sum(lens) // len(lens)))
    return specs


def _unique(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    i = 2
    while f"{name}_{i}" in used:
        i += 1
    return f"{name}_{i}"


def _safe_path(entry: str, recipe_dir: Path) -> Path:
    if "\x00" in entry:
        raise RecipeError(f"datasets: {entry!r}: not a valid path")
    raw = Path(entry).expanduser()
    if not raw.is_absolute() and ".." in raw.parts:
        raise RecipeError(f"datasets: {entry!r} climbs out of the recipe's folder with '..': use a path inside it or an absolute path")
    path = (raw if raw.is_absolute() else recipe_dir / raw).resolve()
    if any(str(path) == d or str(path).startswith(d + "/") for d in _SYSTEM_DIRS):
        raise RecipeError(f"datasets: {entry!r} points into a system folder ({path}); keep data in your project")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise RecipeError(f"datasets: {entry!r}: expected 'identity', 'general' or a .json/.jsonl file")
    if not path.is_file():
        raise RecipeError(f"datasets: {entry!r}: file not found ({path})")
    return path


def _read_rows(path: Path, entry: str) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"datasets: {entry!r}: not UTF-8 text") from None
    if not text.strip():
        raise RecipeError(f"datasets: {entry!r}: the file is empty")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"datasets: {entry!r}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(rows, list):
        raise RecipeError(f"datasets: {entry!r}: expected a JSON list of samples")
    if not rows:
        raise RecipeError(f"datasets: {entry!r}: contains no samples")
    return rows


def _row_format(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        return "alpaca"
    for key, role, content in (("conversations", "from", "value"), ("messages", "role", "content")):
        turns = row.get(key)
        if isinstance(turns, list) and turns and all(
            isinstance(t, dict) and isinstance(t.get(role), str) and isinstance(t.get(content), str) for t in turns
        ):
            return f"sharegpt:{key}"
    return None


def _detect_format(rows: list, entry: str) -> tuple[str, str | None, dict | None]:
    kinds = set()
    for i, row in enumerate(rows):
        kind = _row_format(row)
        if kind is None:
            raise RecipeError(
                f"datasets: {entry!r}: sample {i} is neither alpaca (instruction, output) "
                "nor sharegpt (conversations/messages with from/value or role/content)"
            )
        kinds.add(kind)
    if len(kinds) > 1:
        raise RecipeError(f"datasets: {entry!r}: mixes formats ({', '.join(sorted(kinds))}); use one per file")
    kind = kinds.pop()
    if kind == "alpaca":
        return "alpaca", None, None
    key = kind.split(":")[1]
    if key == "messages":
        tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool"}
    else:
        tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                "assistant_tag": "gpt", "system_tag": "system", "observation_tag": "observation"}
    return "sharegpt", key, tags
