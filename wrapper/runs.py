"""Stage 5: the run record. One directory per run, runs/<recipe name>/<UTC time>-<short id>/, with
the rendered files, the adapter, logs, plots and manifest.json (written atomically).
runs/<name>/latest points at the newest successful run of that recipe."""

from __future__ import annotations

import json
import os
import secrets
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
