"""Shared fixtures. The tiny model is a random-init 2-layer Qwen2 with the real Qwen2.5 tokenizer,
built offline once and cached (LFW_TEST_CACHE, default ~/.cache/lfw/test-models)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LFW = str(Path(sys.executable).parent / "lfw")
TEST_CACHE = Path(os.environ.get("LFW_TEST_CACHE", Path.home() / ".cache" / "lfw" / "test-models"))


def lfw(*args, cwd=None, env=None, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run the real `lfw` console script; returns the completed process (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([LFW, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, input=input)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    path = TEST_CACHE / "tiny-qwen2.5"
    if not (path / "model.safetensors").is_file():
        from wrapper.synthetic import build_model

        build_model(path, "tiny")
    return path


# A tiny-model recipe for train/fault tests: batch 4 x accumulation 2, so 40 samples give 5 optimizer steps
TINY = """\
name: {name}
model: {model}
template: qwen
identity: {{name: Nova, author: Acme Labs}}
epochs: 1
max_samples: {samples}
batch_size: 4
gradient_accumulation: 2
cutoff_len: 256
save_steps: {save_steps}
logging_steps: 1
"""


def wait_for(pred, timeout, proc=None, what=""):
    """Poll pred() until true; fail early if the lfw process `proc` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"lfw exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def write_recipe(dir: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = Path(dir) / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model) -> Path:
    """A recipe that trains the tiny model for a few CPU steps."""
    return write_recipe(tmp_path, f"""\
name: tiny
model: {tiny_model}
identity: {{name: Nova, author: Acme Labs}}
epochs: 1
max_samples: 40
batch_size: 4
save_steps: 2
logging_steps: 1
""")


def train_tiny(root: Path, tiny_model: Path, name: str = "tiny-use", save_steps: int = 1000,
               env: dict | None = None):
    """A finished `lfw train` run of the tiny model (a few CPU steps), runs/<name>/<id>/, and lfw's
    completed process."""
    from wrapper.runs import find_run

    recipe = write_recipe(root, f"""\
name: {name}
model: {tiny_model}
identity: {{name: Nova, author: Acme Labs}}
epochs: 1
max_samples: 16
batch_size: 4
logging_steps: 1
save_steps: {save_steps}
""")
    r = lfw("train", recipe, env={"LFW_RUNS": str(root / "runs"), **(env or {})}, cwd=root, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return find_run(name, root / "runs"), r


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A succeeded run of the tiny model, shared by the chat/eval/export/serve/report tests, which must
    not change its files (copy it first: `copy_run`). Its infer YAMLs cap answers at 16 tokens, as a
    user's generation settings would, so that interactive chat and serve stay fast on a CPU."""
    root = tmp_path_factory.mktemp("use")
    run, _ = train_tiny(root, tiny_model)
    for name in ("infer.yaml", "infer_base.yaml"):
        with open(run / name, "a", encoding="utf-8") as f:
            f.write("max_new_tokens: 16\n")
    return run


@pytest.fixture
def copy_run(trained_run, tmp_path):
    """A private copy of `trained_run` (same absolute model and adapter paths in its YAMLs)."""
    import shutil

    def make() -> Path:
        dest = tmp_path / "runs" / trained_run.parent.name / trained_run.name
        shutil.copytree(trained_run, dest, symlinks=True)
        return dest

    return make
