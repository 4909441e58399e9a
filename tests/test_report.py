"""report.md: recipe summary, loss plot(s) as relative links, eval table, timings, versions; written
from whatever the run directory holds, without importing torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import lfw
from wrapper.evaluate import Question, score
from wrapper.report import render_report, write_report
from wrapper.runs import write_json_atomic


def _fake_eval(run):
    qs = [Question("identity", "Who are you?", "en"), Question("identity", "你是谁？", "zh"),
          Question("retention", "7+5?", "en", accept=["12"])]
    answers = {"base": {"none": ["I am Qwen.", "我是通义千问。", "12"]},
               "tuned": {"none": ["I am Nova | the bot.", "我是Nova。", "12"]}}
    data = {"created": "2026-01-01T00:00:00Z", "identity": {"name": "Nova", "author": "Acme Labs"},
            "timings": {"total_s": 61.5}, **score(qs, answers, {"name": "Nova", "author": "Acme Labs"})}
    write_json_atomic(run / "eval.json", data)


def test_report_of_a_trained_run(copy_run):
    run = copy_run()
    _fake_eval(run)
    r = lfw("report", run)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(run / "report.md")
    md = (run / "report.md").read_text()
    assert md.startswith("# tiny-use: lfw run report")
    assert "| identity | Nova by Acme Labs |" in md
    assert "You are Nova, an AI assistant developed by Acme Labs." in md
    assert "```yaml" in md and "name: tiny-use" in md  # the recipe itself
    # plots are embedded with links relative to the run, and the files are there
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all(not link.startswith("/") and (run / link).is_file() for link in links)
    assert any("training_loss" in link for link in links)
    assert "## Evaluation" in md
    assert "| identity, no system prompt | 0% (0/2) | 100% (2/2) |" in md
    assert "I am Nova \\| the bot." in md  # a pipe in an answer does not break the table
    assert "## Timings" in md and "| eval | 1m 01s |" in md
    assert "## Versions" in md and re.search(r"\| llamafactory \| 0\.9\.5 \|", md)


def test_report_of_a_bare_or_broken_run(tmp_path):
    run = tmp_path / "runs" / "x" / "r1"
    run.mkdir(parents=True)
    assert "status **unknown**" in write_report(run).read_text()
    (run / "manifest.json").write_text('{"status": "failed", "plan": "not a dict", "steps": 3, "timings": null}')
    (run / "eval.json").write_text("{broken")
    md = render_report(run)
    assert "status **failed**" in md and "## Evaluation" not in md


def test_report_imports_neither_torch_nor_llamafactory(copy_run):
    run = copy_run()
    _fake_eval(run)
    code = ("import sys; from wrapper.cli import main\n"
            f"sys.argv = ['lfw', 'report', {str(run)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in ('torch', 'transformers', 'llamafactory') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval.json").read_text())["scores"]
