"""The recipe -> files path: the tutorial's values, LLaMA-Factory's own parser, speed."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from conftest import ROOT, lfw, write_recipe

TUTORIAL = ROOT / "recipes" / "my_identity.yaml"


def render(recipe, out):
    r = lfw("render", recipe, "-o", out)
    assert r.returncode == 0, r.stderr
    return {n: yaml.safe_load((out / f"{n}.yaml").read_text()) for n in ("train", "infer", "export")}


def test_tutorial_recipe_renders_the_tutorials_values(tmp_path):
    y = render(TUTORIAL, tmp_path)
    train = y["train"]
    expected = {
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "quantization_bit": 4,
        "quantization_method": "bnb", "lora_target": "all", "template": "qwen", "cutoff_len": 1024,
        "num_train_epochs": 3.0, "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "bf16": True, "val_size": 0.1, "dataset": "identity", "eval_strategy": "steps",
        "plot_loss": False,  # lfw draws training_loss.svg itself, LLaMA-Factory starts without matplotlib
        "logging_nan_inf_filter": False,  # a nan loss reaches the log, and lfw warns
    }
    for key, value in expected.items():
        assert train[key] == value, key
    assert train["model_name_or_path"].endswith("modelscope/Qwen/Qwen2.5-7B-Instruct")
    assert train["output_dir"] == str(tmp_path / "adapter")
    assert train["dataset_dir"] == str(tmp_path / "data")
    # sized to the data, not the tutorial's 16 workers for 91 samples
    assert "preprocessing_num_workers" not in train
    assert y["infer"]["adapter_name_or_path"] == str(tmp_path / "adapter")
    assert y["infer"]["template"] == "qwen"
    assert "Qwen" not in y["infer"]["default_system"] and "LFW-Assistant" in y["infer"]["default_system"]
    assert y["export"]["export_dir"] == str(tmp_path / "export")
    # the recipe itself is short, and starts with the command that runs it
    lines = TUTORIAL.read_text().splitlines()
    assert len(lines) <= 15
    assert any("make finetune RECIPE=recipes/my_identity.yaml" in line for line in lines[:3])


def test_identity_dataset_is_customized(tmp_path):
    render(TUTORIAL, tmp_path)
    rows = json.loads((tmp_path / "data" / "identity.json").read_text())
    assert len(rows) >= 80
    text = json.dumps(rows, ensure_ascii=False)
    assert "{{" not in text and "LFW-Assistant" in text and "the lfw team" in text
    assert any(any("\u4e00" <= c <= "\u9fff" for c in r["instruction"]) for r in rows)  # Chinese too
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert info == {"identity": {"file_name": "identity.json"}}


def test_general_dataset_is_mixed_in_unchanged(tmp_path, tiny_model):
    """'general' is lfw's own set of everyday questions (English and Chinese): copied as it is, with no
    identity in it, and listed beside the identity set."""
    recipe = write_recipe(tmp_path, f"""\
name: mix
model: {tiny_model}
identity: {{name: Nova, author: Acme Labs}}
datasets: [identity, general]
""")
    out = tmp_path / "out"
    train = render(recipe, out)["train"]
    rows = json.loads((out / "data" / "general.json").read_text())
    assert len(rows) >= 30 and all(r["instruction"] and r["output"] for r in rows)
    assert {any("\u4e00" <= c <= "\u9fff" for c in r["instruction"]) for r in rows} == {True, False}
    assert "Nova" not in json.dumps(rows) and "{{" not in json.dumps(rows)
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert set(info) == {"identity", "general"}
    assert train["dataset"] == "identity,general"


def test_every_shipped_recipe_starts_with_its_command():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        head = "\n".join(recipe.read_text().splitlines()[:3])
        assert f"RECIPE=recipes/{recipe.name}" in head or f"lfw train recipes/{recipe.name}" in head, recipe


def test_user_datasets_alpaca_and_sharegpt(tmp_path, tiny_model):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "hello"}]))
    (tmp_path / "s.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    (tmp_path / "m.json").write_text(json.dumps(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]))
    recipe = write_recipe(tmp_path, f"name: u\nmodel: {tiny_model}\ndatasets: [a.json, s.jsonl, m.json]\n")
    out = tmp_path / "out"
    y = render(recipe, out)
    assert y["train"]["dataset"] == "a,s,m"
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert "formatting" not in info["a"]
    assert info["s"]["formatting"] == "sharegpt" and info["s"]["tags"]["role_tag"] == "from"
    assert info["m"]["columns"] == {"messages": "messages"} and info["m"]["tags"]["user_tag"] == "user"
    assert json.loads((out / "data" / "s.json").read_text())[0]["conversations"][1]["value"] == "a"


def test_passthrough_keys_reach_the_yaml_and_override_in_place(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, f"""\
name: p
model: {tiny_model}
identity: {{name: N, author: A}}
llamafactory: {{enable_liger_kernel: true, save_steps: 7, neat_packing: false}}
""")
    y = render(recipe, tmp_path / "out")["train"]
    assert y["enable_liger_kernel"] is True and y["save_steps"] == 7 and y["neat_packing"] is False
    text = (tmp_path / "out" / "train.yaml").read_text()
    assert text.count("save_steps:") == 1


@pytest.mark.parametrize("args", [["--help"], ["render", str(TUTORIAL), "-o", "{tmp}"]])
def test_fast_paths_import_neither_torch_nor_llamafactory(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = ("import sys; from wrapper.cli import main\n"
            f"sys.argv=['lfw', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'llamafactory') if m in sys.modules]\n"
            "assert not bad, bad\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    start = time.perf_counter()
    r = lfw(*args)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - start < 1.0 * 3  # well under a second here; 3x slack for a loaded CI box


def test_validate_runs_llamafactorys_parser(tmp_path, tiny_model):
    r = lfw("validate", TUTORIAL)
    assert r.returncode == 0, r.stderr
    assert "LLaMA-Factory accepts" in r.stdout
    # a key LLaMA-Factory refuses is caught by render already (the generated key list) ...
    bad = write_recipe(tmp_path, f"name: b\nmodel: {tiny_model}\nidentity: {{name: N, author: A}}\n"
                                 "llamafactory: {lora_rnak: 4}\n")
    r = lfw("render", bad, "-o", tmp_path / "o")
    assert r.returncode == 2 and "did you mean 'lora_rank'" in r.stderr
    # ... and a value it refuses by validate, through LLaMA-Factory's own parser
    bad2 = write_recipe(tmp_path, f"name: b\nmodel: {tiny_model}\nidentity: {{name: N, author: A}}\n"
                                  "llamafactory: {finetuning_type: sideways}\n", "bad2.yaml")
    r = lfw("validate", bad2)
    assert r.returncode == 2 and "LLaMA-Factory rejects" in r.stderr and "Traceback" not in r.stderr


def test_known_keys_list_matches_installed_llamafactory():
    from wrapper.lfcheck import live_keys_and_templates
    from wrapper.paths import LF_KEYS_FILE

    assert json.loads(LF_KEYS_FILE.read_text()) == live_keys_and_templates(), \
        "regenerate with: python -m wrapper.lfcheck --write-keys"
