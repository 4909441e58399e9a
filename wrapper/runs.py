"""Stage 5: the run record. One directory per run, runs/<recipe name>/<UTC time>-<short id>/, with
the rendered files, the adapter, logs, plots and manifest.json (written atomically).
runs/<name>/latest points at the newest successful run of that recipe."""

from __future__ import annotations

import calendar
import json
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from wrapper.errors import LfwError
from wrapper.paths import runs_root

MANIFEST = "manifest.json"
STATUSES = ("running", "succeeded", "failed", "interrupted")


def new_run_dir(name: str, root: Path | None = None) -> Path:
    """A fresh directory that no other run (even one started the same second) can get."""
    parent = (root or runs_root()) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while True:
        path = parent / f"{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()  # atomic: fails if another process took this name
            return path
        except FileExistsError:
            continue


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, or None when it is missing or unreadable (a broken run never breaks others)."""
    try:
        data = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def update_manifest(run_dir: Path, **changes) -> dict:
    data = read_manifest(run_dir) or {}
    data.update(changes)
    write_json_atomic(Path(run_dir) / MANIFEST, data)
    return data


def set_latest(run_dir: Path) -> None:
    """Point runs/<name>/latest at run_dir (a relative symlink, swapped atomically)."""
    run_dir = Path(run_dir)
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{secrets.token_hex(3)}"
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() or (Path(path) / "train.yaml").is_file()


def list_runs(root: Path | None = None) -> list[tuple[Path, dict | None]]:
    """Every run under root, oldest first: (directory, manifest or None)."""
    root = root or runs_root()
    found = []
    if not root.is_dir():
        return found
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for run in sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if is_run_dir(run):
                found.append((run, read_manifest(run)))
    return sorted(found, key=lambda x: x[0].name)


def find_run(ref: str | None = None, root: Path | None = None) -> Path:
    """A run directory from a path, a recipe name (its latest) or nothing (the newest successful run)."""
    root = root or runs_root()
    if ref:
        path = Path(ref)
        if path.is_dir():
            if path.name == "latest" or is_run_dir(path):
                return path.resolve()
            if (path / "latest").exists():
                return (path / "latest").resolve()
            raise LfwError(f"{ref}: not a run directory (no manifest.json)")
        by_name = root / ref / "latest"
        if by_name.exists():
            return by_name.resolve()
        raise LfwError(f"{ref}: no such run directory, and no successful run of a recipe named {ref!r} in {root}")
    done = [run for run, m in list_runs(root) if m and m.get("status") == "succeeded"]
    if not done:
        raise LfwError(f"no successful run in {root}: train one first (lfw train RECIPE)")
    return done[-1]


# ------------------------------------------------------------------ reading runs back (lfw runs)

def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def effective_status(manifest: dict | None) -> str:
    """The manifest's status, except that a "running" run whose lfw process is gone (on this host)
    is "died": it was killed without a chance to record it. None -> "unreadable"."""
    if not isinstance(manifest, dict):
        return "unreadable"
    status = manifest.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        return "unreadable"
    if status == "running" and manifest.get("host") == socket.gethostname() and not _pid_alive(manifest.get("pid")):
        return "died"
    return status


def _local_time(iso) -> str:
    try:
        t = time.strptime(str(iso), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return "-"
    return time.strftime("%m-%d %H:%M", time.localtime(calendar.timegm(t)))


def _duration(seconds) -> str:
    try:
        s = round(float(seconds))
    except (TypeError, ValueError):
        return "-"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def run_row(run_dir: Path, manifest: dict | None) -> dict[str, str]:
    """One line of `lfw runs`, every value a string; never raises on a strange manifest."""
    run_dir = Path(run_dir)
    row = {"name": run_dir.parent.name, "run": run_dir.name, "started": "-", "status": effective_status(manifest),
           "model": "-", "method": "-", "steps": "-", "final loss": "-", "duration": "-", "path": str(run_dir)}
    if row["status"] == "unreadable":
        return row
    m = manifest
    try:
        plan = m.get("plan") if isinstance(m.get("plan"), dict) else {}
        model = plan.get("model") if isinstance(plan.get("model"), dict) else {}
        row["name"] = str(m.get("name") or row["name"])
        row["started"] = _local_time(m.get("started"))
        row["model"] = str(model.get("id") or "-")
        if model.get("local") and model.get("id"):  # a local directory: its name says enough
            row["model"] = Path(str(model["id"])).name or row["model"]
        method = plan.get("method")
        if method:
            row["method"] = f"{method} {plan['quantization_bit']}-bit" if plan.get("quantization_bit") else str(method)
        steps = m.get("steps") if isinstance(m.get("steps"), dict) else {}
        if steps.get("total"):
            row["steps"] = f"{steps.get('done') or 0}/{steps['total']}"
        if isinstance(m.get("final_loss"), (int, float)):
            row["final loss"] = f"{m['final_loss']:.4f}"
        timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
        row["duration"] = _duration(timings.get("total"))
    except Exception:  # noqa: BLE001, S110 - a strange manifest shows what could be read
        pass
    return row


def table_rows(root: Path | None = None, name: str | None = None) -> list[dict[str, str]]:
    return [run_row(run, m) for run, m in list_runs(root) if name is None or run.parent.name == name]
