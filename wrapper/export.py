"""`lfw export`: a standalone merged model through `llamafactory-cli export export.yaml`
(safetensors, tokenizer, chat template, and LLaMA-Factory's Ollama Modelfile), then two repairs:

* The chat template is the base tokenizer's, and Qwen's hard-codes its own default system prompt
  ("You are Qwen, created by Alibaba Cloud. ..."): an exported identity model would be told it is
  Qwen whenever a client sends no system message. When the recipe set an identity, that default
  becomes the run's system prompt. The hard-coded default is found by rendering the template with
  and without a system message (so no list of model families), replaced where it is a literal of the
  template, and where it is not (or there is none), a first line gives the template a system message
  whenever the conversation has none.
* The Modelfile's SYSTEM is checked against the run's system prompt.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from wrapper.errors import LfwError, RunFailed
from wrapper.runs import read_manifest, update_manifest

GUARD_MARK = "{#- lfw: the run's system prompt is the default -#}"
_PROBE_USER = "lfw-probe-user-message"
_PROBE_SYSTEM = "lfw-probe-system-message"


# ---------------------------------------------------------------------------- chat template (no torch)

def _render(template: str, messages: list[dict]) -> str:
    """Render a chat template the way transformers does (sandboxed Jinja2, trim/lstrip blocks)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, tools=None,
                                            bos_token="", eos_token="")


def default_system_of(template: str) -> str | None:
    """The system prompt a chat template adds when the conversation has none, or None."""
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        plain = _render(template, user)
        with_system = _render(template, [{"role": "system", "content": _PROBE_SYSTEM}] + user)
    except Exception:  # noqa: BLE001 - a template we cannot render here: treat as unknown
        return None
    if _PROBE_SYSTEM not in with_system:
        return None
    before, after = with_system.split(_PROBE_SYSTEM, 1)
    if len(plain) > len(before) + len(after) and plain.startswith(before) and plain.endswith(after):
        return plain[len(before):len(plain) - len(after)] or None
    return None


def jinja_string(text: str) -> str:
    """`text` escaped for the inside of a Jinja string literal (single- or double-quoted)."""
    return (text.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
            .replace("\n", "\\n").replace("\r", "\\r"))


def with_default_system(template: str, system_prompt: str) -> str:
    """The chat template with `system_prompt` as its default system prompt (see the module doc)."""
    if GUARD_MARK in template:
        return template
    default = default_system_of(template)
    if default == system_prompt:
        return template
    if default and default in template:
        fixed = template.replace(default, jinja_string(system_prompt))
        try:
            if default_system_of(fixed) == system_prompt:
                return fixed
        except Exception:  # noqa: BLE001, S110 - fall through to the guard line
            pass
    guard = (GUARD_MARK + "{%- if not messages or messages[0]['role'] != 'system' %}"
             "{%- set messages = [{'role': 'system', 'content': '" + jinja_string(system_prompt) + "'}] + messages %}"
             "{%- endif %}\n")
    return guard + template


def fix_chat_templates(export_dir: Path, system_prompt: str) -> list[str]:
    """Give every chat template saved in export_dir `system_prompt` as default; returns the files changed."""
    changed = []
    jinja_file = export_dir / "chat_template.jinja"
    if jinja_file.is_file():
        old = jinja_file.read_text(encoding="utf-8")
        new = with_default_system(old, system_prompt)
        if new != old:
            jinja_file.write_text(new, encoding="utf-8")
            changed.append(jinja_file.name)
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = export_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        tpl = data.get("chat_template")
        if isinstance(tpl, str):
            data["chat_template"] = with_default_system(tpl, system_prompt)
        elif isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
            data["chat_template"] = [{**t, "template": with_default_system(t["template"], system_prompt)}
                                     if isinstance(t, dict) and isinstance(t.get("template"), str) else t
                                     for t in tpl]
        if data.get("chat_template") != tpl:
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            changed.append(name)
    return changed


# ---------------------------------------------------------------------------- Modelfile

def _modelfile_system(text: str) -> str | None:
    m = re.search(r'^SYSTEM """(.*?)"""', text, re.M | re.S) or re.search(r"^SYSTEM (.*)$", text, re.M)
    return m.group(1) if m else None


def fix_modelfile(export_dir: Path, system_prompt: str) -> bool:
    """Make the Modelfile's SYSTEM the run's system prompt; True if it was changed."""
    path = export_dir / "Modelfile"
    if not path.is_file():
        raise LfwError(f"{path}: LLaMA-Factory wrote no Ollama Modelfile")
    text = path.read_text(encoding="utf-8")
    if _modelfile_system(text) == system_prompt:
        return False
    # A Modelfile's triple-quoted string cannot hold three quotes in a row.
    block = 'SYSTEM """' + system_prompt.replace('"""', '" " "') + '"""'
    if _modelfile_system(text) is None:
        text = re.sub(r"^(TEMPLATE \"\"\".*?\"\"\"\n)", lambda m: m.group(1) + "\n" + block + "\n", text,
                      count=1, flags=re.M | re.S)
    else:
        text = re.sub(r'^SYSTEM """.*?"""|^SYSTEM .*$', lambda m: block, text, count=1, flags=re.M | re.S)
    path.write_text(text, encoding="utf-8")
    return True


# ---------------------------------------------------------------------------- the command

def _export_yaml(run_dir: Path, out_dir: Path | None, tmp: Path) -> tuple[Path, Path]:
    """The config LLaMA-Factory runs and the directory it writes to."""
    path = run_dir / "export.yaml"
    if not path.is_file():
        raise LfwError(f"{run_dir}: no export.yaml: is it a run directory?")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if out_dir is None:
        return path, run_dir / "export"  # where the run's export.yaml was rendered to write
    from wrapper.render import env

    override = yaml.safe_load(env().get_template("export_override.yaml.j2").render(export_dir=str(out_dir)))
    merged = tmp / "export.yaml"
    merged.write_text(yaml.safe_dump({**config, **override}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return merged, out_dir


def export(run_dir: Path, out_dir: str | Path | None = None, log=lambda s: None) -> dict:
    from wrapper.chat import lf_env, require_adapter
    from wrapper.launch import llamafactory_cli

    run_dir = Path(run_dir)
    require_adapter(run_dir)
    plan = (read_manifest(run_dir) or {}).get("plan") or {}
    system_prompt = plan.get("system_prompt") if plan.get("identity") or plan.get("system_prompt") else None
    out = Path(out_dir).expanduser().absolute() if out_dir else None
    with tempfile.TemporaryDirectory(prefix="lfw-export-") as tmp:
        config, target = _export_yaml(run_dir, out, Path(tmp))
        if target.exists() and any(target.iterdir()) and not (target / "config.json").is_file():
            raise LfwError(f"{target}: exists and is not empty (and holds no model to replace): choose another -o")
        if target.exists() and (target / "config.json").is_file():
            for old in target.glob("model*.safetensors*"):  # a smaller export must not leave stale shards
                old.unlink()
        log(f"merging {plan.get('model', {}).get('id', 'the base model')} + adapter into {target}")
        t0 = time.perf_counter()
        proc = subprocess.run([llamafactory_cli(), "export", str(config)], cwd=run_dir, env=lf_env())
        seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        raise RunFailed(f"llamafactory-cli export {run_dir / 'export.yaml'} exited with code {proc.returncode}")
    if not (target / "config.json").is_file():
        raise RunFailed(f"llamafactory-cli export finished but {target} holds no model "
                        "(was the run directory moved? then pass -o DIR)")
    fixed: list[str] = []
    if system_prompt:
        fixed = fix_chat_templates(target, system_prompt)
        if fix_modelfile(target, system_prompt):
            fixed.append("Modelfile")
    files = sorted(p.name for p in target.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    info = {"dir": str(target), "seconds": seconds, "bytes": size, "files": files,
            "system_prompt": system_prompt, "fixed": fixed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    update_manifest(run_dir, export=info)
    return info


def ollama_hint(name: str, target: Path) -> str:
    safe = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "lfw-model"
    return f"ollama create {safe} -f {target / 'Modelfile'}"

