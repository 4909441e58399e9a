"""templates/ and recipes/ reach an installed wheel: build it, install it into a fresh venv, and
run `lfw render` from another directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import yaml

from conftest import ROOT


def test_wheel_installs_and_renders_from_elsewhere(tmp_path, tiny_model):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("lfw-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "wrapper/_data/templates/train.yaml.j2" in names
    assert "wrapper/_data/templates/identity.json.j2" in names
    assert "wrapper/_data/recipes/my_identity.yaml" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    # only what `lfw render` needs: the heavy stack (torch, llamafactory) is not imported on this path
    subprocess.run([*pip, "pyyaml", "jinja2", "click", "pydantic"], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r.yaml").write_text(f"name: w\nmodel: {tiny_model}\nidentity: {{name: Wheel, author: Pip}}\n")
    r = subprocess.run([str(venv / "bin" / "lfw"), "render", "r.yaml", "-o", "out"], cwd=elsewhere,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train = yaml.safe_load((elsewhere / "out" / "train.yaml").read_text())
    assert train["template"] == "qwen" and train["dataset_dir"] == str(elsewhere / "out" / "data")
    assert "Wheel" in (elsewhere / "out" / "data" / "identity.json").read_text()
    # the shipped recipes are there too
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "from wrapper.paths import RECIPES; print(sorted(p.name for p in RECIPES.glob('*.yaml')))"],
                       capture_output=True, text=True, cwd=elsewhere)
    assert "my_identity.yaml" in r.stdout, r.stderr
