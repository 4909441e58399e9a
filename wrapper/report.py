"""report.md: one page per run that a user pastes into a pull request or a chat: the recipe, the
loss plot(s) (relative image links, so the page renders beside its run), the eval table, timings and
versions. Written by `lfw report`, at the end of `lfw eval`, and by `lfw train` through
`write_report(run_dir)`. It reads only the run directory, never imports torch, and never fails on a
missing or strange piece: what is there is shown."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from wrapper.runs import read_manifest

REPORT = "report.md"


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) if h else " " for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if s >= 3600:
        return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"
    if s >= 60:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{s:.1f}s"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _loss_plots(run_dir: Path) -> list[str]:
    """Loss plots as paths relative to the run: the run's own copies first, then the adapter's."""
    seen, out = set(), []
    for folder in (run_dir, run_dir / "adapter"):
        for plot in sorted([*folder.glob("*.svg"), *folder.glob("*.png")]):
            if "loss" in plot.name and plot.name not in seen:
                seen.add(plot.name)
                out.append(plot.relative_to(run_dir).as_posix())
    return out


def _losses(run_dir: Path) -> tuple[float | None, float | None, int | None]:
    """(first, last) training loss and the last step from trainer_log.jsonl."""
    for path in (run_dir / "trainer_log.jsonl", run_dir / "adapter" / "trainer_log.jsonl"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
                rows.append(row)
        if rows:
            return rows[0]["loss"], rows[-1]["loss"], rows[-1].get("current_steps")
    return None, None, None


def _recipe_rows(plan: dict) -> list[list[Any]]:
    rows = []
    model = plan.get("model") if isinstance(plan.get("model"), dict) else {}
    if model:
        rows.append(["model", model.get("id")])
    ident = plan.get("identity")
    if isinstance(ident, dict):
        rows.append(["identity", f"{ident.get('name')} by {ident.get('author')}"])
    if plan.get("system_prompt"):
        rows.append(["system prompt", plan["system_prompt"]])
    if plan.get("template"):
        rows.append(["chat template", plan["template"]])
    if plan.get("method"):
        q = f" {plan['quantization_bit']}-bit" if plan.get("quantization_bit") else ""
        reason = f" ({plan['method_reason']})" if plan.get("method_reason") else ""
        rows.append(["method", f"{plan['method']}{q}{reason}"])
    if plan.get("method") in ("lora", "qlora") and plan.get("lora_rank"):
        rows.append(["LoRA", f"rank {plan['lora_rank']}, alpha {plan.get('lora_alpha')}, "
                             f"dropout {plan.get('lora_dropout')}, target {plan.get('lora_target')}"])
    if plan.get("datasets"):
        rows.append(["data", f"{', '.join(map(str, plan['datasets']))}: {plan.get('n_samples')} samples"])
    if plan.get("epochs") is not None:
        prec = "bf16" if plan.get("bf16") else "fp16" if plan.get("fp16") else "fp32"
        rows.append(["training", f"{plan.get('epochs'):g} epochs, batch {plan.get('batch_size')} x accumulation "
                                 f"{plan.get('gradient_accumulation')}, lr {plan.get('learning_rate'):g}, "
                                 f"{plan.get('lr_scheduler')}, cutoff {plan.get('cutoff_len')}, {prec}"])
    return rows


def render_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    m = read_manifest(run_dir) or {}
    plan = m.get("plan") if isinstance(m.get("plan"), dict) else {}
    name = m.get("name") or plan.get("name") or run_dir.parent.name
    lines = [f"# {name}: lfw run report", ""]
    facts = [f"run `{run_dir.name}`", f"status **{m.get('status', 'unknown')}**"]
    if m.get("started"):
        facts.append(f"started {m['started']}")
    lines += [", ".join(facts), ""]

    lines += ["## Recipe", ""]
    rows = _recipe_rows(plan)
    lines += (_table(["", ""], rows) if rows else ["(no plan in manifest.json)"]) + [""]
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        text = recipe.read_text(encoding="utf-8", errors="replace").rstrip()
        fence = "````" if "```" in text else "```"
        lines += ["<details><summary>recipe.yaml</summary>", "", f"{fence}yaml", text, fence, "", "</details>", ""]

    lines += ["## Training", ""]
    first, last, step = _losses(run_dir)
    steps = m.get("steps") if isinstance(m.get("steps"), dict) else {}
    facts = []
    if steps.get("total") or step:
        facts.append(f"steps {steps.get('done', step)}/{steps.get('total', '?')}")
    final = m.get("final_loss", last)
    if isinstance(final, (int, float)):
        facts.append(f"loss {first:.4f} -> {final:.4f}" if isinstance(first, (int, float)) else f"final loss {final:.4f}")
    if isinstance(m.get("eval_loss"), (int, float)):
        facts.append(f"eval loss {m['eval_loss']:.4f}")
    lines += [", ".join(facts) if facts else "(no training log)", ""]
    for png in _loss_plots(run_dir):
        lines += [f"![{Path(png).stem.replace('_', ' ')}]({png})", ""]

    ev = _read_json(run_dir / "eval.json")
    if isinstance(ev, dict) and ev.get("scores"):
        from wrapper.evaluate import table_rows

        lines += ["## Evaluation", ""]
        ident = ev.get("identity")
        if isinstance(ident, dict):
            lines += [f"Identity hit: the answer names **{ident.get('name')}** (and **{ident.get('author')}** when the "
                      "question asks who made it). Retention: general questions with checkable answers. "
                      "Greedy answers, each question asked with no system prompt and with the chat template's "
                      "default one.", ""]
        models = [k for k in ("base", "tuned") if k in ev["scores"]]
        rows = [[("&emsp;" + r[0].strip()) if r[0].startswith(" ") else r[0], *r[1:]] for r in table_rows(ev)]
        lines += _table(["", *models], rows) + [""]
        samples = [q for q in ev.get("questions", []) if q.get("set") == "identity"][:3]
        if samples and all("tuned" in q.get("answers", {}) and "base" in q["answers"] for q in samples):
            lines += ["Sample answers (no system prompt):", ""]
            rows = [[q["question"], q["answers"]["base"].get("none", {}).get("answer"),
                     q["answers"]["tuned"].get("none", {}).get("answer")] for q in samples]
            lines += _table(["question", "base", "tuned"], rows) + [""]
        lines += [f"Details: [eval.json](eval.json) ({ev.get('created', '')})", ""]

    timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
    extra = {}
    if isinstance(ev, dict) and isinstance(ev.get("timings"), dict):
        extra["eval"] = ev["timings"].get("total_s")
    exp = m.get("export") if isinstance(m.get("export"), dict) else None
    if exp:
        extra["export"] = exp.get("seconds")
    all_t = {**timings, **{k: v for k, v in extra.items() if v is not None}}
    if all_t:
        lines += ["## Timings", ""] + _table(["stage", "time"], [[k, _duration(v)] for k, v in all_t.items()]) + [""]
    if exp:
        lines += ["## Export", "", f"merged model in `{exp.get('dir')}`", ""]

    versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    device = m.get("device") if isinstance(m.get("device"), dict) else plan.get("device")
    if versions or device:
        lines += ["## Versions", ""]
        rows = [[k, v] for k, v in versions.items()]
        if isinstance(device, dict):
            rows.append(["device", device.get("name") or device.get("kind")])
        lines += _table(["", ""], rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path) -> Path:
    """Write <run_dir>/report.md (atomically) and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".report.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_report(run_dir))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
