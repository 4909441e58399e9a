"""lfw chat with the real llamafactory-cli chat / ChatModel on the tiny model (CPU): one answer,
piping `exit`, the end of input without `exit`, Ctrl-C in a terminal."""

from __future__ import annotations

import os
import select
import shutil
import time

from conftest import LFW, lfw


def test_prompt_prints_only_the_answer(trained_run):
    r = lfw("chat", trained_run, "--prompt", "Who are you?", "--sample", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "no answer"
    # nothing but the answer on stdout: no LLaMA-Factory or transformers logs
    for noise in ("[INFO", "[WARNING", "llamafactory", "Loading", "Assistant:", "User:"):
        assert noise not in r.stdout
    assert len(r.stdout.strip().splitlines()) <= 8


def test_prompt_base_model_by_recipe_name(trained_run):
    # greedy (the default): the tiny model's greedy answer is blank lines, so only the exit code tells
    r = lfw("chat", trained_run.parent.name, "--base", "--prompt", "Hello", "--max-new-tokens", "4",
            env={"LFW_RUNS": str(trained_run.parent.parent)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_piping_exit(trained_run):
    r = lfw("chat", trained_run, input="hi\nexit\nthis line is never sent\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Assistant:") == 1
    assert "Traceback" not in r.stderr


def test_end_of_input_without_exit_exits_0(trained_run):
    r = lfw("chat", trained_run, input="hi\nclear\nhello again")  # no exit, no final newline
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Assistant:") == 2 and "History has been removed." in r.stdout
    assert "Traceback" not in r.stderr and "EOFError" not in r.stderr


def test_ctrl_c_in_a_terminal_stops_without_traceback(trained_run):
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: lfw chat on a terminal
        os.execv(LFW, [LFW, "chat", str(trained_run)])
    out = b""

    def read_until(pred, timeout):
        nonlocal out
        end = time.time() + timeout
        while not pred() and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                out += chunk

    read_until(lambda: b"User: " in out, 300)
    os.write(fd, b"hi\n")
    read_until(lambda: out.count(b"User: ") >= 2, 300)
    os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground group, lfw only
    read_until(lambda: False, 30)
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert out.count(b"User: ") >= 2, text[-2000:]
    assert os.waitstatus_to_exitcode(status) == 130, text[-2000:]
    assert "Traceback" not in text and "Fatal Python error" not in text


def test_run_without_adapter_is_refused(copy_run):
    run = copy_run()
    shutil.rmtree(run / "adapter")
    r = lfw("chat", run, "--prompt", "hi")
    assert r.returncode == 2 and "no trained model" in r.stderr and "--base" in r.stderr


def test_no_run_at_all(tmp_path):
    r = lfw("chat", env={"LFW_RUNS": str(tmp_path)})
    assert r.returncode == 2 and "no successful run" in r.stderr
