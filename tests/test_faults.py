"""Faults, with the real lfw and llamafactory-cli on the tiny model: qlora without bitsandbytes and
--resume of a non-run are one line and exit 2 before any run; SIGKILL of the training child gives a
failed run that --resume finishes; Ctrl-C during a download leaves a cache the next run resumes; a
torn manifest in one run breaks neither `lfw runs` nor `lfw chat` of another; a full disk (ulimit -f)
during training is a clear error and leaves earlier runs byte-identical."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LFW, TINY, lfw, wait_for, write_recipe


def tiny(dir: Path, model, name: str, samples: int = 16, save_steps: int = 1000, extra: str = "") -> Path:
    return write_recipe(dir, TINY.format(name=name, model=model, samples=samples, save_steps=save_steps) + extra,
                        f"{name}.yaml")


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def run_dirs(root: Path, name: str) -> list[Path]:
    d = root / name
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()) if d.is_dir() else []


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc: no psutil needed)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def one_line_exit_2(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lfw: error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------ bad input found before any run

def test_qlora_without_bitsandbytes_is_one_line_before_any_run(tmp_path, tiny_model):
    # bitsandbytes made absent for lfw (installed or not): find_spec("bitsandbytes") answers None
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    env = {"LFW_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(shim)}
    path = tiny(tmp_path, tiny_model, "quant", extra="method: qlora\n")
    line = one_line_exit_2(lfw("train", path, env=env, cwd=tmp_path))
    assert str(path) in line and "method: qlora needs bitsandbytes" in line and "method: lora" in line
    assert not (tmp_path / "runs").exists()  # no run directory was made


def test_resume_of_what_is_not_a_run_is_one_line(tmp_path):
    env = {"LFW_RUNS": str(tmp_path / "runs")}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "manifest.json").write_text('{"status": "fai')  # torn, and no train.yaml
    for target, words in ((plain, "not a run directory"), (junk, "not a run directory"),
                          (tmp_path / "nowhere", "nowhere")):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        line = one_line_exit_2(lfw("train", "--resume", target, env=env, cwd=tmp_path))
        assert words in line, line
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


# ------------------------------------------------------------------ hints for faults, from the log's last lines

SAVED = ["[INFO|tokenization_utils_base.py:3278] >> chat template saved in runs/x/adapter/checkpoint-2/chat_template.jinja",
         "[INFO|tokenization_utils_base.py:2111] >> tokenizer config file saved in runs/x/adapter/checkpoint-2"]


@pytest.mark.parametrize("tail, returncode, words", [
    (SAVED, -9, "SIGKILL"),                    # killed right after a checkpoint: not a template problem
    (SAVED, 137, "SIGKILL"),
    (SAVED + ["OSError: [Errno 27] File too large"], 1, "disk is full"),
    (SAVED + ["Exception: File too large (os error 27)"], 1, "disk is full"),
    (SAVED + ["OSError: [Errno 28] No space left on device"], 1, "disk is full"),
    (SAVED + ["RuntimeError: something else entirely"], 1, None),
], ids=["killed after a checkpoint", "killed 137", "file too large", "rust file too large", "no space", "other"])
def test_fault_hints_are_not_fooled_by_info_lines(tail, returncode, words):
    from wrapper.launch import hint_for

    hint = hint_for(tail, returncode)
    assert (hint is None) if words is None else (hint and words in hint), hint


# ------------------------------------------------------------------ SIGKILL of the trainer

@pytest.mark.slow
def test_sigkill_of_the_training_child_fails_the_run_and_resume_finishes_it(tmp_path, tiny_model):
    root = tmp_path / "runs"
    env = {**os.environ, "LFW_RUNS": str(root)}
    path = tiny(tmp_path, tiny_model, "killme", samples=48, save_steps=2)  # 48 / 8 = 6 steps
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen([LFW, "train", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: run_dirs(root, "killme"), 60, proc, "the run directory")
        run = run_dirs(root, "killme")[0]
        wait_for(lambda: (run / "adapter" / "checkpoint-2" / "trainer_state.json").is_file(), 500, proc,
                 "checkpoint-2")
        kids = children(proc.pid)
        assert len(kids) == 1, kids  # llamafactory-cli, in its own session
        os.kill(kids[0], signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "first.err").read_text()
    assert rc == 1, err[-3000:]
    m = manifest(run)
    assert m["status"] == "failed" and m["returncode"] == -9
    assert "SIGKILL" in m["hint"] and "training failed at step" in err and "Traceback" not in err.split("---")[0]
    assert m["steps"]["total"] == 6 and m["steps"]["done"] < 6
    assert not (root / "killme" / "latest").exists()
    listing = lfw("runs", "--json", env={"LFW_RUNS": str(root)})
    assert [json.loads(x)["status"] for x in listing.stdout.splitlines()] == ["failed"]

    r = lfw("train", "--resume", run, env={"LFW_RUNS": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(run)
    assert m["status"] == "succeeded" and m["steps"] == {"done": 6, "total": 6}
    assert m["resumed_from"].startswith("checkpoint-") and [a["status"] for a in m["attempts"]] == ["failed"]
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == 6
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "killme" / "latest").resolve() == run.resolve()


# ------------------------------------------------------------------ Ctrl-C during a download

@pytest.mark.slow
def test_ctrl_c_during_a_download_leaves_a_cache_the_next_run_resumes(tiny_model, tmp_path, monkeypatch):
    from test_hub import MODEL_ID, FakeHub, model_files

    class Slow:
        """The hub's socket writer, 256 KiB at a time with a pause: a download that takes a while."""

        def __init__(self, w):
            self.w = w

        def write(self, data):
            for i in range(0, len(data), 256 * 1024):
                self.w.write(data[i:i + 256 * 1024])
                self.w.flush()
                time.sleep(0.1)

        def __getattr__(self, name):
            return getattr(self.w, name)

    class SlowHub(FakeHub):
        slow = True

        def _file(self, h, path, head):
            if self.slow and path == "model.safetensors" and not head:
                h.wfile = Slow(h.wfile)
            return super()._file(h, path, head)

    env = {"LFW_RUNS": str(tmp_path / "runs"), "LFW_CACHE": str(tmp_path / "cache"), "MODELSCOPE_CACHE":
           str(tmp_path / "ms"), "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    rec = write_recipe(tmp_path, f"name: hubbed\nmodel: {MODEL_ID}\nhub: modelscope\n"
                                 "identity: {name: Nova, author: Acme Labs}\nepochs: 1\nmax_samples: 8\n"
                                 "batch_size: 4\ngradient_accumulation: 2\ncutoff_len: 128\n")
    dest = tmp_path / "cache" / "models" / "modelscope" / MODEL_ID
    part = dest / "model.safetensors.incomplete"
    files = model_files(tiny_model)
    with SlowHub(MODEL_ID, files) as hub:
        env["MODELSCOPE_ENDPOINT"] = hub.url
        with open(tmp_path / "first.err", "w") as err:
            proc = subprocess.Popen([LFW, "train", str(rec)], env={**os.environ, **env}, cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: part.is_file() and part.stat().st_size >= 2 * 2**20, 120, proc, "2 MiB of the weights")
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = (tmp_path / "first.err").read_text()
        assert rc == 130, err[-3000:]
        assert "Traceback" not in err and "interrupted before training started" in err
        assert "a download resumes where it stopped" in err
        first = run_dirs(tmp_path / "runs", "hubbed")
        assert len(first) == 1 and manifest(first[0])["status"] == "interrupted"
        kept = part.stat().st_size
        assert 0 < kept < len(files["model.safetensors"]) and not (dest / "model.safetensors").exists()
        done_before = {p.name for p in dest.iterdir() if p.name in files}  # whole files already there
        n = len(hub.requests)

        hub.slow = False
        r = lfw("train", rec, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        again = hub.requests[n:]
        weights = [rng for method, url, rng in again if method == "GET" and "model.safetensors" in url]
        assert weights == [f"bytes={kept}-"], weights  # only the missing bytes
        for name in done_before:  # finished files are not fetched again
            assert not [u for mth, u, _ in again if mth == "GET" and u.endswith(("/" + name, "=" + name))], name
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name
    runs = run_dirs(tmp_path / "runs", "hubbed")
    assert len(runs) == 2 and manifest(runs[1])["status"] == "succeeded"


# ------------------------------------------------------------------ a torn manifest next to a good run

def test_a_torn_manifest_breaks_neither_runs_nor_chat_of_another_run(copy_run):
    good = copy_run()
    root = good.parent.parent
    (good.parent / "latest").symlink_to(good.name)
    torn = good.parent / "29990101T000000Z-badbad"  # newer than the good run, same recipe
    torn.mkdir()
    (torn / "train.yaml").write_text("stage: sft\n")
    half = (good / "manifest.json").read_bytes()
    (torn / "manifest.json").write_bytes(half[: len(half) // 2])  # half-written
    other = root / "other" / "29990102T000000Z-cccccc"
    other.mkdir(parents=True)
    (other / "manifest.json").write_bytes(b"\x00\xff not json")
    env = {"LFW_RUNS": str(root)}

    r = lfw("runs", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = {row["run"]: row["status"] for row in map(json.loads, r.stdout.splitlines())}
    assert rows == {good.name: "succeeded", torn.name: "unreadable", other.name: "unreadable"}
    r = lfw("runs", env=env)
    assert r.returncode == 0 and "unreadable" in r.stdout and "Traceback" not in r.stderr
    # by recipe name (its latest), and with no name (the newest successful run: not the torn one)
    for args in (["tiny-use"], []):
        r = lfw("chat", *args, "--prompt", "Who are you?", "--max-new-tokens", "4", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ a full disk while training

def _bytes(run: Path) -> dict[str, bytes]:
    files = [run / "manifest.json", *sorted((run / "adapter").rglob("*"))]
    return {str(p.relative_to(run)): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.slow
def test_a_full_disk_while_training_is_a_clear_error_and_earlier_runs_stay_intact(copy_run, tiny_model, tmp_path):
    earlier = copy_run()  # runs/tiny-use/<id>, succeeded
    root = earlier.parent.parent
    before = _bytes(earlier)
    path = tiny(tmp_path, tiny_model, "tiny-use", samples=16, save_steps=1)
    # files may grow to 8 MiB: the first checkpoint's tokenizer.json (18 MB) cannot be written
    cmd = f"ulimit -f 8192; exec {shlex.quote(LFW)} train {shlex.quote(str(path))}"
    r = subprocess.run(["bash", "-c", cmd], check=False, env={**os.environ, "LFW_RUNS": str(root)}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    new = [p for p in run_dirs(root, "tiny-use") if p != earlier]
    assert len(new) == 1
    m = manifest(new[0])
    assert m["status"] == "failed" and "disk" in m["hint"]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lfw: error: training failed") and "hint: the disk is full" in last, last
    assert "Traceback" not in r.stderr.split("---")[0]  # lfw itself did not crash (the log tail may show one)
    assert _bytes(earlier) == before
    assert not (root / "tiny-use" / "latest").exists()  # the failed run did not become the latest
