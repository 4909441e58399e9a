"""Stage 4: launch. `llamafactory-cli train train.yaml` as a child process (an argument list, no
shell), its whole output in train.log, and a progress bar fed by the trainer_log.jsonl that
LLaMA-Factory appends to at every logging step.

Signals: the child runs in its own session, so the terminal's Ctrl-C reaches lfw only; lfw then
forwards SIGINT to the child's process group (the trainer stops where it is; checkpoints already
written stay). A second Ctrl-C sends SIGTERM, a third SIGKILL. SIGTERM to lfw is handled the same.
If lfw itself dies, the kernel sends the child SIGTERM (PR_SET_PDEATHSIG), so no trainer is orphaned.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wrapper.errors import LfwError

_ESCALATION = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def llamafactory_cli() -> str:
    """The llamafactory-cli of this environment (beside the running python), else the one on PATH."""
    beside = Path(sys.executable).parent / "llamafactory-cli"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("llamafactory-cli")
    if not found:
        raise LfwError("llamafactory-cli not found: install llamafactory==0.9.5 into this Python environment")
    return found


BOOT_DIR = Path(__file__).resolve().parent / "boot"  # sitecustomize.py: the switches of boot_env()


def uses_bitsandbytes(plan: dict) -> bool:
    """Whether a run needs bitsandbytes: 4/8-bit quantization, or an 8-bit/paged optimizer passed through."""
    extra = plan.get("extra") or {}
    if plan.get("quantization_bit") or extra.get("quantization_bit"):
        return True
    optim = str(extra.get("optim") or "").lower()
    return any(word in optim for word in ("8bit", "4bit", "bnb", "paged"))


def hidden_modules(plan: dict, train_yaml: dict | None = None) -> list[str]:
    """Packages a training run never uses, which would cost start-up time if imported
    (wrapper/boot/sitecustomize.py hides them; measured on an H100 machine, BENCH.md):
    bitsandbytes (peft's LoRA layer imports it: ~5 s) and scipy (transformers' object-detection
    loss: ~1 s) unless the run quantizes or uses a bitsandbytes optimizer; sklearn (transformers'
    assisted generation: 1.6 s); matplotlib (LLaMA-Factory's plot module: ~0.8 s) unless the recipe
    passes plot_loss through or the train.yaml being run asks for it (a run rendered by an older lfw,
    resumed), since lfw draws the loss plot itself (wrapper.plot)."""
    hide = [] if uses_bitsandbytes(plan) else ["bitsandbytes", "scipy"]
    hide.append("sklearn")
    if not ((plan.get("extra") or {}).get("plot_loss") or (train_yaml or {}).get("plot_loss")):
        hide.append("matplotlib")
    return hide


def boot_env(hide: list[str]) -> dict[str, str]:
    """The environment that starts a LLaMA-Factory process through wrapper/boot: that folder first on
    PYTHONPATH, `hide` hidden, LFW_FAST_START=1 (two transformers shortcuts with the same results),
    LFW_CUDNN_ATTENTION=0 (no per-length cuDNN attention plans) and LFW_FAST_EXIT=1 (no module teardown
    after a finished train or export); see the boot module. Any of these set by the user wins."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(BOOT_DIR), os.environ.get("PYTHONPATH", "")) if p)}
    for key, value in (("LFW_HIDE_MODULES", ",".join(hide)), ("LFW_FAST_START", "1"), ("LFW_CUDNN_ATTENTION", "0"),
                       ("LFW_FAST_EXIT", "1")):
        if key not in os.environ:
            env[key] = value
    return env


def child_env(plan: dict, train_yaml: dict | None = None) -> dict[str, str]:
    """Environment for `llamafactory-cli train` (and the ranks torchrun starts from it): boot_env with
    the packages of hidden_modules() hidden."""
    return boot_env(hidden_modules(plan, train_yaml))


def _death_signal():
    """A function for the child, run between fork and exec: the kernel sends it SIGTERM when lfw dies.
    prctl is looked up here, in the parent, so the child only makes the call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec


DIVERGED_HINT = ("training has diverged and the adapter will not be usable; lower learning_rate in the "
                 "recipe (or set precision: bf16 instead of fp16 where the GPU has it) and train again")


@dataclass
class Outcome:
    returncode: int
    interrupted: bool = False            # lfw forwarded a signal to the child
    signals_sent: list[str] = field(default_factory=list)
    seconds: float = 0.0
    last: dict | None = None             # the last trainer_log.jsonl record seen
    diverged_at: int | None = None       # the first logged step whose loss was nan or inf


class TrainerLog:
    """Reads the records appended to trainer_log.jsonl since `start` (a byte offset)."""

    def __init__(self, path: Path, start: int = 0):
        self.path, self.offset, self._partial = Path(path), start, b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def read_records(path: Path) -> list[dict]:
    return TrainerLog(path).new_records() if Path(path).is_file() else []


def non_finite_loss(rec: dict) -> bool:
    """True for a record whose training loss is nan or inf. lfw's train.yaml turns LLaMA-Factory's
    logging_nan_inf_filter off, so such a loss reaches the log instead of being replaced by the mean of
    the earlier ones (which hid a ruined run, and cost a host sync every step)."""
    loss = rec.get("loss")
    return isinstance(loss, float) and not math.isfinite(loss)


def format_record(rec: dict) -> str:
    parts = [f"step {rec.get('current_steps', '?')}/{rec.get('total_steps', '?')}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("eval_loss") is not None:
        parts.append(f"eval_loss {rec['eval_loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("remaining_time"):
        parts.append(f"eta {rec['remaining_time']}")
    return "  ".join(parts)


class _Display:
    """A rich progress bar on a terminal; one plain line per logged step otherwise (CI, pipes)."""

    def __init__(self, label: str, last: dict | None, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.bar = None
        self.label = label
        self.shown: dict = {}
        if enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                                transient=False)
            total = (last or {}).get("total_steps")
            done = (last or {}).get("current_steps", 0)
            self.task = self.bar.add_task(label, total=total, completed=done,
                                          info="loading model and data" if not last else format_record(last))
            self.bar.start()

    def update(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            for key, label in (("loss", "loss"), ("eval_loss", "eval"), ("remaining_time", "eta")):
                if rec.get(key) is not None:  # an eval record has no loss: keep the last one shown
                    self.shown[label] = rec[key]
            info = "  ".join(f"{k} {self.shown[k]:.4f}" if isinstance(self.shown[k], float) else f"{k} {self.shown[k]}"
                             for k in ("loss", "eval", "eta") if k in self.shown)
            self.bar.update(self.task, total=rec.get("total_steps"), completed=rec.get("current_steps", 0), info=info)
        elif rec.get("loss") is not None or rec.get("eval_loss") is not None:  # not the closing summary
            print(format_record(rec), file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_child(argv: list[str], cwd: Path, log_path: Path, trainer_log: Path, *, verbose: bool = False,
              append: bool = False, env: dict | None = None, label: str = "training") -> Outcome:
    """Run the trainer to its end (or until the user stops it); never raises on the child's failure."""
    cwd, log_path, trainer_log = Path(cwd), Path(log_path), Path(trainer_log)
    start_offset = trainer_log.stat().st_size if trainer_log.is_file() else 0
    previous = read_records(trainer_log)
    tail = TrainerLog(trainer_log, start_offset)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.monotonic()
    with open(log_path, "ab" if append else "wb") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.write(f"===== lfw: {' '.join(argv)}  (cwd {cwd}, {stamp}) =====\n".encode())
        log.flush()
        try:
            # preexec_fn only calls prctl(2); lfw runs no other thread at this point
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, env=full_env,
                                    stdout=subprocess.PIPE if verbose else log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_death_signal())  # noqa: PLW1509
        except OSError as e:
            raise LfwError(f"cannot start {argv[0]}: {e}") from None
        outcome = Outcome(returncode=0, last=previous[-1] if previous else None)
        _supervise(proc, outcome, tail, log, verbose, label)
    outcome.returncode = proc.returncode
    outcome.seconds = time.monotonic() - t0
    return outcome


def _supervise(proc: subprocess.Popen, outcome: Outcome, tail: TrainerLog, log, verbose: bool, label: str) -> None:
    """Wait for the child: feed the display, forward signals (the old handlers come back afterwards)."""
    pump = None
    if verbose:
        pump = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        pump.start()
    display = _Display(label, outcome.last, enabled=not verbose)

    def on_signal(signum, frame):
        sig = _ESCALATION[min(len(outcome.signals_sent), len(_ESCALATION) - 1)]
        outcome.interrupted = True
        outcome.signals_sent.append(sig.name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGINT:
            display.note("lfw: stopping the trainer (Ctrl-C again to terminate it, a third time to kill it) ...")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            for rec in tail.new_records():
                outcome.last = rec
                display.update(rec)
                if outcome.diverged_at is None and non_finite_loss(rec):
                    outcome.diverged_at = rec.get("current_steps")
                    display.note(f"lfw: warning: the training loss is {rec['loss']} at step "
                                 f"{outcome.diverged_at}: {DIVERGED_HINT}")
            if done:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        display.stop()
        if pump is not None:
            pump.join(timeout=10)
        log.flush()


def _tee(stream, log) -> None:
    out = sys.stdout.buffer
    for chunk in iter(lambda: stream.read1(65536), b""):
        log.write(chunk)
        log.flush()
        try:
            out.write(chunk)
            out.flush()
        except (BrokenPipeError, ValueError):
            pass


def tail_lines(path: Path, n: int = 30) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    # progress bars rewrite one line with \r: keep what the line ended as
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return [line for line in lines if line.strip()][-n:]


# Known failures: (pattern in the log, hint shown to the user). The first that matches wins.
HINTS: list[tuple[str, str]] = [
    (r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED",
     "the GPU ran out of memory: lower batch_size or cutoff_len in the recipe, or use method: qlora"),
    ((r"No module named '?bitsandbytes|bitsandbytes\S* is required|bitsandbytes\S*' distribution was not found|"
      r"bitsandbytes.*(compiled without GPU|CUDA Setup failed)"),
     "4-bit QLoRA needs bitsandbytes with a CUDA GPU: pip install -U bitsandbytes, or use method: lora"),
    (r"Template \S+ does not exist|chat_template is not set|does not support `train_on_prompt`|Cannot find template",
     ("the chat template does not fit this model: set template: in the recipe to the model's family "
      "(for example qwen, llama3)")),
    ((r"Unrecognized model|does not recognize this architecture|does not appear to have a file named|Error while deserializing|is not a valid JSON|"
      r"size mismatch for|should have a `model_type` key|KeyError: 'model_type'"),
     ("the model directory looks broken, or is not a model this transformers knows: check its config.json "
      "and weights, or download it again")),
    (r"No space left on device|File too large|Disk quota exceeded|os error 2[78]\b|Errno 2[78]\]",
     ("the disk is full, or a file-size limit (ulimit -f, a quota) was hit: free some space or raise the limit "
      "(checkpoints in runs/ can be large)")),
    (r"Output directory already exists", "the adapter folder has a finished model: start a new run instead of --resume"),
]


def hint_for(lines: list[str], returncode: int) -> str | None:
    import re

    if returncode in (-9, 137):  # killed: the log ends mid-work, its lines are no error's
        return "the trainer was killed (SIGKILL): often the machine ran out of RAM; lower batch_size or cutoff_len"
    text = "\n".join(lines)
    for pattern, hint in HINTS:
        if re.search(pattern, text):
            return hint
    return None
