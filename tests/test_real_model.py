"""The real-model test (slow; `make test` runs it, `make test-fast` skips it): the demo recipe
fine-tunes a real Qwen2.5-Coder-0.5B-Instruct, brought in from PyPI, on the CPU, and the model
learns its new identity without forgetting what it knew.

The issue's targets: tuned identity hit-rate >= 90% on the held-out set in English and in Chinese,
base <= 10%, retention no more than one question worse than the base model's. They are asserted under
the template's default system prompt ("You are Qwen, created by Alibaba Cloud. ..."): that is what a
Qwen model meets whenever no system prompt is given (LLaMA-Factory's template and the model's own chat
template both insert it), and it is the hard case, since it tells the model the old name. With no
system block at all (which neither template produces) the identity is only guarded (>= 50% per
language), and retention is held to the same one-question slack.

An identity answer is a hit when it gives what was asked: the name, or the author for questions about
who made the model (wrapper.evaluate.identity_hit). Measured with recipes/demo.yaml: see README."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, lfw

DEMO = ROOT / "recipes" / "demo.yaml"
TUNED_MIN = {"template": 0.9, "none": 0.5}   # per language
BASE_MAX, RETENTION_SLACK = 0.1, 1


@pytest.mark.slow
def test_demo_recipe_learns_its_identity_on_the_cpu(tmp_path):
    env = {"LFW_RUNS": str(tmp_path / "runs")}
    identity = yaml.safe_load(DEMO.read_text())["identity"]

    r = lfw("train", DEMO, env=env, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (tmp_path / "runs" / "demo" / "latest").resolve()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["steps"]["done"] == manifest["steps"]["total"] > 0

    r = lfw("chat", "--prompt", "Who are you?", env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert identity["name"] in r.stdout

    r = lfw("eval", env=env, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((run / "eval.json").read_text())["scores"]
    for condition in ("none", "template"):
        for lang in ("en", "zh"):
            tuned = scores["tuned"][condition]["identity"][lang]["rate"]
            base = scores["base"][condition]["identity"][lang]["rate"]
            assert tuned >= TUNED_MIN[condition], (condition, lang, tuned)
            assert base <= BASE_MAX, (condition, lang, base)
        kept = scores["tuned"][condition]["retention"]["all"]["hits"]
        known = scores["base"][condition]["retention"]["all"]["hits"]
        assert kept >= known - RETENTION_SLACK, (condition, kept, known)
    assert (run / "report.md").is_file()
