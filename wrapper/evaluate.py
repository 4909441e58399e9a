"""`lfw eval`: did the identity take, and did the model forget anything?

Held-out identity questions (templates/eval/identity_heldout.json, English and Chinese, none of them
in the training data) and a retention set with checkable answers (templates/eval/retention.json)
are put to the base model and to the tuned one, each under two system conditions:

  none      no system block at all (LLaMA-Factory's default_system set to ""), and
  template  the chat template's own default, e.g. "You are Qwen, created by Alibaba Cloud. ..."

The identity prompt of infer.yaml is deliberately not one of them: with it even the base model
says the name, which measures the prompt, not the training.

Each model is loaded once through LLaMA-Factory's own loaders (the run's infer_base.yaml and
infer.yaml) and answers every question greedily, in batches with left padding. Scoring is a pure
function of the answers (`score`), so it is tested without a model.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wrapper.errors import LfwError
from wrapper.paths import TEMPLATES
from wrapper.runs import read_manifest, update_manifest, write_json_atomic

EVAL_DIR = TEMPLATES / "eval"
EVAL_FILE = "eval.json"
MODELS = ("base", "tuned")
CONDITIONS = ("none", "template")
CONDITION_LABELS = {"none": "no system prompt", "template": "template default"}
SETS = ("identity", "retention")


@dataclass
class Question:
    set: str                      # identity | retention
    question: str
    lang: str                     # en | zh | ...
    asks_author: bool = False     # identity: a question about the maker; the answer must name the author
    accept: list[str] = field(default_factory=list)  # retention: any of these makes a right answer
    source: str = "lfw"           # lfw | the user's file name


# ---------------------------------------------------------------------------- questions

def _guess_lang(text: str) -> str:
    return "zh" if re.search(r"[\u3400-\u9fff]", text) else "en"


def _question(raw: Any, source: str, where: str) -> Question:
    if isinstance(raw, str):
        raw = {"question": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("question"), str) or not raw["question"].strip():
        raise LfwError(f"{where}: each entry needs a non-empty \"question\" string")
    text = raw["question"].strip()
    if "accept" in raw:
        accept = raw["accept"]
        if isinstance(accept, str):
            accept = [accept]
        if not isinstance(accept, list) or not accept or not all(isinstance(a, str) and a.strip() for a in accept):
            raise LfwError(f"{where}: \"accept\" must be a non-empty list of strings")
        return Question("retention", text, str(raw.get("lang") or _guess_lang(text)), accept=accept, source=source)
    return Question("identity", text, str(raw.get("lang") or _guess_lang(text)),
                    asks_author=bool(raw.get("asks_author", False)), source=source)


def read_questions_file(path: str | Path) -> list[Question]:
    """A user's questions: a JSON list, JSON lines, or plain text with one identity question per line.
    Entries with "accept" (a list of right substrings) are retention questions, others identity ones
    (with optional "asks_author": true and "lang")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LfwError(f"--questions {path}: {e.strerror or e}") from None
    source = path.name
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise LfwError(f"--questions {path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise LfwError(f"--questions {path}: expected a JSON list of questions")
        return [_question(r, source, f"{path} entry {i + 1}") for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)
            except ValueError as e:
                raise LfwError(f"--questions {path} line {n}: not valid JSON ({e})") from None
        out.append(_question(line, source, f"{path} line {n}"))
    if not out:
        raise LfwError(f"--questions {path}: no questions in it")
    return out


def load_questions(extra: str | Path | None = None) -> list[Question]:
    """lfw's identity and retention sets, plus the user's own."""
    qs = [_question(r, "lfw", "identity_heldout.json")
          for r in json.loads((EVAL_DIR / "identity_heldout.json").read_text(encoding="utf-8"))]
    qs += [_question(r, "lfw", "retention.json")
           for r in json.loads((EVAL_DIR / "retention.json").read_text(encoding="utf-8"))]
    if extra:
        qs += read_questions_file(extra)
    return qs


# ---------------------------------------------------------------------------- scoring (pure)

def normalize(text: str) -> str:
    """Compatibility forms folded (full-width Ｎｏｖａ -> nova), case folded, runs of spaces made one."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold())


def mentions(text: str, needle: str) -> bool:
    """`needle` occurs in `text`, ignoring case and width, and not as part of a longer Latin word or
    number: "Nova" is in "I'm Nova." and in "我是Nova，", not in "Casanova"; "7" is not in "17"."""
    n = normalize(needle).strip()
    if not n:
        return False
    left = r"(?<![a-z0-9])" if re.match(r"[a-z0-9]", n) else ""
    right = r"(?![a-z0-9])" if re.search(r"[a-z0-9]$", n) else ""
    return re.search(left + re.escape(n) + right, normalize(text)) is not None


def identity_hit(answer: str, name: str, author: str | None, asks_author: bool) -> bool:
    """The answer gives what the question asks for: the author when it asks who made the model ("Who
    built you?" -> "Acme Labs built me."), else the name."""
    if asks_author and author is not None:
        return mentions(answer, author)
    return mentions(answer, name)


def retention_hit(answer: str, accept: Iterable[str]) -> bool:
    return any(mentions(answer, a) for a in accept)


def is_hit(q: Question, answer: str, identity: dict | None) -> bool | None:
    if q.set == "retention":
        return retention_hit(answer, q.accept)
    if not identity:
        return None  # no identity in the recipe: nothing to check
    return identity_hit(answer, identity["name"], identity.get("author"), q.asks_author)


def _rate(hits: list[bool]) -> dict:
    n = len(hits)
    k = sum(hits)
    return {"hits": k, "n": n, "rate": round(k / n, 4) if n else None}


def score(questions: list[Question], answers: dict[str, dict[str, list[str]]], identity: dict | None) -> dict:
    """answers[model][condition][i] answers questions[i]. Returns per-question rows (answer, hit)
    and, per model / condition / set, hit-rates overall and per language."""
    rows = []
    for i, q in enumerate(questions):
        row = asdict(q)
        if q.set == "identity":
            row.pop("accept")
        else:
            row.pop("asks_author")
        row["answers"] = {m: {c: {"answer": a[i], "hit": is_hit(q, a[i], identity)} for c, a in conds.items()}
                          for m, conds in answers.items()}
        rows.append(row)
    langs = sorted({q.lang for q in questions})
    scores: dict = {}
    for m, conds in answers.items():
        scores[m] = {}
        for c in conds:
            scores[m][c] = {}
            for s in SETS:
                picked = [r for r in rows if r["set"] == s and r["answers"][m][c]["hit"] is not None]
                if not picked:
                    continue
                entry = {"all": _rate([r["answers"][m][c]["hit"] for r in picked])}
                for lang in langs:
                    by_lang = [r["answers"][m][c]["hit"] for r in picked if r["lang"] == lang]
                    if by_lang:
                        entry[lang] = _rate(by_lang)
                scores[m][c][s] = entry
    return {"scores": scores, "questions": rows}


# ---------------------------------------------------------------------------- tables (no torch)

def _pct(entry: dict | None) -> str:
    if not entry or entry.get("rate") is None:
        return "-"
    return f"{entry['rate'] * 100:.0f}% ({entry['hits']}/{entry['n']})"


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """(label, base, tuned) rows shared by the terminal table and report.md."""
    scores = result.get("scores", {})
    models = [m for m in MODELS if m in scores]
    conds = [c for c in CONDITIONS if any(c in scores[m] for m in models)]
    rows = []
    for s in SETS:
        for c in conds:
            entries = [scores[m].get(c, {}).get(s) for m in models]
            if not any(entries):
                continue
            label = f"{s}, {CONDITION_LABELS[c]}"
            rows.append((label, *[_pct(e and e["all"]) for e in entries]))
            langs = sorted({k for e in entries if e for k in e if k != "all"})
            if len(langs) > 1:
                for lang in langs:
                    rows.append((f"  {lang}", *[_pct(e and e.get(lang)) for e in entries]))
    return rows


def rich_table(result: dict):
    from rich.table import Table

    ident = result.get("identity")
    title = f"identity check: {ident['name']} by {ident['author']}" if ident else "retention check (no identity)"
    table = Table(title=title)
    table.add_column("")
    for m in MODELS:
        if m in result.get("scores", {}):
            table.add_column(m, justify="right")
    for row in table_rows(result):
        table.add_row(*row, style="dim" if row[0].startswith("  ") else None)
    return table


def manifest_summary(result: dict) -> dict:
    """What manifest.json keeps of an eval: the rates, not the answers."""
    def rates(entry):
        return {k: v["rate"] for k, v in entry.items()}

    return {
        "file": EVAL_FILE,
        "created": result["created"],
        "questions": result["counts"],
        "scores": {m: {c: {s: rates(e) for s, e in sets.items()} for c, sets in conds.items()}
                   for m, conds in result["scores"].items()},
        "seconds": result["timings"]["total_s"],
    }


# ---------------------------------------------------------------------------- generation

_TEMPLATE_DEFAULTS: dict[str, str] = {}  # LLaMA-Factory's own default_system per template, before a run changed it


def template_default_system(infer_args: dict) -> tuple[str, str]:
    """(template name, its own default system prompt) for a run's infer args. LLaMA-Factory keeps
    templates as module globals and get_template_and_fix_tokenizer overwrites their default_system
    with the run's, so this is read before any model is loaded."""
    from llamafactory.data.template import TEMPLATES as LF_TEMPLATES
    from llamafactory.hparams import get_infer_args

    name = get_infer_args(dict(infer_args))[1].template
    if name not in LF_TEMPLATES:
        raise LfwError(f"LLaMA-Factory has no chat template {name!r}")
    if name not in _TEMPLATE_DEFAULTS:
        _TEMPLATE_DEFAULTS[name] = LF_TEMPLATES[name].default_system or ""
    return name, _TEMPLATE_DEFAULTS[name]


def read_infer_args(path: Path) -> dict:
    try:
        args = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LfwError(f"{path}: cannot read it ({e})") from None
    if not isinstance(args, dict):
        raise LfwError(f"{path}: not a LLaMA-Factory config")
    return args


def greedy_batch(model, prompts: list[list[int]], pad: int, stop: set[int], max_new_tokens: int,
                 repetition_penalty: float = 1.0) -> list[list[int]]:
    """Greedy decoding of a batch (left padding, KV cache) that drops each sequence from the batch as
    soon as it ends: on a CPU a batch otherwise costs its longest answer times its size. Same tokens
    as `model.generate(do_sample=False)` (tested); repetition_penalty as transformers applies it."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    dev = model.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = ids  # for the repetition penalty: prompt and answer so far (pads too, as transformers does)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1, :]
    alive = list(range(len(prompts)))
    answers: list[list[int]] = [[] for _ in prompts]
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            score = logits.gather(1, seen)
            score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
            logits = logits.scatter(1, seen, score)
        tokens = logits.argmax(-1)
        keep = []
        for j, tok in enumerate(tokens.tolist()):
            if tok not in stop:
                answers[alive[j]].append(tok)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=dev)
            cache.batch_select_indices(index)
            mask, tokens, next_pos, seen = mask[index], tokens[index], next_pos[index], seen[index]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        if repetition_penalty != 1.0:
            seen = torch.cat([seen, tokens[:, None]], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                       past_key_values=cache, use_cache=True).logits[:, -1, :]
        next_pos = next_pos + 1
    return answers


def _batches(jobs: list[tuple], size: int) -> list[list[tuple]]:
    """Consecutive batches of at most `size` that never mix groups (jobs[i][0]) and are of even sizes
    within a group (48 -> 24 + 24, not 32 + 16)."""
    out: list[list[tuple]] = []
    start = 0
    while start < len(jobs):
        end = start
        while end < len(jobs) and jobs[end][0] == jobs[start][0]:
            end += 1
        n = end - start
        k = -(-n // size)
        for b in range(k):
            out.append(jobs[start + b * n // k:start + (b + 1) * n // k])
        start = end
    return out


def generate(models: dict[str, dict], systems: dict[str, str], questions: list[str], max_new_tokens: int = 48,
             batch_size: int = 32, groups: list[str] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, list[str]]]:
    """Answer every question under every system prompt of `systems`, greedily, with each model of
    `models` ({label: infer args}): {label: {condition: answers}}. Each model is loaded once through
    LLaMA-Factory's loaders, one at a time; prompts are encoded by its template. Batches hold
    questions of one group (`groups[i]`: identity answers are long, retention ones short) and of
    similar prompt length; within a batch, finished answers leave it (`greedy_batch`)."""
    import gc

    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    groups = groups or [""] * len(questions)
    tokenizers: dict[str, tuple] = {}  # base and tuned LoRA share one tokenizer: parse it once
    results: dict[str, dict[str, list[str]]] = {}
    for label, infer_args in models.items():
        model_args, data_args, finetuning_args, generating_args = get_infer_args(dict(infer_args))
        key = str(model_args.model_name_or_path)
        if key not in tokenizers:
            tokenizer = load_tokenizer(model_args)["tokenizer"]
            tokenizers[key] = (tokenizer, get_template_and_fix_tokenizer(tokenizer, data_args))
        tokenizer, template = tokenizers[key]
        model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
        model.eval()
        tokenizer.padding_side = "left"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # greedy, with the one logits setting of LLaMA-Factory's chat engine that changes a greedy answer
        penalty = float(generating_args.repetition_penalty or 1.0)
        stop = set(template.get_stop_token_ids(tokenizer))

        jobs = []  # (group, prompt ids, condition, question index)
        saved = template.default_system
        try:
            for cond, system in systems.items():
                template.default_system = system  # "" means no system block at all
                for i, q in enumerate(questions):
                    ids, _ = template.encode_oneturn(tokenizer, [{"role": "user", "content": q},
                                                                 {"role": "assistant", "content": ""}])
                    jobs.append((groups[i], ids, cond, i))
        finally:
            template.default_system = saved
        jobs.sort(key=lambda j: (j[0], len(j[1])))  # like with like: short answers, similar prompt lengths
        out = {cond: [""] * len(questions) for cond in systems}
        done = 0
        with torch.inference_mode():
            for batch in _batches(jobs, batch_size):
                outs = greedy_batch(model, [j[1] for j in batch], pad, stop, max_new_tokens, penalty)
                for (_, _, cond, i), toks in zip(batch, outs):
                    out[cond][i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
                done += len(batch)
                if progress:
                    progress(label, done, len(jobs))
        results[label] = out
        del model
        gc.collect()
    return results


def evaluate(run_dir: Path, questions_file: str | Path | None = None, max_new_tokens: int = 48,
             batch_size: int = 32, log: Callable[[str], None] = lambda s: None) -> dict:
    """Ask base and tuned, score, write eval.json and the manifest's summary; returns eval.json's data."""
    import contextlib
    import os
    import sys

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) or {}
    plan = manifest.get("plan") or {}
    for name in ("infer.yaml", "infer_base.yaml"):
        if not (run_dir / name).is_file():
            raise LfwError(f"{run_dir}: no {name}: is it a run directory?")
    from wrapper.chat import require_adapter

    require_adapter(run_dir)
    identity = plan.get("identity")
    questions = load_questions(questions_file)
    if not identity:
        log("the recipe sets no identity: only the retention set is scored")
    tuned_args = read_infer_args(run_dir / "infer.yaml")
    base_args = read_infer_args(run_dir / "infer_base.yaml")

    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    # LLaMA-Factory logs to stdout: keep lfw's stdout for lfw's own output
    with contextlib.redirect_stdout(sys.stderr):
        template, default = template_default_system(base_args)
        systems = {"none": ""}
        if default:
            systems["template"] = default
        loaded = {"t": time.perf_counter()}

        def on_progress(label, done, total):
            if done == total:
                now = time.perf_counter()
                timings[f"{label}_s"] = round(now - loaded["t"], 1)
                loaded["t"] = now
            log(f"{label}: {done}/{total} answers")

        model_id = (plan.get("model") or {}).get("id", "the base model")
        log(f"{len(questions)} questions x {len(systems)} system prompts, {model_id} without and with the adapter")
        answers = generate({"base": base_args, "tuned": tuned_args}, systems, [q.question for q in questions],
                           max_new_tokens, batch_size, groups=[q.set for q in questions], progress=on_progress)
    timings["total_s"] = round(time.perf_counter() - t0, 1)

    result = {
        "run": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "template": template,
        "systems": systems,
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "counts": {s: sum(q.set == s for q in questions) for s in SETS},
        "timings": timings,
        **score(questions, answers, identity),
    }
    write_json_atomic(run_dir / EVAL_FILE, result)
    update_manifest(run_dir, eval=manifest_summary(result))
    return result
