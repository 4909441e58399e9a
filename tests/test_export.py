"""lfw export: the merged directory loads with transformers and generates; its chat template and
Modelfile default to the identity, not to "You are Qwen, created by Alibaba Cloud"."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, lfw
from wrapper.export import GUARD_MARK, default_system_of, fix_modelfile, with_default_system

QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TEMPLATE = (ROOT / "templates" / "qwen2.5_chat_template.jinja").read_text()
IDENTITY = "You are Nova, an AI assistant developed by Acme Labs."


def test_finds_the_hard_coded_default_of_qwen():
    assert default_system_of(QWEN_TEMPLATE) == QWEN_DEFAULT
    assert default_system_of("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None


@pytest.mark.parametrize("prompt", [
    IDENTITY,
    "You are \"Nova\", Acme's bot.\nSecond line with a \\ backslash and {{ braces }} and {% tags %}.",
    "你是小智，由星辰科技开发的助手。",
])
def test_qwen_default_becomes_the_identity(prompt):
    from wrapper.export import _render

    fixed = with_default_system(QWEN_TEMPLATE, prompt)
    assert "You are Qwen" not in fixed and GUARD_MARK not in fixed  # replaced in place
    assert default_system_of(fixed) == prompt
    out = _render(fixed, [{"role": "user", "content": "hi"}])
    assert out.startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\nhi")
    # a client's own system message still wins
    assert _render(fixed, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]).startswith(
        "<|im_start|>system\nS<|im_end|>")
    assert with_default_system(fixed, prompt) == fixed


def test_template_without_a_default_gets_a_system_message():
    from wrapper.export import _render

    plain = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    fixed = with_default_system(plain, "I'm Nova.")
    assert fixed.startswith(GUARD_MARK)
    assert _render(fixed, [{"role": "user", "content": "hi"}]) == "<system>I'm Nova.<user>hi"
    assert _render(fixed, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]) == "<system>S<user>hi"
    assert with_default_system(fixed, "I'm Nova.") == fixed  # idempotent


def test_modelfile_system_is_fixed(tmp_path):
    mf = tmp_path / "Modelfile"
    mf.write_text('FROM .\n\nTEMPLATE """{{ .Prompt }}"""\n\nSYSTEM """You are Qwen."""\n\nPARAMETER stop "<|im_end|>"\n')
    assert fix_modelfile(tmp_path, IDENTITY)
    assert f'SYSTEM """{IDENTITY}"""' in mf.read_text() and "Qwen" not in mf.read_text()
    assert not fix_modelfile(tmp_path, IDENTITY)
    mf.write_text('FROM .\n\nTEMPLATE """{{ .Prompt }}"""\n\nPARAMETER stop "<|im_end|>"\n')
    assert fix_modelfile(tmp_path, IDENTITY)
    assert mf.read_text().index("SYSTEM") > mf.read_text().index("TEMPLATE")


def test_export_loads_with_transformers_and_generates(copy_run, tmp_path):
    import time

    run = copy_run()
    out = tmp_path / "merged"
    t0 = time.monotonic()
    r = lfw("export", run, "-o", out)
    print(f"\nexport wall time: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out) in r.stdout and "ollama create tiny-use" in r.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "Modelfile"} <= names
    assert not (run / "export").exists()  # -o: nothing written into the run but the manifest

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert IDENTITY in text and "You are Qwen" not in text
    with_tools = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert IDENTITY in with_tools and "You are Qwen" not in with_tools
    ids = tok(text, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5

    saved = "".join(p.read_text() for p in out.iterdir() if p.name in ("chat_template.jinja", "tokenizer_config.json"))
    assert "You are Qwen, created by Alibaba Cloud" not in saved
    modelfile = (out / "Modelfile").read_text()
    assert f'SYSTEM """{IDENTITY}"""' in modelfile and "FROM ." in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .System }}" in modelfile and "{{ .Content }}" in modelfile
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["export"]["dir"] == str(out) and manifest["export"]["system_prompt"] == IDENTITY


def test_export_refuses_a_folder_with_other_things_in_it(copy_run, tmp_path):
    run = copy_run()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = lfw("export", run, "-o", tmp_path / "busy")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
