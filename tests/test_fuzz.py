"""Fuzzing: hypothesis writes recipe documents, valid and invalid. lfw either renders files that
parse back to the same values or reports one validation line (exit 2): never a traceback, never
template code run from user text."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from wrapper.cli import main

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.sampled_from(["{{ 7 * 7 }}", "{% raw %}", "$(touch pwned)", "`id`", "; rm -rf /",
                                           "no", "~", "名字", "🦙", "../..", "/etc/passwd"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
KEYS = ["epochs", "learning_rate", "batch_size", "gradient_accumulation", "cutoff_len", "lr_scheduler",
        "warmup_ratio", "precision", "method", "template", "max_samples", "val_size", "seed", "logging_steps",
        "save_steps", "system_prompt", "quantization_bit", "gradient_checkpointing", "lora", "llamafactory",
        "datasets", "hub", "resources", "bogus_key"]


@st.composite
def documents(draw, model: str):
    doc = {"name": draw(st.one_of(st.just("fuzz"), st.text(max_size=10))), "model": model,
           "identity": draw(st.one_of(
               st.fixed_dictionaries({"name": st.text(max_size=20), "author": st.text(max_size=20)}), values))}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        doc[key] = draw(values)
    return doc


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_recipes_render_or_fail_cleanly(model_dir, data, capsys, monkeypatch):
    doc = data.draw(documents(model_dir))
    spawned = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: spawned.append(a) or pytest.fail("spawned a process"))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(yaml.safe_dump(doc), encoding="utf-8")
        out = Path(tmp) / "out"
        with pytest.raises(SystemExit) as exc:
            main(["render", str(recipe), "-o", str(out)])
            raise SystemExit(0)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        if exc.value.code == 2:
            assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("lfw: error: ")
            return
        assert exc.value.code == 0, captured.err
        train = OmegaConf.to_container(OmegaConf.load(out / "train.yaml"))
        assert train["model_name_or_path"] == model_dir
        for key, value in (doc.get("llamafactory") or {}).items():
            assert train[key] == value
        identity = doc["identity"]
        rows = json.loads((out / "data" / "identity.json").read_text(encoding="utf-8"))
        if "identity" in doc.get("datasets", ["identity"]):
            assert any(identity["name"] in r["output"] and identity["author"] in r["output"] for r in rows)
    assert not spawned
