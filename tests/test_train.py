"""`lfw train` end to end with the real llamafactory-cli on the CPU (tiny random Qwen2): a run
succeeds and is recorded, Ctrl-C keeps checkpoints and --resume continues the step count, two
trains at once get two directories, a failing child is reported and touches no other run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from conftest import LFW, TINY, lfw, wait_for, write_recipe


# 40 samples, batch 4 x accumulation 2 -> ceil(40 / 8) = 5 optimizer steps in one epoch
def recipe(dir: Path, model: Path, name="tiny", samples=40, save_steps=2, file="recipe.yaml") -> Path:
    return write_recipe(dir, TINY.format(name=name, model=model, samples=samples, save_steps=save_steps), file)


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def log_records(run: Path) -> list[dict]:
    """The per-step records of trainer_log.jsonl (a line still being written is skipped)."""
    out = []
    for line in (run / "adapter" / "trainer_log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("loss") is not None:
            out.append(rec)
    return out


def run_dirs(root: Path, name: str) -> list[Path]:
    d = root / name
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()) if d.is_dir() else []


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(runs_root, tiny_model, tmp_path_factory):
    """One real training run of the tiny model, shared by the tests that inspect it."""
    d = tmp_path_factory.mktemp("recipe")
    path = recipe(d, tiny_model)
    t0 = time.monotonic()
    r = lfw("train", path, env={"LFW_RUNS": str(runs_root)}, cwd=d)
    wall = time.monotonic() - t0
    print(f"\ntiny train wall time: {wall:.1f} s")
    runs = run_dirs(runs_root, "tiny")
    return {"proc": r, "recipe": path, "run": runs[0] if runs else None, "wall": wall}


# ------------------------------------------------------------------ fast: nothing is trained

def test_plan_prints_the_plan_and_writes_nothing(tmp_path, tiny_model):
    path = recipe(tmp_path, tiny_model)
    r = lfw("plan", path, env={"LFW_RUNS": str(tmp_path / "runs")})
    assert r.returncode == 0, r.stderr
    assert "method    lora, fp32" in r.stdout  # this machine has no CUDA: no bf16
    assert "1 epochs x 5 steps, batch 4 x accumulation 2" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_a_bad_recipe_creates_no_run(tmp_path):
    path = write_recipe(tmp_path, "name: bad\nmodel: ./nowhere\nidentity: {name: A, author: B}\n")
    r = lfw("train", path, env={"LFW_RUNS": str(tmp_path / "runs")})
    assert r.returncode == 2
    assert "nowhere" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    r = lfw("train", "--resume", tmp_path)
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_torn_checkpoints_are_set_aside(tmp_path):
    from wrapper.train import checkpoints, set_aside_torn_checkpoints

    for step, state in ((2, "{}"), (4, "{}"), (6, None), (10, '{"trunc')):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (ckpt / "trainer_state.json").write_text(state)
    moved = set_aside_torn_checkpoints(tmp_path)
    assert sorted(m.split("-")[2] for m in moved) == ["10", "6"]
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("log, words", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", ("batch_size", "qlora")),
    (("importlib.metadata.PackageNotFoundError: No package metadata was found for bitsandbytes\n"
     "ImportError: The 'bitsandbytes>=0.39.0' distribution was not found and is required by this application"),
     ("bitsandbytes",)),
    ("ValueError: Template qwen9 does not exist.", ("template",)),
    ("ValueError: Unrecognized model in /m. Should have a `model_type` key in its config.json", ("config.json",)),
])
def test_known_failures_get_a_hint(log, words):
    from wrapper.launch import hint_for

    hint = hint_for(["[INFO] loading", *log.splitlines()], 1)
    assert hint and all(w in hint for w in words)
    assert hint_for(["RuntimeError: something else entirely"], 1) is None


def test_a_nan_loss_in_the_trainer_log_is_seen(tmp_path):
    """LLaMA-Factory writes a nan loss as `NaN` (lfw turns its nan filter off): lfw reads it and flags it."""
    from wrapper.launch import non_finite_loss, read_records

    log = tmp_path / "trainer_log.jsonl"
    log.write_text(json.dumps({"current_steps": 1, "loss": 2.5}) + "\n"
                   + json.dumps({"current_steps": 2, "loss": float("nan")}) + "\n"
                   + json.dumps({"current_steps": 3, "loss": float("inf")}) + "\n"
                   + json.dumps({"current_steps": 3, "train_runtime": 1.0}) + "\n")
    assert "NaN" in log.read_text()
    assert [non_finite_loss(r) for r in read_records(log)] == [False, True, True, False]


def test_a_diverging_run_is_flagged(tmp_path, tiny_model):
    """A model whose final norm is nan gives a nan loss from the first step: LLaMA-Factory logs it (lfw turns
    its nan filter off), lfw warns while it trains and at the end, and the manifest, still strict JSON,
    says from which step."""
    import torch
    from safetensors.torch import load_file, save_file

    from wrapper.runs import find_run

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, f"""\
name: diverged
model: {broken}
identity: {{name: Nova, author: Acme Labs}}
epochs: 1
max_samples: 16
batch_size: 4
logging_steps: 1
""")
    r = lfw("train", recipe, env={"LFW_RUNS": str(tmp_path / "runs")}, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: the training loss is nan at step 1: training has diverged" in r.stderr
    assert "the loss was not finite from step 1 on" in r.stderr
    run = find_run("diverged", tmp_path / "runs")
    m = json.loads((run / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))
    assert m["diverged_at_step"] == 1 and m["final_loss"] is None


# ------------------------------------------------------------------ slow: the real trainer

@pytest.mark.slow
def test_train_tiny_model_succeeds_and_is_recorded(trained, runs_root):
    r, run = trained["proc"], trained["run"]
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(run)
    assert m["status"] == "succeeded"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    # the loss plot lfw draws (LLaMA-Factory starts without matplotlib): one point per logged loss
    svg = ElementTree.parse(run / "training_loss.svg").getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    raw = svg.find("s:polyline[@class='loss']", ns).get("points").split()
    assert len(raw) == len(log_records(run)) >= 2
    assert not (run / "adapter" / "training_loss.png").exists()  # plot_loss is off in LLaMA-Factory
    for name in ("recipe.yaml", "train.yaml", "infer.yaml", "export.yaml", "data/identity.json",
                 "all_results.json", "trainer_log.jsonl", "train.log", "report.md"):
        assert (run / name).is_file(), name
    assert "](training_loss.svg)" in (run / "report.md").read_text()  # the report shows the loss plot
    # the step count the recipe asks for: ceil(40 samples / (4 x 2)) = 5
    assert m["steps"] == {"done": 5, "total": 5}
    assert log_records(run)[-1]["current_steps"] == 5
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == 5
    assert isinstance(m["final_loss"], float) and m["final_loss"] == log_records(run)[-1]["loss"]
    assert m["tokens_per_second"] > 0
    assert m["recipe_sha256"] == hashlib.sha256(trained["recipe"].read_bytes()).hexdigest()
    assert m["command"][:2] == ["lfw", "train"]
    assert m["versions"]["llamafactory"] == "0.9.5" and m["versions"]["torch"] and m["versions"]["lfw"]
    assert set(m["versions"]) >= {"python", "torch", "transformers", "llamafactory", "peft", "bitsandbytes", "lfw"}
    assert m["device"]["kind"] == "cpu"
    t = m["timings"]
    assert 0 < t["train"] <= t["total"] and t["setup"] >= 0 and t["download"] == 0
    assert m["started"] <= m["finished"]
    assert m["plan"]["template"] == "qwen" and m["plan"]["model"]["path"] == str(Path(m["plan"]["model"]["path"]))
    assert m["plan"]["system_prompt"] == "You are Nova, an AI assistant developed by Acme Labs."
    # no CUDA here: bf16 is off in what ran
    assert yaml.safe_load((run / "train.yaml").read_text())["bf16"] is False
    # latest points at it; the full child output is in train.log; progress reached the terminal
    assert (runs_root / "tiny" / "latest").resolve() == run.resolve()
    assert "train metrics" in (run / "train.log").read_text()
    assert "step 5/5" in r.stderr
    listing = lfw("runs", env={"LFW_RUNS": str(runs_root)})
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if run.name.rsplit("-", 1)[1] in line)
    assert "succeeded" in row and "5/5" in row and "lora" in row


@pytest.mark.slow
def test_failing_child_is_reported_and_earlier_runs_are_untouched(trained, runs_root, tiny_model, tmp_path):
    earlier = trained["run"]
    assert manifest(earlier)["status"] == "succeeded"
    before = snapshot(earlier)
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "no_such_architecture"
    (broken / "config.json").write_text(json.dumps(cfg))
    path = recipe(tmp_path, broken)  # the same recipe name: same runs/tiny/
    r = lfw("train", path, env={"LFW_RUNS": str(runs_root)})
    assert r.returncode == 1, r.stderr[-2000:]
    failed = [p for p in run_dirs(runs_root, "tiny") if p != earlier and manifest(p)["status"] == "failed"]
    assert len(failed) == 1
    m = manifest(failed[0])
    assert m["error"] and m["returncode"] not in (0, None)
    assert "failed" in (failed[0] / "report.md").read_text()  # the report says what happened too
    assert "no_such_architecture" in r.stderr  # the log's last lines are shown
    assert "hint:" in r.stderr and "config.json" in m["hint"]
    assert "Traceback (most recent call last)" not in r.stderr.split("---")[0]  # lfw itself did not crash
    # the earlier run: same files, same bytes, still the latest
    assert snapshot(earlier) == before
    assert (runs_root / "tiny" / "latest").resolve() == earlier.resolve()


@pytest.mark.slow
def test_sigint_keeps_checkpoints_and_resume_continues_the_step_count(tmp_path, tiny_model):
    root = tmp_path / "runs"
    env = {**os.environ, "LFW_RUNS": str(root)}
    # 80 samples / 8 = 10 steps; a checkpoint every 3
    path = recipe(tmp_path, tiny_model, name="stopme", samples=80, save_steps=3)
    with open(tmp_path / "first.err", "w") as out:
        proc = subprocess.Popen([LFW, "train", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_for(lambda: run_dirs(root, "stopme"), 60, proc, "the run directory")
        run = run_dirs(root, "stopme")[0]
        wait_for(lambda: (run / "adapter" / "checkpoint-3" / "trainer_state.json").is_file(), 400, proc,
                  "checkpoint-3")
        # stop after step 4, past the checkpoint: the resumed run must redo step 4, not skip it
        wait_for(lambda: any(r["current_steps"] >= 4 for r in log_records(run)), 200, proc, "step 4")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does to lfw
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "first.err").read_text()
    assert rc == 130, err[-2000:]
    m = manifest(run)
    assert m["status"] == "interrupted"
    assert (run / "adapter" / "checkpoint-3").is_dir()
    assert 4 <= m["steps"]["done"] < 10 and m["steps"]["total"] == 10
    assert f"--resume {run}" in err
    assert not (root / "stopme" / "latest").exists()  # not a success
    steps_before = [r["current_steps"] for r in log_records(run)]
    last_ckpt = max(int(p.parent.name.split("-")[1]) for p in (run / "adapter").glob("checkpoint-*/trainer_state.json"))
    assert last_ckpt < steps_before[-1]

    r = lfw("train", "--resume", run, env={"LFW_RUNS": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(run)
    assert m["status"] == "succeeded" and m["steps"] == {"done": 10, "total": 10}
    assert m["resumed_from"] == f"checkpoint-{last_ckpt}"
    assert [a["status"] for a in m["attempts"]] == ["interrupted"]
    recs = log_records(run)
    steps = [r["current_steps"] for r in recs]
    # the log continues: first the interrupted session, then the resumed one from the checkpoint on
    assert steps[:len(steps_before)] == steps_before
    assert steps[len(steps_before):] == list(range(last_ckpt + 1, 11))
    assert all(r["total_steps"] == 10 for r in recs)
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == 10
    log = (run / "train.log").read_text()
    assert log.count("===== lfw:") == 2 and f"Resuming training from {run}/adapter/checkpoint-{last_ckpt}" in log
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "training_loss.svg").is_file()
    assert (root / "stopme" / "latest").resolve() == run.resolve()


@pytest.mark.slow
def test_two_concurrent_trains_of_one_recipe_get_two_runs(tmp_path, tiny_model):
    root = tmp_path / "runs"
    env = {**os.environ, "LFW_RUNS": str(root)}
    path = recipe(tmp_path, tiny_model, name="twice", samples=16, save_steps=100)  # 2 steps each
    procs = [subprocess.Popen([LFW, "train", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    runs = run_dirs(root, "twice")
    assert len(runs) == 2
    for run in runs:
        m = manifest(run)
        assert m["status"] == "succeeded" and m["steps"] == {"done": 2, "total": 2}
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert m["run_dir"] == str(run)
    assert (root / "twice" / "latest").resolve() in [r.resolve() for r in runs]
