"""Each bad recipe gives one clear line naming the file and the key, exit code 2, no traceback,
and writes nothing."""

from __future__ import annotations

import json

import pytest

from conftest import lfw, write_recipe
from wrapper.cli import main

GOOD = "name: x\nmodel: {model}\nidentity: {{name: Nova, author: Acme}}\n"

CASES = [
    # (id, recipe text or None for "no file", extra files, expected fragments of the one error line)
    ("missing file", None, {}, ["no such recipe file"]),
    ("empty", "", {}, ["the recipe is empty"]),
    ("not a mapping", "- a\n- b\n", {}, ["must be a mapping"]),
    ("yaml syntax", "name: x\nmodel: [a\n", {}, ["YAML syntax error at line 3, column 1"]),
    ("unknown key", GOOD + "lerning_rate: 1e-4\n", {}, ["lerning_rate: unknown key", "did you mean 'learning_rate'"]),
    ("unknown nested key", GOOD + "lora: {{rnak: 4}}\n", {}, ["lora.rnak: unknown key", "'rank'"]),
    ("misspelt LF key", GOOD + "llamafactory: {{lora_rnak: 4}}\n", {}, ["llamafactory", "did you mean 'lora_rank'"]),
    ("wrong type", GOOD + "epochs: many\n", {}, ["epochs:", "valid number"]),
    ("negative lr", GOOD + "learning_rate: -0.001\n", {}, ["learning_rate:", "greater than 0"]),
    ("zero lr", GOOD + "learning_rate: 0\n", {}, ["learning_rate:", "greater than 0"]),
    ("zero epochs", GOOD + "epochs: 0\n", {}, ["epochs:", "greater than 0"]),
    ("tiny cutoff", GOOD + "cutoff_len: 8\n", {}, ["cutoff_len:", "greater than or equal to 16"]),
    ("empty identity name", "name: x\nmodel: {model}\nidentity: {{name: '  ', author: A}}\n", {},
     ["identity.name: must not be empty"]),
    ("identity missing", "name: x\nmodel: {model}\n", {}, ["set identity"]),
    ("unknown template", GOOD + "template: qwenn\n", {}, ["template:", "'qwenn'", "did you mean 'qwen'"]),
    ("run name escapes", "name: ../evil\nmodel: {model}\nidentity: {{name: N, author: A}}\n", {}, ["name:"]),
    ("dataset missing", GOOD + "datasets: [identity, nope.json]\n", {}, ["nope.json", "file not found"]),
    ("dataset not json", GOOD + "datasets: [bad.json]\n", {"bad.json": "{not json"}, ["bad.json", "not valid JSON"]),
    ("dataset empty", GOOD + "datasets: [e.json]\n", {"e.json": ""}, ["e.json", "empty"]),
    ("dataset no samples", GOOD + "datasets: [e.json]\n", {"e.json": "[]"}, ["e.json", "no samples"]),
    ("dataset rows lack fields", GOOD + "datasets: [r.json]\n", {"r.json": json.dumps([{"question": "q"}])},
     ["r.json", "sample 0", "neither alpaca"]),
    ("dataset mixed formats", GOOD + "datasets: [m.json]\n", {"m.json": json.dumps([
        {"instruction": "a", "output": "b"},
        {"conversations": [{"from": "human", "value": "q"}]}])}, ["m.json", "mixes formats"]),
    ("dataset climbs out", GOOD + "datasets: [../x.json]\n", {}, ["../x.json", "climbs out"]),
    ("dataset in system folder", GOOD + "datasets: [/etc/passwd.json]\n", {}, ["system folder"]),
    ("model dir missing", "name: x\nmodel: ./no-such-model\nidentity: {{name: N, author: A}}\n", {},
     ["model:", "does not exist"]),
    ("model dir without config", "name: x\nmodel: ./empty-model\nidentity: {{name: N, author: A}}\n",
     {"empty-model/README.md": "hi"}, ["model:", "no config.json"]),
    ("model id malformed", "name: x\nmodel: 'not a model id'\nidentity: {{name: N, author: A}}\n", {},
     ["model:", "neither a local directory nor a hub id"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_one_line_exit_2(case, tmp_path, tiny_model, capsys, monkeypatch):
    _, text, files, fragments = case
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text.format(model=tiny_model))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["render", str(recipe), "-o", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lfw: error: {recipe}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_error_through_the_console_script_has_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path, "name: x\nmodel: [oops\n")
    r = lfw("validate", recipe)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
