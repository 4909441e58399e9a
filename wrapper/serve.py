"""`lfw serve`: an OpenAI-compatible API through `llamafactory-cli api infer.yaml`.

LLaMA-Factory's server reads API_HOST, API_PORT, API_KEY and API_MODEL_NAME from the environment
(llamafactory/api/app.py); lfw sets them for the child only, so the key is in no file, argument
list or log. Without a key the API is open to whoever can reach it: a host other than a loopback
address needs one, and is refused before anything starts.

The child runs in its own process group; Ctrl-C (or SIGTERM) reaches lfw, which sends the server
SIGTERM: uvicorn shuts down gracefully, or, while the model is still loading, the child just ends.
Either way lfw exits 0 with no traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from wrapper.errors import LfwError, RunFailed

KEY_ENV = "LFW_API_KEY"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and names (like localhost) that resolve to loopback addresses only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise LfwError(f"--host {host} is reachable from other machines: set an API key "
                       f"(--api-key KEY or {KEY_ENV}=KEY), or serve on 127.0.0.1")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise LfwError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port)") from None


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/v1"


def curl_example(url: str, model: str, with_key: bool) -> str:
    auth = f' \\\n  -H "Authorization: Bearer ${KEY_ENV}"' if with_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Who are you?"}]})
    return f"curl {url}/chat/completions \\\n  -H 'Content-Type: application/json'{auth} \\\n  -d '{body}'"


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host.strip("[]")
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          base: bool = False, say=print) -> int:
    from wrapper.chat import infer_yaml, lf_env
    from wrapper.launch import llamafactory_cli
    from wrapper.runs import read_manifest

    api_key = api_key or os.environ.get(KEY_ENV) or None
    check_host(host, api_key)
    yaml_path = infer_yaml(run_dir, base)  # before anything starts: the run has a model
    check_port_free(host, port)
    name = ((read_manifest(run_dir) or {}).get("name") or Path(run_dir).parent.name) + ("-base" if base else "")
    env = lf_env(API_HOST=host, API_PORT=str(port), API_MODEL_NAME=name)
    env.pop("API_KEY", None)
    if api_key:
        env["API_KEY"] = api_key
    url = base_url(host, port)
    say(f"serving {name} ({'base model' if base else 'tuned'}) from {run_dir}")
    say(f"base URL  {url}   (OpenAI-compatible; model name {name!r})")
    say("API key   required (Authorization: Bearer ...)" if api_key else "API key   none (loopback only)")
    say("try:\n" + curl_example(url, name, bool(api_key)))
    say("loading the model ... (Ctrl-C stops)")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and kill both stop the server; SIGINT is handled even where it was inherited as
    # ignored (a server started in the background of a script)
    old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        proc = subprocess.Popen([llamafactory_cli(), "api", yaml_path.name], cwd=run_dir, env=env,
                                process_group=0)
        ready = False
        while proc.poll() is None:
            if not ready and _listening(host, port):
                ready = True
                say(f"ready     {url}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        from wrapper.chat import stop_child

        say("stopping ...")
        if proc is not None:
            stop_child(proc, signal.SIGTERM, timeout=20)
        say("stopped")
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if proc.returncode != 0:
        raise RunFailed(f"llamafactory-cli api {yaml_path} exited with code {proc.returncode}")
    return 0

