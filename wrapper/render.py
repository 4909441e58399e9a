"""Stage 3: render. Jinja2 templates in templates/ turn a plan into the files LLaMA-Factory reads:
train.yaml, infer.yaml, export.yaml, data/identity.json and data/dataset_info.json.

User text is data, never template code: it reaches the templates only as variables, and every
value is written through `yaml_value` (YAML) or json.dumps (JSON), so any string round-trips.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from wrapper import datasets as ds
from wrapper.paths import TEMPLATES
from wrapper.plan import Plan

# Characters PyYAML's reader treats as line breaks or refuses; strings holding them are escaped.
_YAML_UNSAFE = {"\x85", "\u2028", "\u2029", "\ufeff"}


def yaml_value(value: Any) -> str:
    """One YAML flow scalar that loads back to exactly `value`; strings are always double-quoted."""
    if isinstance(value, str):
        unsafe = any(c in _YAML_UNSAFE or (ord(c) < 32 and c not in "\t\n") or 0xD800 <= ord(c) <= 0xDFFF
                     for c in value)
        out = yaml.safe_dump(value, default_style='"', allow_unicode=not unsafe, width=math.inf)
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        out = yaml.safe_dump(value, width=math.inf)
    else:
        out = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return out.removesuffix("\n...\n").strip()


_env: SandboxedEnvironment | None = None


def env() -> SandboxedEnvironment:
    global _env
    if _env is None:
        _env = SandboxedEnvironment(
            loader=FileSystemLoader(str(TEMPLATES)),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )
        _env.filters["y"] = yaml_value
    return _env


def render_identity(identity: dict) -> list[dict]:
    """The built-in identity set: each string of the template is rendered with name/author as variables."""
    e = env()
    out = []
    for row in ds.identity_rows():
        out.append({k: e.from_string(v).render(name=identity["name"], author=identity["author"]) if v else v
                    for k, v in row.items()})
    return out


def dataset_info(plan: Plan) -> dict:
    info = {}
    for d in plan.datasets:
        entry: dict[str, Any] = {"file_name": d.file_name}
        if d.formatting == "sharegpt":
            entry["formatting"] = "sharegpt"
            entry["columns"] = {"messages": d.messages_key}
            entry["tags"] = d.tags
        info[d.name] = entry
    return info


def _yaml(name: str, plan: Plan, **extra) -> str:
    """Render a YAML template; blank lines are dropped, then one is put back before each section."""
    out: list[str] = []
    for line in env().get_template(name).render(p=plan, **extra).splitlines():
        if not line.strip():
            continue
        if line.startswith("### ") and out:
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


def render_files(plan: Plan, recipe_text: str | None = None) -> dict[str, Path]:
    """Write every file of a run's set-up into plan.out_dir; return {label: path}."""
    out = Path(plan.out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for d in plan.datasets:
        target = data / d.file_name
        if d.source is None:
            rows = render_identity(plan.identity) if d.name == "identity" else ds.general_rows()
            target.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        elif d.source.lower().endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(d.source).read_text(encoding="utf-8").splitlines() if line.strip()]
            target.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(d.source, target)
        files[f"data/{d.file_name}"] = target
    info = data / "dataset_info.json"
    info.write_text(json.dumps(dataset_info(plan), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    files["data/dataset_info.json"] = info
    for name, template, kw in (("train", "train", {}), ("infer", "infer", {"base": False}),
                               ("infer_base", "infer", {"base": True}), ("export", "export", {})):
        path = out / f"{name}.yaml"
        path.write_text(_yaml(f"{template}.yaml.j2", plan, **kw), encoding="utf-8")
        files[f"{name}.yaml"] = path
    from wrapper.distributed import write_deepspeed_config

    ds_config = write_deepspeed_config(plan.layout, out) if plan.layout else None
    if ds_config:
        files[ds_config.name] = ds_config
    if recipe_text is not None:
        (out / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        files["recipe.yaml"] = out / "recipe.yaml"
    return files
