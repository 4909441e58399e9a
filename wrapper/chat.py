"""`lfw chat`: talk to a run's model.

Interactive: `llamafactory-cli chat infer.yaml` (streaming, `exit` and `clear` as LLaMA-Factory
defines them). lfw sits between the terminal and LLaMA-Factory's stdin, line by line, so that the
end of input (Ctrl-D, or the end of a pipe) becomes an `exit` line: LLaMA-Factory's own loop would
end in an EOFError traceback and exit code 1. The child runs in its own process group so Ctrl-C
reaches lfw only, which stops it without a traceback.

One answer (--prompt): LLaMA-Factory's ChatModel in this process, greedy unless --sample. Driving
`llamafactory-cli chat` with "TEXT\\nexit\\n" would cost the same imports but break on prompts with
newlines (its loop reads one line per turn) and need its "Assistant: " output parsed; ChatModel is
the same engine with the same infer.yaml, and gives the answer as a string.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from wrapper.errors import LfwError, RunFailed
from wrapper.launch import llamafactory_cli
from wrapper.runs import read_manifest


def lf_env(**extra: str) -> dict[str, str]:
    """Environment for a LLaMA-Factory child (chat, export, api): its info logs off unless the user asked
    for them, and launch.boot_env's switches as for training, with sklearn and matplotlib hidden
    (bitsandbytes stays: a QLoRA run's base model is loaded in 4 bits)."""
    from wrapper.launch import boot_env

    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    env.update(boot_env(["sklearn", "matplotlib"]))
    env.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update(extra)
    return env


def require_adapter(run_dir: Path) -> None:
    """The tuned model exists: LoRA runs need adapter/adapter_config.json, full ones adapter/config.json."""
    adapter = Path(run_dir) / "adapter"
    if (adapter / "adapter_config.json").is_file() or (adapter / "config.json").is_file():
        return
    status = (read_manifest(run_dir) or {}).get("status", "unknown")
    raise LfwError(f"{run_dir}: no trained model in adapter/ (run status: {status}); "
                   "train it first, or use --base for the base model")


def infer_yaml(run_dir: Path, base: bool = False) -> Path:
    path = Path(run_dir) / ("infer_base.yaml" if base else "infer.yaml")
    if not path.is_file():
        raise LfwError(f"{run_dir}: no {path.name}: is it a run directory?")
    if not base:
        require_adapter(run_dir)
    return path


def _pump(fd: int, proc: subprocess.Popen) -> None:
    """Copy the user's input to LLaMA-Factory; at its end, say `exit` for the user. Reads the file
    descriptor itself (no Python buffer whose lock a blocked read would hold at interpreter exit)."""
    dst = proc.stdin
    last = b"\n"
    try:
        while chunk := os.read(fd, 65536):
            dst.write(chunk)
            dst.flush()
            last = chunk[-1:]
        dst.write(b"exit\n" if last == b"\n" else b"\nexit\n")
        dst.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # LLaMA-Factory already left (the user typed exit)
    finally:
        try:
            dst.close()
        except OSError:
            pass


def interactive(run_dir: Path, base: bool = False) -> int:
    yaml_path = infer_yaml(run_dir, base)
    what = "the base model" if base else "the tuned model"
    print(f"lfw: loading {what} of {run_dir} ... (`exit` or Ctrl-D leaves, `clear` forgets)", file=sys.stderr)
    proc = subprocess.Popen([llamafactory_cli(), "chat", yaml_path.name], cwd=run_dir, env=lf_env(),
                            stdin=subprocess.PIPE, process_group=0)
    threading.Thread(target=_pump, args=(sys.stdin.fileno(), proc), daemon=True).start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(file=sys.stderr)
        return 130
    if sys.stdout.isatty():
        print()  # LLaMA-Factory leaves the cursor after its last "User: " prompt
    if rc != 0:
        raise RunFailed(f"llamafactory-cli chat {yaml_path} exited with code {rc}")
    return 0


def answer(run_dir: Path, prompt: str, base: bool = False, sample: bool = False,
           max_new_tokens: int | None = None) -> str:
    """One answer to `prompt` from the run's model (greedy unless `sample`); nothing else on stdout."""
    import contextlib

    from wrapper.evaluate import read_infer_args

    args = read_infer_args(infer_yaml(run_dir, base))
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with contextlib.redirect_stdout(sys.stderr):  # LLaMA-Factory logs to stdout
        from llamafactory.chat import ChatModel

        model = ChatModel(args)
        kwargs = {} if sample else {"do_sample": False}
        if max_new_tokens:
            kwargs["max_new_tokens"] = max_new_tokens
        responses = model.chat([{"role": "user", "content": prompt}], **kwargs)
    return responses[0].response_text if responses else ""


def stop_child(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Ask a child to stop, then insist."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
