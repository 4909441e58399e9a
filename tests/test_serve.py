"""lfw serve: the real llamafactory-cli api on a free loopback port answers /v1/chat/completions,
refuses requests without the key, stops cleanly on Ctrl-C; a non-loopback host without a key is
refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import LFW, lfw
from wrapper.serve import base_url, curl_example, is_loopback

SECRET = "s3cret-test-key-not-to-be-printed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.10", False), ("no-such-host.invalid", False),
])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_urls_and_curl_never_hold_the_key():
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/v1"
    assert base_url("::1", 9) == "http://[::1]:9/v1"
    text = curl_example("http://127.0.0.1:8000/v1", "nova", with_key=True)
    assert "$LFW_API_KEY" in text and "/v1/chat/completions" in text


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_non_loopback_host_without_key_is_refused_before_anything_starts(host, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LFW_API_KEY"}
    t0 = time.monotonic()
    # no run exists either: the host is refused first, without loading anything
    r = subprocess.run([LFW, "serve", "--host", host, "--port", str(free_port())], capture_output=True, text=True,
                       env={**env, "LFW_RUNS": str(tmp_path)}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "API key" in r.stderr and "LFW_API_KEY" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 10


def test_port_in_use_is_refused(trained_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = lfw("serve", trained_run, "--port", s.getsockname()[1])
    assert r.returncode == 2 and "cannot listen" in r.stderr


def _post(url, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_answers_requires_the_key_and_stops_on_ctrl_c(trained_run):
    port = free_port()
    proc = subprocess.Popen([LFW, "serve", str(trained_run), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LFW_API_KEY": SECRET})
    out: list[str] = []
    try:
        t0 = time.monotonic()
        for line in proc.stdout:  # the base URL and a curl example first, then "ready"
            out.append(line)
            if line.startswith("ready"):
                break
        assert out and out[-1].startswith("ready"), "".join(out) + proc.stderr.read()
        ready_s = time.monotonic() - t0
        text = "".join(out)
        assert f"http://127.0.0.1:{port}/v1" in text and "curl http://127.0.0.1" in text
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "tiny-use", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}
        status, _ = _post(url, body)
        assert status == 401
        status, _ = _post(url, body, key="wrong")
        assert status == 401
        t1 = time.monotonic()
        status, data = _post(url, body, key=SECRET)
        answer_s = time.monotonic() - t1
        assert status == 200, data
        assert data["object"] == "chat.completion" and isinstance(data["choices"][0]["message"]["content"], str)
        print(f"\nserve: ready after {ready_s:.1f} s, one 8-token answer in {answer_s:.2f} s")
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    rest, err = proc.communicate()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    assert SECRET not in "".join(out) + rest + err  # the key is never printed
    with socket.socket() as s:  # the server is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0
