"""The environment lfw starts LLaMA-Factory with (wrapper/boot/sitecustomize.py): packages a run never
uses are hidden (bitsandbytes and scipy only when it does not quantize), the LFW_FAST_START shortcuts give
transformers' own answers, and a sitecustomize already on the path still runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from wrapper.launch import BOOT_DIR, child_env, hidden_modules, uses_bitsandbytes

PROBE = ("import importlib.util, sys; import builtins; "
         "print(importlib.util.find_spec('bitsandbytes') is None, getattr(builtins, 'CHAINED', False))")


def test_what_needs_bitsandbytes():
    assert not uses_bitsandbytes({"method": "lora", "quantization_bit": None, "extra": {}})
    assert uses_bitsandbytes({"method": "qlora", "quantization_bit": 4, "extra": {}})
    assert uses_bitsandbytes({"quantization_bit": None, "extra": {"quantization_bit": 8}})
    assert uses_bitsandbytes({"extra": {"optim": "paged_adamw_8bit"}})
    assert not uses_bitsandbytes({"extra": {"optim": "adamw_torch_fused"}})


def test_child_env_hides_what_the_run_does_not_use(monkeypatch):
    monkeypatch.delenv("LFW_HIDE_MODULES", raising=False)
    monkeypatch.delenv("LFW_FAST_START", raising=False)
    monkeypatch.delenv("LFW_FAST_EXIT", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = child_env({"quantization_bit": None, "extra": {}})
    assert env["LFW_HIDE_MODULES"].split(",") == ["bitsandbytes", "scipy", "sklearn", "matplotlib"]
    assert env["LFW_FAST_START"] == "1" and env["LFW_CUDNN_ATTENTION"] == "0" and env["LFW_FAST_EXIT"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(BOOT_DIR), "/somewhere/else"]
    # QLoRA needs bitsandbytes (and its scipy fallback); a recipe that asks LLaMA-Factory for its plot keeps matplotlib
    assert hidden_modules({"quantization_bit": 4, "extra": {}}) == ["sklearn", "matplotlib"]
    assert hidden_modules({"quantization_bit": None, "extra": {"plot_loss": True}}) == ["bitsandbytes", "scipy", "sklearn"]
    # a resumed run whose train.yaml (rendered by an older lfw) still has LLaMA-Factory plot
    assert "matplotlib" not in hidden_modules({"quantization_bit": None, "extra": {}}, {"plot_loss": True})
    monkeypatch.setenv("LFW_HIDE_MODULES", "")  # the user's choice wins: hide nothing
    monkeypatch.setenv("LFW_FAST_START", "0")
    monkeypatch.setenv("LFW_CUDNN_ATTENTION", "1")
    monkeypatch.setenv("LFW_FAST_EXIT", "0")
    env = child_env({"quantization_bit": None, "extra": {}})
    assert not {"LFW_HIDE_MODULES", "LFW_FAST_START", "LFW_CUDNN_ATTENTION", "LFW_FAST_EXIT"} & set(env)


EXIT = """
import atexit, sys, threading, types
import sitecustomize
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "thread":
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    atexit.register(stop.set)
m = types.SimpleNamespace(run_exp=lambda: sys.stdout.write("trained\\n"))  # buffered, not yet flushed
sitecustomize._exit_after("run_exp")(m)
m.run_exp()
print("after run_exp")
if sys.argv[1] == "thread":
    stop.set()
"""


@pytest.mark.parametrize("case, printed", [
    ("plain", ["trained", "atexit ran"]),                      # ends right after: no module teardown
    ("thread", ["trained", "after run_exp", "atexit ran"]),    # a live non-daemon thread: the normal way
])
def test_fast_exit_runs_atexit_flushes_and_exits_zero(case, printed):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(BOOT_DIR)}
    out = subprocess.run([sys.executable, "-c", EXIT, case], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == printed


def test_fast_exit_wraps_llamafactorys_train_and_export():
    code = ("import llamafactory.train.tuner as t; print(t.run_exp.__name__, t.export_model.__name__); "
            "from llamafactory.train.tuner import run_exp; print(run_exp is t.run_exp)")
    env = {**os.environ, "PYTHONPATH": str(BOOT_DIR), "LFW_FAST_EXIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["done_then_exit", "done_then_exit", "True"], out.stderr[-2000:]


def test_cudnn_attention_is_off_only_when_asked():
    code = "import torch; print(torch.backends.cuda.cudnn_sdp_enabled())"
    for value, enabled in (("0", "False"), ("1", "True"), (None, "True")):
        env = {**os.environ, "PYTHONPATH": str(BOOT_DIR)}
        env.pop("LFW_CUDNN_ATTENTION", None)
        if value is not None:
            env["LFW_CUDNN_ATTENTION"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == enabled, value


def test_hidden_module_is_not_found_and_other_sitecustomize_still_runs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.CHAINED = True\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{BOOT_DIR}:{other}", "LFW_HIDE_MODULES": "bitsandbytes"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    out = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "import of bitsandbytes halted" in out.stderr
    # without the variable, the hook hides nothing
    env.pop("LFW_HIDE_MODULES")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == "True"


FAST = """
import json, sys
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoProcessor
from transformers.models.qwen2 import Qwen2Config
from transformers.models.qwen2_vl import Qwen2VLConfig
from transformers.models.t5 import T5Config
autos = (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM)
member = [[c in a._model_mapping.keys() for a in autos] for c in (Qwen2Config, Qwen2VLConfig, T5Config)]
whole = [len(list(a._model_mapping.keys())) for a in autos]
try:
    processor = type(AutoProcessor.from_pretrained(sys.argv[1])).__name__
except OSError as e:
    processor = "OSError: " + str(e)
print(json.dumps({"member": member, "whole": whole, "processor": processor}))
"""


def _fast(model_dir, on: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(BOOT_DIR), "LFW_FAST_START": "1" if on else "0"}
    out = subprocess.run([sys.executable, "-c", FAST, str(model_dir)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fast_start_gives_transformers_own_answers(tiny_model):
    off, on = _fast(tiny_model, False), _fast(tiny_model, True)
    # the model class LLaMA-Factory picks: the same membership answers, and the whole lists when iterated
    assert on["member"] == off["member"] == [[True, False, False], [False, True, False], [False, False, True]]
    assert on["whole"] == off["whole"] and min(on["whole"]) > 10
    # a text-only model: transformers returns the tokenizer again (LLaMA-Factory drops it), lfw says at once
    assert "Processor" not in off["processor"]
    assert on["processor"].startswith("OSError") and "defines no processor" in on["processor"]


def test_a_folder_with_a_processor_config_is_left_to_transformers(tiny_model, tmp_path):
    model = tmp_path / "with-processor"
    shutil.copytree(tiny_model, model)
    (model / "preprocessor_config.json").write_text("{}")
    on = _fast(model, True)
    assert not on["processor"].startswith("OSError")
