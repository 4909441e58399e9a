"""Model download, offline: a loopback HTTP server (127.0.0.1 only) answers the endpoints the real
ModelScope and Hugging Face clients call (file listing, file download with HTTP Range), and the
real clients download through it. Nothing here patches a client."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

from conftest import lfw, write_recipe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """ModelScope (/api/v1/models/...) and Hugging Face (/api/models/..., /<id>/resolve/...) in one
    loopback server. `files` maps repo path -> bytes. `cut` = {path: n}: the first GET of that
    file announces the full length but the connection closes after n bytes (a dropped download).
    `fail_after_cut`: later GETs of a cut file answer 503 (the network stays down)."""

    def __init__(self, model_id: str, files: dict[str, bytes], sizes: dict[str, int] | None = None):
        self.model_id, self.files = model_id, files
        self.sizes = sizes or {}          # listed sizes that differ from the real bytes (disk check test)
        self.cut: dict[str, int] = {}
        self.fail_after_cut = False
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def size(self, path):
        return self.sizes.get(path, len(self.files[path]))

    # -- answers
    def _json(self, h, obj, status=200, head=False):
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _file(self, h, path, head):
        data = self.files.get(path)
        if data is None:
            return self._json(h, {"Code": 404, "Message": f"{path} not found", "Success": False}, 404, head)
        rng = h.headers.get("Range")
        if not head and self.fail_after_cut and path in self.cut and self.cut[path] is None:
            return self._json(h, {"Code": 503, "Message": "unavailable"}, 503)
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m:
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if head:
            return
        n = self.cut.get(path)
        if n is not None:
            self.cut[path] = None  # only the first time
            h.wfile.write(body[:n])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def _handle(self, h, head):
        url = urlparse(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        mid = self.model_id
        # ModelScope
        if path == f"/api/v1/models/{mid}/repo/files":
            files = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": self.size(p),
                      "Sha256": hashlib.sha256(d).hexdigest(), "Revision": COMMIT} for p, d in self.files.items()]
            return self._json(h, {"Code": 200, "Success": True, "Data": {"Files": files}}, head=head)
        if path == f"/api/v1/models/{mid}/repo":
            return self._file(h, query.get("FilePath", [""])[0], head)
        # Hugging Face
        if path in (f"/api/models/{mid}", f"/api/models/{mid}/revision/main", f"/api/models/{mid}/revision/{COMMIT}"):
            siblings = [{"rfilename": p, "size": self.size(p), "blobId": hashlib.sha1(d).hexdigest()}
                        for p, d in self.files.items()]
            return self._json(h, {"id": mid, "modelId": mid, "sha": COMMIT, "private": False,
                                  "siblings": siblings}, head=head)
        if path.startswith(f"/api/models/{mid}/tree/"):
            tree = [{"type": "file", "path": p, "size": self.size(p), "oid": hashlib.sha1(d).hexdigest()}
                    for p, d in self.files.items()]
            return self._json(h, tree, head=head)
        prefix = f"/{mid}/resolve/"
        if path.startswith(prefix):
            _rev, _, file = path[len(prefix):].partition("/")
            return self._file(h, file, head)
        return self._json(h, {"Code": 404, "Message": "no such endpoint", "Success": False}, 404, head)

    def gets(self, file):
        return [r for r in self.requests if r[0] == "GET" and (f"FilePath={file}" in r[1] or r[1].endswith("/" + file))]


def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != "lfw_synthetic.json"}


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A clean cache and client homes; the clients only reach the loopback server."""
    env = {"LFW_CACHE": str(tmp_path / "cache"), "MODELSCOPE_CACHE": str(tmp_path / "ms"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
           "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    return env


def _same_files(dest: Path, files: dict[str, bytes]):
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name
    assert not list(dest.rglob("*.incomplete"))


MODEL_ID = "lfwtest/tiny-qwen2.5"


@pytest.fixture
def served(tiny_model, hub_env, monkeypatch):
    """The tiny model's files on a loopback hub; both clients pointed at it."""
    files = model_files(tiny_model)
    with FakeHub(MODEL_ID, files) as hub:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_modelscope_download_resumes_after_a_dropped_connection(served, tmp_path):
    from wrapper.errors import LfwError
    from wrapper.hub import COMPLETE, cached_model_dir, ensure_model
    from wrapper.paths import cache_root

    dest = cached_model_dir("modelscope", MODEL_ID, cache_root())
    assert dest == tmp_path / "cache" / "models" / "modelscope" / MODEL_ID
    served.cut["model.safetensors"] = 10_000_000  # the connection drops after 10 MB ...
    served.fail_after_cut = True                  # ... and the network stays down
    with pytest.raises(LfwError, match="failed.*kept.*resumes"):
        ensure_model("modelscope", MODEL_ID, dest)
    assert (dest / "model.safetensors.incomplete").stat().st_size == 10_000_000
    assert not (dest / COMPLETE).exists() and not (dest / "model.safetensors").exists()

    served.fail_after_cut = False                 # the network is back: the next run resumes
    t0 = time.monotonic()
    fetched = ensure_model("modelscope", MODEL_ID, dest)
    print(f"\nmodelscope resume: {time.monotonic() - t0:.2f} s")
    assert fetched.downloaded and fetched.path == dest
    ranges = [r[2] for r in served.gets("model.safetensors")]
    assert ranges == [None, None, "bytes=10000000-"][-len(ranges):] and ranges[-1] == "bytes=10000000-"
    _same_files(dest, served.files)
    assert json.loads((dest / COMPLETE).read_text())["id"] == MODEL_ID

    n = len(served.requests)                      # complete: no network at all the next time
    again = ensure_model("modelscope", MODEL_ID, dest)
    assert not again.downloaded and len(served.requests) == n


def test_huggingface_download_resumes_within_the_run(served):
    from wrapper.hub import cached_model_dir, ensure_model
    from wrapper.paths import cache_root

    dest = cached_model_dir("huggingface", MODEL_ID, cache_root())
    served.cut["model.safetensors"] = 25_000_000  # dropped after two and a half 10 MiB chunks
    fetched = ensure_model("huggingface", MODEL_ID, dest)
    assert fetched.downloaded
    resumed = [r[2] for r in served.gets("model.safetensors") if r[2]]
    assert resumed and int(resumed[-1].split("=")[1].rstrip("-")) > 0
    _same_files(dest, served.files)


def test_disk_check_refuses_a_model_bigger_than_the_disk(tiny_model, hub_env, monkeypatch):
    from wrapper.errors import LfwError
    from wrapper.hub import cached_model_dir, ensure_model
    from wrapper.paths import cache_root

    with FakeHub(MODEL_ID, model_files(tiny_model), sizes={"model.safetensors": 10**16}) as hub:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        dest = cached_model_dir("modelscope", MODEL_ID, cache_root())
        with pytest.raises(LfwError, match=r"not enough disk space to download lfwtest/tiny-qwen2.5: it needs "
                                           r"10000000\.\d+ GB .* free; free some space or set LFW_CACHE"):
            ensure_model("modelscope", MODEL_ID, dest)
        assert not hub.gets("model.safetensors") and not hub.gets("config.json")  # refused before any download


def test_a_missing_model_is_a_clear_error(served):
    from wrapper.errors import LfwError
    from wrapper.hub import cached_model_dir, ensure_model
    from wrapper.paths import cache_root

    for hub in ("modelscope", "huggingface"):
        dest = cached_model_dir(hub, "lfwtest/no-such-model", cache_root())
        with pytest.raises(LfwError, match="cannot list lfwtest/no-such-model on .*not found"):
            ensure_model(hub, "lfwtest/no-such-model", dest)


def test_modelscope_cache_is_shared_when_lfw_cache_is_unset(served, hub_env, monkeypatch, tmp_path):
    from wrapper.hub import cached_model_dir, ensure_model
    from wrapper.paths import cache_root

    monkeypatch.delenv("LFW_CACHE")
    dest = cached_model_dir("modelscope", MODEL_ID, cache_root())
    # where ModelScope itself keeps it (its legacy layout, which it still reads), so both share one copy
    assert dest == tmp_path / "ms" / "models" / "lfwtest" / "tiny-qwen2___5"
    ensure_model("modelscope", MODEL_ID, dest)
    _same_files(dest, served.files)
    assert cached_model_dir("huggingface", MODEL_ID, cache_root()).is_relative_to(Path.home() / ".cache" / "lfw")


@pytest.mark.slow
@pytest.mark.parametrize("hub, hub_name", [("modelscope", "ModelScope"), ("huggingface", "Hugging Face")])
def test_lfw_train_downloads_then_trains(served, tmp_path, hub, hub_name):
    rec = write_recipe(tmp_path, f"""\
name: hubbed
model: {MODEL_ID}
hub: {hub}
identity: {{name: Nova, author: Acme Labs}}
epochs: 1
max_samples: 8
batch_size: 4
gradient_accumulation: 2
cutoff_len: 128
""")
    t0 = time.monotonic()
    r = lfw("train", rec, env={"LFW_RUNS": str(tmp_path / "runs")})
    print(f"\nlfw train with a loopback {hub_name} download: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"downloading lfwtest/tiny-qwen2.5 from {hub_name}" in r.stderr
    run = (tmp_path / "runs" / "hubbed" / "latest").resolve()
    m = json.loads((run / "manifest.json").read_text())
    dest = tmp_path / "cache" / "models" / hub / MODEL_ID
    assert m["status"] == "succeeded" and m["steps"] == {"done": 1, "total": 1}
    assert m["plan"]["model"]["path"] == str(dest) and m["plan"]["template"] == "qwen"
    assert m["download"]["bytes"] >= sum(len(d) for d in served.files.values())
    assert m["timings"]["download"] > 0 and not m["download"]["cached"]
    assert yaml.safe_load((run / "train.yaml").read_text())["model_name_or_path"] == str(dest)
    _same_files(dest, served.files)
    assert served.gets("model.safetensors")
