"""The run record read back: `lfw runs` lists every run, a broken manifest shows as unreadable
without hiding the others, run directories are never shared, manifests are replaced atomically."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from conftest import lfw


def make_run(root: Path, recipe: str, run: str, manifest: dict | None = None) -> Path:
    d = root / recipe / run
    d.mkdir(parents=True)
    (d / "train.yaml").write_text("stage: sft\n")
    if manifest is not None:
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def full(status, steps=(5, 5), loss=1.2345, total=83.0, method="lora", model="Qwen/Qwen2.5-0.5B-Instruct",
         started="2026-01-02T03:04:05Z", **extra):
    return {"status": status, "name": extra.pop("name", "demo"), "started": started,
            "steps": {"done": steps[0], "total": steps[1]}, "final_loss": loss,
            "timings": {"setup": 1, "download": 0, "train": total - 1, "total": total},
            "plan": {"method": method, "quantization_bit": 4 if method == "qlora" else None,
                     "model": {"id": model, "path": "/m", "hub": "modelscope", "local": False}}, **extra}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "demo", "20260102T030405Z-aaaaaa", full("succeeded"))
    make_run(root, "demo", "20260102T040000Z-bbbbbb", full("failed", steps=(2, 5), loss=None, total=12))
    make_run(root, "big", "20260103T000000Z-cccccc", full("interrupted", steps=(40, 300), loss=0.5, total=4000,
                                                              method="qlora", model="Qwen/Qwen2.5-7B-Instruct",
                                                              name="big"))
    make_run(root, "demo", "20260104T000000Z-dddddd", full("running", pid=dead_pid(), host=socket.gethostname()))
    broken = make_run(root, "demo", "20260105T000000Z-eeeeee")
    (broken / "manifest.json").write_text('{"status": "succ')            # torn
    make_run(root, "demo", "20260106T000000Z-ffffff").joinpath("manifest.json").write_text("[1, 2]")  # not a mapping
    make_run(root, "demo", "20260107T000000Z-gggggg", {"status": "succeeded", "steps": "many", "timings": None,
                                                      "plan": 7, "final_loss": "low", "started": 12})  # odd values
    return root


def test_runs_lists_every_run_and_survives_broken_manifests(runs_root):
    r = lfw("runs", "--json", env={"LFW_RUNS": str(runs_root)})
    assert r.returncode == 0, r.stderr
    rows = {row["run"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert len(rows) == 7
    ok = rows["20260102T030405Z-aaaaaa"]
    assert (ok["status"], ok["steps"], ok["final loss"], ok["duration"], ok["method"], ok["model"]) == \
        ("succeeded", "5/5", "1.2345", "1m 23s", "lora", "Qwen/Qwen2.5-0.5B-Instruct")
    assert rows["20260102T040000Z-bbbbbb"]["status"] == "failed" and rows["20260102T040000Z-bbbbbb"]["final loss"] == "-"
    big = rows["20260103T000000Z-cccccc"]
    assert (big["name"], big["status"], big["method"], big["steps"], big["duration"]) == \
        ("big", "interrupted", "qlora 4-bit", "40/300", "1h 06m")
    assert rows["20260104T000000Z-dddddd"]["status"] == "died"       # "running", but its lfw is gone
    assert rows["20260105T000000Z-eeeeee"]["status"] == "unreadable"
    assert rows["20260106T000000Z-ffffff"]["status"] == "unreadable"
    odd = rows["20260107T000000Z-gggggg"]
    assert odd["status"] == "succeeded" and odd["steps"] == "-" and odd["final loss"] == "-"
    # oldest first
    assert list(rows) == sorted(rows)


def test_runs_table_shows_the_columns(runs_root):
    r = lfw("runs", env={"LFW_RUNS": str(runs_root)})
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    for col in ("name", "started", "status", "model", "method", "steps", "final loss", "duration"):
        assert col in header
    line = next(x for x in r.stdout.splitlines() if "aaaaaa" in x)
    for value in ("demo", "succeeded", "Qwen/Qwen2.5-0.5B-Instruct", "lora", "5/5", "1.2345", "1m 23s"):
        assert value in line
    assert "unreadable" in next(x for x in r.stdout.splitlines() if "eeeeee" in x)
    # one recipe's runs only
    only = lfw("runs", "big", env={"LFW_RUNS": str(runs_root)})
    assert "cccccc" in only.stdout and "aaaaaa" not in only.stdout


def test_runs_with_no_runs_says_how_to_start(tmp_path):
    r = lfw("runs", env={"LFW_RUNS": str(tmp_path / "none")})
    assert r.returncode == 0 and "lfw train" in r.stdout


def _grab(args) -> list[str]:
    from wrapper.runs import new_run_dir

    root, n = args
    return [str(new_run_dir("same", Path(root))) for _ in range(n)]


def test_run_dirs_are_never_shared_across_processes(tmp_path):
    with ProcessPoolExecutor(4) as pool:
        got = [p for chunk in pool.map(_grab, [(tmp_path, 50)] * 4) for p in chunk]
    assert len(got) == len(set(got)) == 200
    assert all(Path(p).is_dir() and Path(p).parent == tmp_path / "same" for p in got)


def test_a_failed_manifest_write_keeps_the_old_one(tmp_path):
    from wrapper.runs import read_manifest, update_manifest, write_json_atomic

    write_json_atomic(tmp_path / "manifest.json", {"status": "running", "name": "x"})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        update_manifest(tmp_path, status="succeeded", bad=loop)
    assert read_manifest(tmp_path) == {"status": "running", "name": "x"}
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]  # no temporary file left behind


def test_latest_points_at_the_run_given(tmp_path):
    from wrapper.runs import find_run, set_latest

    a = make_run(tmp_path, "demo", "20260101T000000Z-aaaaaa", full("succeeded"))
    b = make_run(tmp_path, "demo", "20260102T000000Z-bbbbbb", full("succeeded"))
    set_latest(b)
    set_latest(a)
    assert (tmp_path / "demo" / "latest").resolve() == a.resolve()
    assert os.readlink(tmp_path / "demo" / "latest") == a.name  # relative: the runs folder can move
    assert find_run("demo", tmp_path) == a.resolve()


@pytest.mark.parametrize("args", [["runs"], ["train", "--help"], ["plan", "--help"], ["runs", "--json"]])
def test_runs_and_help_import_no_torch(tmp_path, args):
    code = ("import sys; from wrapper.cli import main\n"
            f"sys.argv = ['lfw', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'llamafactory', 'modelscope', 'huggingface_hub')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       env={**os.environ, "LFW_RUNS": str(tmp_path)})
    assert r.returncode == 0, r.stderr
