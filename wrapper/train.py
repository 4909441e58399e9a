"""One training run, start to end: plan -> run directory -> model download -> rendered files ->
llamafactory-cli train -> the run record (manifest.json, plots, metrics, runs/<name>/latest).

`lfw train --resume RUN_DIR` reuses that directory and its train.yaml: LLaMA-Factory (0.9.5) sees
the checkpoints in output_dir (overwrite_output_dir: false) and resumes from the last one itself,
so the step count continues and trainer_log.jsonl is appended to."""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wrapper import runs
from wrapper.errors import LfwError, RunFailed

VERSIONED = ("torch", "transformers", "llamafactory", "peft", "bitsandbytes", "accelerate", "datasets",
             "modelscope", "huggingface_hub")
COPIED = ("training_loss.png", "training_eval_loss.png", "all_results.json", "train_results.json",
          "eval_results.json", "trainer_log.jsonl")
TAIL = 30
LOSS_PLOT = "training_loss.svg"  # drawn by lfw (wrapper.plot); LLaMA-Factory's own PNG only when plot_loss is passed through


class Interrupted(LfwError):
    """The user stopped the run (Ctrl-C); its checkpoints are kept."""

    exit_code = 130


@dataclass
class Result:
    run_dir: Path
    manifest: dict


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["lfw"] = md.version("lfw")
    except md.PackageNotFoundError:
        from wrapper import __version__

        out["lfw"] = __version__
    return out


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ checkpoints

def _is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: without it (or torn) the checkpoint was cut off."""
    try:
        json.loads((path / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def checkpoints(adapter: Path) -> list[Path]:
    found = [p for p in Path(adapter).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def set_aside_torn_checkpoints(adapter: Path) -> list[str]:
    """Move checkpoints cut off mid-save out of LLaMA-Factory's way (it resumes from the highest number)."""
    moved = []
    for ckpt in checkpoints(adapter):
        if not _is_complete_checkpoint(ckpt):
            target = ckpt.with_name(f"incomplete-{ckpt.name}-{int(time.time())}")
            ckpt.rename(target)
            moved.append(target.name)
    return moved


def _checkpoint_tokens(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0)
    except (OSError, ValueError, TypeError):
        return 0


# ------------------------------------------------------------------ the run record

def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def collect(run_dir: Path, session_tokens_start: int = 0, session_seconds: float | None = None) -> dict:
    """Copy metrics (and any plots LLaMA-Factory drew) to the run's top level, draw the loss plot;
    return the figures for the manifest."""
    adapter = run_dir / "adapter"
    for name in COPIED:
        src = adapter / name
        if src.is_file():
            shutil.copyfile(src, run_dir / name)
    from wrapper.launch import read_records

    recs = read_records(adapter / "trainer_log.jsonl")
    from wrapper.plot import write_loss_svg

    write_loss_svg(recs, run_dir / LOSS_PLOT, f"training loss of {run_dir.parent.name}")
    try:
        results = json.loads((adapter / "all_results.json").read_text())
    except (OSError, ValueError):
        results = {}
    steps = [r for r in recs if "current_steps" in r]
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in recs if r.get("eval_loss") is not None]
    last = steps[-1] if steps else {}
    figures: dict = {
        "steps": {"done": last.get("current_steps", 0), "total": last.get("total_steps")},
        "final_loss": _finite(losses[-1] if losses else None),  # nan/inf: None (JSON has neither), and
        "train_loss_mean": _finite(results.get("train_loss")),  # the run's diverged_at_step says when
        "eval_loss": _finite(results.get("eval_loss", evals[-1] if evals else None)),
        "epoch": last.get("epoch"),
        "checkpoints": [p.name for p in checkpoints(adapter)],
    }
    tokens = results.get("num_input_tokens_seen") or last.get("total_tokens")
    runtime = results.get("train_runtime") or session_seconds
    if tokens and runtime:
        figures["tokens"] = int(tokens)
        figures["tokens_per_second"] = round((tokens - session_tokens_start) / runtime, 1)
    else:
        figures["tokens_per_second"] = None
    if results.get("train_samples_per_second") is not None:
        figures["samples_per_second"] = results["train_samples_per_second"]
    return figures


def _base_manifest(name: str, recipe_path: Path, argv: list[str], device) -> dict:
    from wrapper.recipe import recipe_sha256

    return {
        "status": "running",
        "name": name,
        "recipe": str(recipe_path.resolve()),
        "recipe_sha256": recipe_sha256(recipe_path),
        "command": list(argv),
        "started": utc_now(),
        "finished": None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "timings": {"setup": None, "download": 0.0, "train": None, "total": None},
        "steps": {"done": 0, "total": None},
        "final_loss": None,
        "eval_loss": None,
        "tokens_per_second": None,
        "versions": versions(),
        "device": device.describe(),
    }


# ------------------------------------------------------------------ entry points

def train(recipe_path: str | Path, *, verbose: bool = False, argv: list[str] | None = None) -> Result:
    """A new run of a recipe; returns when it succeeded, raises RunFailed / Interrupted otherwise."""
    from wrapper.device import Device
    from wrapper.prepare import describe, plan_recipe, prepare

    t0 = time.monotonic()
    argv = argv or sys.argv
    recipe_path = Path(recipe_path)
    device = Device.detect()
    # Check the whole recipe before a run directory exists (nothing is written by planning).
    recipe, plan = plan_recipe(recipe_path, Path(tempfile.gettempdir()) / "lfw-plan", device)
    require_bitsandbytes(plan.method, recipe_path)
    run_dir = runs.new_run_dir(recipe.name)
    _lock_run(run_dir)
    manifest = _base_manifest(recipe.name, recipe_path, argv, device)
    manifest["run_dir"] = str(run_dir)
    runs.write_json_atomic(run_dir / runs.MANIFEST, manifest)
    _say(f"run       {_rel(run_dir)}")
    try:
        download_s = 0.0
        if not plan.model.local:
            from wrapper.hub import ensure_model

            fetched = ensure_model(plan.model.hub, plan.model.id, Path(plan.model.path), verbose=verbose)
            download_s = fetched.seconds
            manifest["download"] = {"bytes": fetched.bytes, "seconds": round(fetched.seconds, 2),
                                    "cached": not fetched.downloaded, "path": str(fetched.path)}
            if fetched.downloaded:
                _say(f"download  {fetched.bytes / 1e9:.2f} GB in {fetched.seconds:.0f} s -> {fetched.path}")
        # plan again now that config.json is on disk (the memory plan counts the real model)
        prepared = prepare(recipe_path, run_dir, device)
        for line in describe(prepared.plan):
            _say(line)
        manifest["plan"] = prepared.plan.summary()
        manifest["steps"]["total"] = prepared.plan.total_steps
        manifest["timings"]["download"] = round(download_s, 2)
        manifest["timings"]["setup"] = round(time.monotonic() - t0 - download_s, 2)
        runs.write_json_atomic(run_dir / runs.MANIFEST, manifest)
    except KeyboardInterrupt:
        _finish(run_dir, manifest, "interrupted", t0, error="stopped by the user before training started")
        again = (f"lfw train --resume {_rel(run_dir)}" if (run_dir / "train.yaml").is_file()
                 else f"lfw train {recipe_path} (a download resumes where it stopped)")
        raise Interrupted(f"interrupted before training started; continue with: {again}") from None
    except LfwError as e:
        _finish(run_dir, manifest, "failed", t0, error=str(e))
        raise
    return _launch(run_dir, manifest, t0, verbose, resumed_from=None)


def require_bitsandbytes(method: str | None, where) -> None:
    """4-bit QLoRA loads bitsandbytes in the trainer: without it, say so before any run exists.
    find_spec only looks for the package (importing it costs seconds and may touch CUDA)."""
    import importlib.util

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise LfwError(f"{where}: method: qlora needs bitsandbytes, which is not installed in this Python: "
                       "pip install bitsandbytes (4-bit QLoRA also needs a CUDA GPU), or use method: lora")


_held_locks: list = []


def _lock_run(run_dir: Path) -> None:
    """Hold run_dir for this process's lifetime: a second lfw cannot resume the same run at once."""
    import fcntl

    fh = open(run_dir / ".lfw.lock", "a+")  # noqa: SIM115 - kept open until the process exits
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise LfwError(f"{run_dir}: another lfw is training this run right now") from None
    _held_locks.append(fh)


def resume(run_ref: str | Path, *, verbose: bool = False, argv: list[str] | None = None) -> Result:
    """Continue an interrupted or failed run in its own directory, from its last checkpoint."""
    from wrapper.device import Device

    t0 = time.monotonic()
    argv = argv or sys.argv
    run_dir = Path(run_ref).resolve()
    manifest = runs.read_manifest(run_dir)
    if not (run_dir / "train.yaml").is_file():
        if manifest and manifest.get("recipe"):
            raise LfwError(f"{run_ref}: this run stopped before its files were written ({manifest.get('status')}: "
                           f"{manifest.get('error')}); start it again with lfw train {manifest['recipe']} "
                           "(a download resumes where it stopped)")
        raise LfwError(f"{run_ref}: not a run directory with a train.yaml (see lfw runs)")
    if manifest is None:
        raise LfwError(f"{run_ref}: manifest.json is missing or unreadable; cannot resume this run")
    status = runs.effective_status(manifest)
    if status == "succeeded":
        raise LfwError(f"{run_ref}: this run already succeeded; start a new one with lfw train RECIPE")
    if status == "running":
        raise LfwError(f"{run_ref}: this run is still running (pid {manifest.get('pid')}); stop it first")
    require_bitsandbytes(((manifest.get("plan") or {}) if isinstance(manifest.get("plan"), dict) else {}).get("method"),
                         run_ref)
    _lock_run(run_dir)
    device = Device.detect()
    adapter = run_dir / "adapter"
    moved = set_aside_torn_checkpoints(adapter) if adapter.is_dir() else []
    for name in moved:
        _say(f"note      set aside {name}: it was cut off while being saved")
    ckpts = checkpoints(adapter)
    last_ckpt = ckpts[-1] if ckpts else None
    if last_ckpt is None and (adapter / "trainer_log.jsonl").is_file():
        # no checkpoint to resume from: the trainer starts over, so keep its earlier log apart
        (adapter / "trainer_log.jsonl").rename(adapter / f"trainer_log.before-{int(time.time())}.jsonl")
    attempts = manifest.setdefault("attempts", [])
    attempts.append({"started": manifest.get("started"), "finished": manifest.get("finished"),
                     "status": manifest.get("status"), "steps": dict(manifest.get("steps") or {})})
    manifest.update(status="running", finished=None, pid=os.getpid(), host=socket.gethostname(),
                    resume_command=list(argv), device=device.describe(), error=None,
                    resumed_from=last_ckpt.name if last_ckpt else None)
    runs.write_json_atomic(run_dir / runs.MANIFEST, manifest)
    _say(f"run       {_rel(run_dir)}")
    _say(f"resume    from {last_ckpt.name}" if last_ckpt else "resume    no checkpoint was saved: training starts over")
    try:
        model = (manifest.get("plan") or {}).get("model") or {}
        if model and not model.get("local"):
            from wrapper.hub import ensure_model

            fetched = ensure_model(model["hub"], model["id"], Path(model["path"]), verbose=verbose)
            manifest["timings"]["download"] = round((manifest["timings"].get("download") or 0) + fetched.seconds, 2)
    except KeyboardInterrupt:
        _finish(run_dir, manifest, "interrupted", t0, error="stopped by the user before training started")
        raise Interrupted(f"interrupted; continue with: lfw train --resume {_rel(run_dir)}") from None
    except LfwError as e:
        _finish(run_dir, manifest, "failed", t0, error=str(e))
        raise
    return _launch(run_dir, manifest, t0, verbose, resumed_from=last_ckpt)


def _launch(run_dir: Path, manifest: dict, t0: float, verbose: bool, resumed_from: Path | None) -> Result:
    from wrapper.distributed import torchrun_command
    from wrapper.launch import DIVERGED_HINT, child_env, hint_for, llamafactory_cli, run_child, tail_lines

    try:
        cli = llamafactory_cli()
    except LfwError as e:
        _finish(run_dir, manifest, "failed", t0, error=str(e))
        raise
    plan = manifest.get("plan") or {}
    # several processes: the environment of LLaMA-Factory's torchrun or Ray start (wrapper.distributed)
    env = dict((plan.get("layout") or {}).get("env") or {})
    direct = torchrun_command(env, cli)
    argv = direct[0] if direct else [cli, "train", "train.yaml"]
    if direct:
        env.update(direct[1])
    manifest["child"] = argv
    runs.write_json_atomic(run_dir / runs.MANIFEST, manifest)
    label = f"{plan.get('name', manifest.get('name'))} ({plan.get('method', 'lora')})"
    tokens_start = _checkpoint_tokens(resumed_from)
    # llamafactory-cli starts `torchrun` by name: the one installed beside it, also when the venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(cli).parent), os.environ.get("PATH", "")])
    import yaml

    try:  # the file that runs decides (a run rendered by an older lfw may still ask LLaMA-Factory to plot)
        train_yaml = yaml.safe_load((run_dir / "train.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        train_yaml = None
    env.update(child_env(plan, train_yaml if isinstance(train_yaml, dict) else None))
    outcome = run_child(argv, run_dir, run_dir / "train.log", run_dir / "adapter" / "trainer_log.jsonl",
                        verbose=verbose, append=resumed_from is not None or (run_dir / "train.log").exists(),
                        env=env, label=label)
    figures = collect(run_dir, tokens_start, outcome.seconds)
    manifest.update({k: v for k, v in figures.items()})
    if manifest["steps"].get("total") is None and plan:
        manifest["steps"]["total"] = plan.get("total_steps")
    t = manifest["timings"]
    t["train"] = round((t.get("train") or 0) + outcome.seconds if manifest.get("attempts") else outcome.seconds, 2)
    manifest["returncode"] = outcome.returncode
    if outcome.diverged_at is not None:
        manifest["diverged_at_step"] = outcome.diverged_at
    adapter_ok = any((run_dir / "adapter" / f).is_file() for f in
                     ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"))
    done, total = manifest["steps"].get("done"), manifest["steps"].get("total")
    where = f"step {done}/{total}" if total else f"step {done}"

    if outcome.returncode == 0 and adapter_ok:
        _finish(run_dir, manifest, "succeeded", t0)
        runs.set_latest(run_dir)
        loss = f", final loss {manifest['final_loss']:.4f}" if manifest.get("final_loss") is not None else ""
        ev = f", eval loss {manifest['eval_loss']:.4f}" if manifest.get("eval_loss") is not None else ""
        _say(f"done      {done} steps{loss}{ev} in {_dur(manifest['timings']['total'])}")
        _say(f"adapter   {_rel(run_dir / 'adapter')}")
        if outcome.diverged_at is not None:
            _say(f"warning   the loss was not finite from step {outcome.diverged_at} on: {DIVERGED_HINT}")
        _say(f"next      lfw chat {shlex.quote(_rel(run_dir))}")
        return Result(run_dir, manifest)

    if outcome.interrupted:
        _finish(run_dir, manifest, "interrupted", t0, error=f"stopped by the user ({', '.join(outcome.signals_sent)})")
        kept = ", ".join(manifest.get("checkpoints") or []) or "none saved yet"
        raise Interrupted(f"interrupted at {where}; checkpoints kept: {kept}; continue with: "
                          f"lfw train --resume {_rel(run_dir)}")

    lines = tail_lines(run_dir / "train.log", TAIL)
    hint = hint_for(lines, outcome.returncode)
    why = (f"llamafactory-cli exited with code {outcome.returncode}" if outcome.returncode != 0
           else "llamafactory-cli exited without writing the adapter")
    _finish(run_dir, manifest, "failed", t0, error=why, hint=hint)
    _say(f"--- last {len(lines)} lines of {_rel(run_dir / 'train.log')} ---")
    for line in lines:
        _say(f"  {line}")
    _say("---")
    raise RunFailed(f"training failed at {where}: {why}" + (f"; hint: {hint}" if hint else "")
                    + f"; full log: {_rel(run_dir / 'train.log')}")


def _finish(run_dir: Path, manifest: dict, status: str, t0: float, error: str | None = None,
            hint: str | None = None) -> None:
    manifest["status"] = status
    manifest["finished"] = utc_now()
    t = manifest.setdefault("timings", {})
    elapsed = round(time.monotonic() - t0, 2)
    t["total"] = round((t.get("total") or 0) + elapsed, 2) if manifest.get("attempts") else elapsed
    manifest["error"] = error
    if hint:
        manifest["hint"] = hint
    runs.write_json_atomic(run_dir / runs.MANIFEST, manifest)
    try:  # report.md: recipe, loss plot, timings, versions (lfw eval adds its table); never fails a run
        from wrapper.report import write_report

        write_report(run_dir)
    except Exception:  # noqa: BLE001 - a report is a convenience; the manifest is the record
        pass


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"
