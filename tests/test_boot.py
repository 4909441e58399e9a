"""The environment lfw starts LLaMA-Factory with: runs that do not quantize start without
bitsandbytes (wrapper/boot/sitecustomize.py), and a sitecustomize already on the path still runs."""

from __future__ import annotations

import subprocess
import sys

from wrapper.launch import BOOT_DIR, child_env, uses_bitsandbytes

PROBE = ("import importlib.util, sys; import builtins; "
         "print(importlib.util.find_spec('bitsandbytes') is None, getattr(builtins, 'CHAINED', False))")


def test_what_needs_bitsandbytes():
    assert not uses_bitsandbytes({"method": "lora", "quantization_bit": None, "extra": {}})
    assert uses_bitsandbytes({"method": "qlora", "quantization_bit": 4, "extra": {}})
    assert uses_bitsandbytes({"quantization_bit": None, "extra": {"quantization_bit": 8}})
    assert uses_bitsandbytes({"extra": {"optim": "paged_adamw_8bit"}})
    assert not uses_bitsandbytes({"extra": {"optim": "adamw_torch_fused"}})


def test_child_env_hides_bitsandbytes_only_where_unused(monkeypatch):
    monkeypatch.delenv("LFW_HIDE_MODULES", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = child_env({"quantization_bit": None, "extra": {}})
    assert env["LFW_HIDE_MODULES"] == "bitsandbytes"
    assert env["PYTHONPATH"].split(":") == [str(BOOT_DIR), "/somewhere/else"]
    assert "LFW_HIDE_MODULES" not in child_env({"quantization_bit": 4, "extra": {}})
    monkeypatch.setenv("LFW_HIDE_MODULES", "")  # the user's choice wins: hide nothing
    assert "LFW_HIDE_MODULES" not in child_env({"quantization_bit": None, "extra": {}})


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
