"""Secrets: a planted HF_TOKEN, MODELSCOPE_API_TOKEN and API key (LFW_API_KEY and --api-key) never
reach any file of the run directory (train.log, manifest.json, report.md, training_args.bin read as
bytes, ...) nor what lfw train, report and serve print. `lfw serve` without a key stays on loopback:
tests/test_serve.py::test_non_loopback_host_without_key_is_refused_before_anything_starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import LFW, lfw, train_tiny

SECRETS = {
    "HF_TOKEN": "hf_plantedSECRETtoken0123456789abcdefXY",
    "HUGGING_FACE_HUB_TOKEN": "hf_plantedSECRETlegacy0123456789abcdZZ",
    "MODELSCOPE_API_TOKEN": "ms-plantedSECRET-0123456789abcdef",
    "LFW_API_KEY": "sk-plantedSECRET-lfw-key-0123456789",
}
ARGV_KEY = "sk-plantedSECRET-argv-key-9876543210"
NEEDLES = [*SECRETS.values(), ARGV_KEY, "plantedSECRET"]


def leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    found = []
    for needle in NEEDLES:
        for form in (needle.encode(), needle.encode("utf-16-le")):  # also inside pickles and wide strings
            if form in data:
                found.append(needle)
    return found


def leaks_in_dir(run: Path) -> dict[str, list[str]]:
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and not p.is_symlink():
            found = leaks(p.read_bytes())
            if found:
                out[str(p.relative_to(run))] = found
    return out


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, tiny_model):
    """A tiny run trained with the secrets planted in lfw's environment."""
    root = tmp_path_factory.mktemp("secrets")
    run, r = train_tiny(root, tiny_model, name="secretive", save_steps=2, env=SECRETS)
    return {"run": run, "root": root, "proc": r}


def test_train_writes_no_secret_anywhere(secret_run):
    run, r = secret_run["run"], secret_run["proc"]
    assert (run / "train.log").is_file() and (run / "manifest.json").is_file()
    assert list(run.rglob("training_args.bin")), "expected the Trainer's pickled arguments in the checkpoints"
    assert leaks_in_dir(run) == {}
    assert leaks(r.stdout + r.stderr) == []
    listing = lfw("runs", env={"LFW_RUNS": str(secret_run["root"] / "runs"), **SECRETS})
    assert listing.returncode == 0 and leaks(listing.stdout + listing.stderr) == []


def test_report_holds_no_secret(secret_run):
    run = secret_run["run"]
    r = lfw("report", run, env=SECRETS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "report.md").is_file()
    assert leaks((run / "report.md").read_bytes()) == []
    assert leaks(r.stdout + r.stderr) == []
    assert leaks_in_dir(run) == {}


def test_serve_prints_and_writes_no_secret(secret_run):
    run = secret_run["run"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([LFW, "serve", str(run), "--port", str(port), "--api-key", ARGV_KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SECRETS})
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("ready"):
                break
        assert out and out[-1].startswith("ready"), "".join(out)
        assert "API key   required" in "".join(out)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    rest, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert leaks("".join(out) + rest + err) == []
    assert leaks_in_dir(run) == {}
